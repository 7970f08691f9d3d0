# The bundled demo, written the way XTuner 0.x configs are: full fine-tuning of a tiny
# Llama-style model (built offline on first use) on the bundled instruction data, on a CPU.
# `make demo` runs it; so does `xtuner train demo_tiny_llama_full_alpaca`.
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from torch.optim import AdamW

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from xtuner.demo import DEMO_DATA, demo_llm, demo_tokenizer
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook, HFCheckpointHook, ThroughputHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: a tiny Llama-style model and BPE tokenizer, built offline on first use (~10 s) under
# $XTUNER_DEMO_DIR (default ~/.cache/xtuner/demo). With a real model you would write
# llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=...).
demo_model = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
data_path = DEMO_DATA
prompt_template = PROMPT_TEMPLATE.qwen_chat
max_length = 256
pack_to_max_length = True

batch_size = 4  # per device
accumulative_counts = 1
dataloader_num_workers = 0
max_epochs = 10
optim_type = AdamW
lr = 3e-3
betas = (0.9, 0.98)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05

save_steps = 1000
save_total_limit = 1

evaluation_freq = 100
SYSTEM = ""
evaluation_inputs = ["Reverse the word.\nplanet", "Add the two numbers.\n12 + 30"]

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(type=demo_tokenizer, **demo_model)

model = dict(
    type=SupervisedFinetune,
    use_activation_checkpointing=False,
    llm=dict(type=demo_llm, **demo_model),
    # The pluggable loss: any registered name, class or dotted path (docs/en/custom_loss.md).
    loss=dict(type="CrossEntropyLoss"),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path="json", data_files=dict(train=data_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale="dynamic",
    dtype="float16",
)

param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template,
        max_new_tokens=16,
    ),
    dict(type=ThroughputHook),
    # Writes <work_dir>/hf_model, loadable with AutoModelForCausalLM.from_pretrained.
    dict(type=HFCheckpointHook),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit,
    ),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)

visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)
