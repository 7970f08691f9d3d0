"""``xtuner train`` for configs with ``framework = 'huggingface'``: the HF Trainer, the fork's loss.

Such a config (XTuner 0.x has three) names ``trainer`` (``transformers.Trainer`` or a
subclass), ``training_args`` (a ``TrainingArguments`` dict), ``tokenizer``, ``model`` (the
LLM's ``from_pretrained`` dict), optionally ``lora`` (a ``LoraConfig`` dict, QLoRA when the
model dict is quantized) and ``train_dataset`` (``process_hf_dataset``). The LLM trains as
:class:`~xtuner.model.SupervisedFinetune` does in mmengine configs: the optional top-level
``loss`` key picks the loss (default cross-entropy, equal to the model's own loss), MoE
router losses included, and the gradient of each optimizer step is that of the token mean
over the whole accumulation window on every rank (the Trainer's micro-batch means are not
used). Checkpoints are the Trainer's (``output_dir`` is the work dir); the trained model (or
LoRA adapter) and the tokenizer are saved in HF format under ``<work_dir>/hf``.

Not supported here, each refused with a message: ``--deepspeed`` (set
``training_args.deepspeed``, the Trainer's own DeepSpeed integration, instead), sequence
parallel, and a ``model`` dict of type ``SupervisedFinetune`` (that is an mmengine config:
drop ``framework``).
"""

from __future__ import annotations

import os.path as osp
from functools import partial

from mmengine.logging import print_log
from torch import Tensor, nn

from xtuner.tools.utils import UserError

#: the keys a ``framework = 'huggingface'`` config must set.
REQUIRED = ("training_args", "tokenizer", "model", "train_dataset")


class TrainerModel(nn.Module):
    """A :class:`~xtuner.model.SupervisedFinetune` as the HF Trainer calls a model.

    The batch fields are named in ``forward`` (the Trainer keeps only the dataset columns
    the model's ``forward`` names) and the output is ``{'loss': sum of the loss terms}``.

    Args:
        sft: the model that holds the LLM and the loss.
    """

    def __init__(self, sft: nn.Module):
        super().__init__()
        self.sft = sft

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        loss_weight: Tensor | None = None,
        cumulative_len: list[Tensor] | None = None,
        max_seqlen: int | None = None,
        loss_denominator: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        fields = dict(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            loss_weight=loss_weight,
            cumulative_len=cumulative_len,
            max_seqlen=max_seqlen,
            loss_denominator=loss_denominator,
        )
        out = self.sft({k: v for k, v in fields.items() if v is not None}, mode="loss")
        return {"loss": sum(v for k, v in out.items() if "loss" in k)}


def trainer_with_global_loss(trainer_cls: type) -> type:
    """The config's Trainer class, handing each accumulation window its loss denominators."""
    from xtuner.engine.runner.loops import attach_loss_denominators

    class XTunerTrainer(trainer_cls):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if batches:
                # The Trainer divides each micro-batch's loss by the window's length (the
                # model takes no loss kwargs) and DDP averages the ranks: as in TrainLoop.
                sft = self.accelerator.unwrap_model(self.model).sft
                attach_loss_denominators(sft, batches, len(batches))
            return batches, num_items

    XTunerTrainer.__name__ = XTunerTrainer.__qualname__ = f"XTuner{trainer_cls.__name__}"
    return XTunerTrainer


def training_arguments(cfg, args, work_dir: str) -> tuple[dict, bool]:
    """The ``TrainingArguments`` fields (``output_dir`` the work dir) and whether to use
    activation checkpointing; GPU-only choices are replaced on a machine without one."""
    import torch

    fields = dict(cfg.training_args)
    fields.pop("type", None)
    fields["output_dir"] = work_dir
    if args.seed is not None:
        fields["seed"] = args.seed
    checkpointing = bool(fields.pop("gradient_checkpointing", False))
    if not torch.cuda.is_available():
        for key in ("fp16", "bf16"):
            if fields.get(key):
                fields[key] = False
                print_log(f"training_args.{key} needs a GPU: training in fp32", "current", 30)
        if str(fields.get("optim", "")).startswith("paged_"):
            print_log(
                f"training_args.optim={fields['optim']!r} needs a GPU: using adamw_torch",
                "current",
                30,
            )
            fields["optim"] = "adamw_torch"
    return fields, checkpointing


def train_with_hf_trainer(cfg, args) -> int:
    """Trains a ``framework = 'huggingface'`` config (see the module docstring)."""
    from transformers import Trainer, TrainingArguments

    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.model import SupervisedFinetune
    from xtuner.registry import BUILDER

    missing = [key for key in REQUIRED if cfg.get(key) is None]
    if missing:
        raise UserError(
            f"config {cfg.filename} (framework='huggingface') has no {', '.join(missing)}: "
            f"it needs {', '.join(REQUIRED)} (and optionally trainer, lora, loss)"
        )
    if args.deepspeed:
        raise UserError(
            "--deepspeed is not supported with framework='huggingface': set "
            "training_args.deepspeed to the DeepSpeed JSON (the HF Trainer's own integration)"
        )
    if int(cfg.get("sequence_parallel_size", 1)) > 1:
        raise UserError(
            "sequence_parallel_size > 1 is not supported with framework='huggingface': "
            "write the config as an mmengine config (model=dict(type=SupervisedFinetune, ...))"
        )
    model = cfg.model
    if isinstance(model, dict) and model.get("type") is SupervisedFinetune:
        raise UserError(
            f"config {cfg.filename}: model is a SupervisedFinetune, which is an mmengine "
            "config; remove framework='huggingface' (or give model the LLM's from_pretrained "
            "dict)"
        )
    work_dir = args.work_dir or cfg.get("work_dir")
    if work_dir is None:
        work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(cfg.filename))[0])
    fields, checkpointing = training_arguments(cfg, args, work_dir)
    tokenizer = BUILDER.build(cfg.tokenizer)
    sft = SupervisedFinetune(
        llm=model,
        lora=cfg.get("lora"),
        loss=cfg.get("loss"),
        use_activation_checkpointing=checkpointing,
    )
    trainer_cls = trainer_with_global_loss(cfg.get("trainer") or Trainer)
    trainer = trainer_cls(
        model=TrainerModel(sft),
        args=TrainingArguments(**fields),
        train_dataset=BUILDER.build(cfg.train_dataset),
        data_collator=partial(default_collate_fn, return_hf_format=True),
    )
    resume = None if args.resume is None else (True if args.resume == "auto" else args.resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    if trainer.is_world_process_zero():
        out = osp.join(work_dir, "hf")
        sft.llm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print_log(f"saved the trained model (HF format) to {out}", "current")
    return 0
