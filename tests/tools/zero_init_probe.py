"""Loads an HF model like ``AutoModelForCausalLM.from_pretrained`` and records, per rank, how
many parameter elements it held while loading (for tests/tools/test_train_deepspeed.py).

A config names :func:`from_pretrained_measured` as its ``llm.type``. Under ``zero.Init`` a
rank keeps only its partition of every parameter, plus the parameters of one module while
transformers copies the checkpoint into them (``GatheredParameters``): the peak is that sum.
Without ``zero.Init`` the peak is the whole model.
"""

from __future__ import annotations

import json
import os
import os.path as osp


def from_pretrained_measured(probe_dir: str, **kwargs):
    import deepspeed
    from transformers import AutoModelForCausalLM

    GatheredParameters = deepspeed.zero.GatheredParameters  # noqa: N806 (DeepSpeed's class)

    gathered = [0]
    enter = GatheredParameters.__enter__

    def measured_enter(self):
        out = enter(self)
        gathered[0] = max(gathered[0], sum(p.numel() for p in getattr(self, "params", [])))
        return out

    GatheredParameters.__enter__ = measured_enter
    try:
        model = AutoModelForCausalLM.from_pretrained(**kwargs)
    finally:
        GatheredParameters.__enter__ = enter
    params = list(model.parameters())
    record = {
        "full": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        # what this rank allocated for the parameters: its partitions (or whole tensors)
        "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "gathered_at_once": gathered[0],
    }
    os.makedirs(probe_dir, exist_ok=True)
    with open(osp.join(probe_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(record, f)
    return model
