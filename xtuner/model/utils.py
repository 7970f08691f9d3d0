"""Helpers for building language models from XTuner-style configs."""

from __future__ import annotations

import glob
import math
import os.path as osp
from collections.abc import Mapping
from typing import Any

import torch
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from torch import Tensor, nn

from xtuner.registry import BUILDER

_INIT_FUNCS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "zeros_",
    "ones_",
)


class LoadWoInit:
    """Context manager that turns ``torch.nn.init`` functions into no-ops (fast building)."""

    def __enter__(self):
        self._saved = {name: getattr(nn.init, name) for name in _INIT_FUNCS}
        for name in _INIT_FUNCS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(nn.init, name, fn)


def build_nested(cfg: Any) -> Any:
    """Builds every ``dict(type=...)`` inside a config value (e.g. ``quantization_config``)."""
    if isinstance(cfg, (dict, ConfigDict)):
        built = {k: build_nested(v) for k, v in cfg.items() if k != "type"}
        if "type" in cfg:
            return BUILDER.build(dict(type=cfg["type"], **built))
        return type(cfg)(built) if isinstance(cfg, ConfigDict) else built
    if isinstance(cfg, list):
        return [build_nested(v) for v in cfg]
    return cfg


def _model_path(cfg: Mapping) -> str | None:
    return cfg.get("pretrained_model_name_or_path")


def _is_low_precision(dtype: Any) -> bool:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    return dtype in (torch.float16, torch.bfloat16)


def _supports_flash(cfg: Mapping) -> bool:
    """Whether the causal LM class of a config supports flash-attention (False if unknown)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = cfg.get("config")
    if config is None:
        path = _model_path(cfg)
        if path is None:
            return False
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code: transformers decides
        return False
    return bool(getattr(model_cls, "_supports_flash_attn", False))


def prepare_llm_config(llm: Mapping, max_position_embeddings: int | None = None) -> dict[str, Any]:
    """Normalises an ``llm`` config dict for transformers 5 before it is built.

    ``torch_dtype`` is renamed ``dtype``; when the user gave no attention implementation,
    flash_attention_2 is chosen if flash-attn is usable, the dtype is 16-bit and the model
    class supports it; otherwise transformers chooses (sdpa when the family supports it,
    else eager: Gemma2's soft-capped attention has no sdpa). ``max_position_embeddings`` sets
    linear RoPE scaling, also for configs that had no scaling before.
    """
    from transformers import AutoConfig

    from xtuner._compat import flash_attn_available

    cfg = dict(llm)
    if "torch_dtype" in cfg:
        if "dtype" in cfg:
            raise ValueError("llm config gives both 'torch_dtype' and 'dtype'; keep one ('dtype')")
        cfg["dtype"] = cfg.pop("torch_dtype")
    flash_ok = flash_attn_available() and _is_low_precision(cfg.get("dtype"))
    if "attn_implementation" not in cfg and flash_ok and _supports_flash(cfg):
        cfg["attn_implementation"] = "flash_attention_2"
    if max_position_embeddings is not None:
        path = _model_path(cfg)
        config = cfg.get("config") or AutoConfig.from_pretrained(path, trust_remote_code=True)
        original = getattr(config, "max_position_embeddings", None)
        if original is None:
            raise ValueError(
                f"max_position_embeddings={max_position_embeddings}: the model config of {path} "
                "has no max_position_embeddings to scale"
            )
        if max_position_embeddings > original:
            factor = float(math.ceil(max_position_embeddings / original))
            rope = dict(getattr(config, "rope_parameters", None) or {})
            rope.update(rope_type="linear", factor=factor)
            config.rope_parameters = rope
            config.max_position_embeddings = max_position_embeddings
            print_log(
                f"RoPE scaled linearly by {factor:g} for max_position_embeddings="
                f"{max_position_embeddings} (was {original})",
                logger="current",
            )
        cfg["config"] = config
    return cfg


def find_all_linear_names(model: nn.Module) -> list[str]:
    """Names of every Linear (also 4/8-bit) module but the output head, for LoRA targets."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        cls = type(module).__name__
        if isinstance(module, nn.Linear) or cls in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    # Heads by name too: InternLM2's ``output``, and ChatGLM's ``transformer.output_layer``,
    # which get_output_embeddings() does not return.
    names.difference_update(("lm_head", "output", "output_layer"))
    return sorted(names)


def load_checkpoint_state(path: str) -> dict[str, Tensor]:
    """The model weights (fp32, whole) of a training checkpoint.

    Args:
        path: an mmengine ``.pth`` file, or a DeepSpeed checkpoint folder of any ZeRO stage
            (what ``--deepspeed`` training writes as ``iter_N.pth/``; its partitions are
            merged by DeepSpeed's ``zero_to_fp32``). Frozen weights that the checkpoint
            leaves out (LoRA's base model) are absent from the result.

    Returns:
        Parameter name (as in the trained model, without ``module.``) -> tensor.

    Raises:
        FileNotFoundError: ``path`` is neither a file nor a DeepSpeed checkpoint folder.
    """
    from xtuner._compat import load_local_checkpoint, trust_checkpoint_path

    path = osp.abspath(path)
    if osp.isdir(path):
        if not glob.glob(osp.join(path, "*model_states.pt")):
            raise FileNotFoundError(
                f"{path} is a folder without DeepSpeed '*model_states.pt' files: give the "
                "checkpoint folder itself (e.g. work_dir/iter_500.pth)"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        trust_checkpoint_path(path)  # the user named it: DeepSpeed's files need unpickling
        # mmengine saves without DeepSpeed's 'latest' file: the folder name is the tag.
        state = get_fp32_state_dict_from_zero_checkpoint(osp.dirname(path), tag=osp.basename(path))
    elif osp.isfile(path):
        trust_checkpoint_path(path)
        state = load_local_checkpoint(path, map_location="cpu")
        state = state.get("state_dict", state)
    else:
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder")
    return {k.removeprefix("module."): v for k, v in state.items()}
