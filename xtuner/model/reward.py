"""Reward models: a language model's backbone with a scalar value head, trained on pairs."""

from __future__ import annotations

import copy
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from torch import Tensor, nn

from xtuner.registry import BUILDER
from xtuner.utils.constants import IGNORE_INDEX

from .losses import OutputHead, compute_weights
from .losses.head import backbone_layout
from .losses.preference import REWARD_LOSS_TYPES
from .preference import PreferenceFinetune


class RewardModel(PreferenceFinetune):
    """A reward model with XTuner 0.x's arguments: ``score = v_head(h)`` at each sequence's
    reward token.

    The data (``build_preference_dataset(..., is_reward=True, reward_token_id=...)``) appends
    the reward token to every chosen and rejected sequence and labels only that position;
    the score is the value head applied to that position's final hidden state (labels are
    not shifted). The value head is ``nn.Linear(hidden_size, 1, bias=False)``,
    zero-initialised, and is the loss's output head: any preference loss written on scores
    applies (``RankingRewardLoss``, ``FocalRankingRewardLoss``). The language-model head is
    unused and frozen.

    Args:
        llm: a causal LM (or its config dict), e.g. ``AutoModelForCausalLM.from_pretrained``.
        reward_token_id: recorded in the exported config (the data appends the token).
        loss_type: ``'ranking'`` or ``'focal'``.
        penalty_type: ``'log_barrier'``, ``'L2'`` or ``'none'``.
        penalty_weight: the penalty's weight.
        loss: a loss config overriding the three arguments above.
        **kwargs: :class:`~xtuner.model.sft.SupervisedFinetune`'s (``lora``, ...).
    """

    def __init__(
        self,
        llm: Any,
        reward_token_id: int | None = None,
        loss_type: str = "ranking",
        penalty_type: str = "log_barrier",
        penalty_weight: float = 0.01,
        loss: Any = None,
        **kwargs,
    ):
        if loss is None:
            if loss_type not in REWARD_LOSS_TYPES:
                known = sorted(REWARD_LOSS_TYPES)
                raise ValueError(f"RewardModel: loss_type={loss_type!r} is not one of {known}")
            loss = dict(
                type=REWARD_LOSS_TYPES[loss_type],
                penalty_type=penalty_type,
                penalty_weight=penalty_weight,
            )
        super().__init__(llm, loss=loss, **kwargs)
        self.reward_token_id = reward_token_id
        self.loss_type, self.penalty_type, self.penalty_weight = (
            loss_type,
            penalty_type,
            penalty_weight,
        )
        hidden_size = self.base_llm.config.hidden_size
        dtype = self.base_llm.get_input_embeddings().weight.dtype
        self.v_head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        nn.init.zeros_(self.v_head.weight)
        lm_head = self.base_llm.get_output_embeddings()
        if lm_head is not None and not getattr(self.base_llm.config, "tie_word_embeddings", False):
            # Unused by the reward: frozen, so no rank waits for its gradient.
            lm_head.requires_grad_(False)

    def output_head(self) -> OutputHead:
        """The scalar value head (``[1, D]``), in the form the loss path reads heads, with the
        backbone's hidden-state layout (ChatGLM2/3's backbone is sequence first)."""
        return OutputHead(
            module=self.v_head,
            weight_fn=lambda: self.v_head.weight,
            bias_fn=lambda: self.v_head.bias,
            adapter="reward value head",
            layout=backbone_layout(self.base_llm),
        )

    def _probe_head(self) -> None:
        """No probe: the value head is this class's own, not the language model's output
        head whose logits the probe compares (and it does not exist yet when the base class
        runs the probe)."""

    def backbone(self) -> nn.Module:
        # ``AutoModel`` (as XTuner 0.x's POLAR configs build it) is the decoder itself; a causal
        # LM holds it under its base_model_prefix (ChatGLM's, although its head is not
        # what get_output_embeddings() returns).
        base = self.base_llm
        if base.get_output_embeddings() is None and not hasattr(base, base.base_model_prefix):
            return base
        return super().backbone()

    def _targets(self, data: dict, position_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # The score is read at the reward token itself: the labels are not shifted.
        labels = data["labels"]
        targets = labels[labels != IGNORE_INDEX]
        if ((targets != 0) & (targets != 1)).any():
            # Policy (DPO) data labels every answer token with its id: the scores would be
            # read at arbitrary positions and training would go on, silently wrong.
            raise ValueError(
                "RewardModel: the batch's labels are not reward labels (0 at the chosen "
                "answer's reward token, 1 at the rejected one's; here "
                f"{sorted(set(targets.unique()[:5].tolist()))}...). Build the data with "
                "build_preference_dataset(..., is_dpo=False, is_reward=True, "
                "reward_token_id=ID)."
            )
        return labels, compute_weights(self.loss.weight_specs(), labels, position_ids)

    def forward(self, data: dict, data_samples=None, mode: str = "loss"):
        if mode in ("predict", "tensor"):
            inputs = self._attention_inputs(data)
            hidden = self.backbone()(**inputs, use_cache=False).last_hidden_state
            hidden = self.output_head().batch_first(hidden, inputs["position_ids"])
            scores = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
            return [{"scores": row} for row in scores] if mode == "predict" else scores
        return super().forward(data, data_samples, mode)

    def to_hf(
        self,
        cfg: Config | None,
        save_dir: str,
        fp32: bool = False,
        save_pretrained_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        """Saves an ``AutoModelForSequenceClassification`` (one label) that scores a sequence
        at its last non-pad token, with the tokenizer if the config names one."""
        from transformers import AutoModelForSequenceClassification

        llm = self.llm.merge_and_unload() if self.use_lora else self.llm
        config = copy.deepcopy(llm.config)
        config.num_labels = 1
        config.use_cache = True
        if self.reward_token_id is not None:
            config.reward_token_id = self.reward_token_id
        tokenizer = cfg.get("tokenizer") if cfg is not None else None
        if isinstance(tokenizer, (dict, ConfigDict)):
            tokenizer = BUILDER.build(tokenizer)
        if getattr(config, "pad_token_id", None) is None and tokenizer is not None:
            config.pad_token_id = tokenizer.pad_token_id
        classifier = AutoModelForSequenceClassification.from_config(config)
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        if base.get_output_embeddings() is None:
            backbone = base
        else:
            backbone = getattr(base, base.base_model_prefix, None) or base.get_decoder()
        getattr(classifier, classifier.base_model_prefix).load_state_dict(backbone.state_dict())
        classifier.score.weight.data.copy_(self.v_head.weight.data)
        dtype = torch.float32 if fp32 else torch.bfloat16
        if not fp32:
            print_log(
                f"saving the reward model in {dtype} (pass fp32=True to keep fp32)", "current"
            )
        classifier.to(dtype).save_pretrained(save_dir, **dict(save_pretrained_kwargs or {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir)
