"""QLoRA through the front door adds nothing: the adapter gradients of the first iteration of
``xtuner train`` on an upstream-style QLoRA config equal those of the same model built
directly (``from_pretrained`` with a ``BitsAndBytesConfig``, ``SupervisedFinetune`` with a
``LoraConfig``) on the same batch and adapter weights. A QLoRA run then resumes exactly and
its checkpoint converts to an HF adapter that merges into the base model."""

from __future__ import annotations

import importlib.util
import os.path as osp

import pytest
import torch

_here = osp.dirname(osp.abspath(__file__))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(_here, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_matrix = _load("test_config_matrix")

#: a hook (loaded by custom_imports) that records iteration 0: the trainable weights before
#: the update, their gradients and the batch.
DUMP_MODULE = """
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpFirstIterHook(Hook):
    def __init__(self, path):
        self.path = path
        self.grads = {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter != 0:
            return
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        self.params = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.params[name] = p.detach().clone()
                p.register_hook(lambda g, name=name: self.grads.__setitem__(name, g.clone()))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == 0:
            torch.save(dict(params=self.params, grads=self.grads, batch=data_batch), self.path)
"""

QLORA_4BIT = dict(
    load_in_4bit=True,
    load_in_8bit=False,
    llm_int8_threshold=6.0,
    llm_int8_has_fp16_weight=False,
    bnb_4bit_compute_dtype=torch.float16,
    bnb_4bit_use_double_quant=True,
    bnb_4bit_quant_type="nf4",
)


def qlora_config(folder, assets, **kwargs) -> str:
    fields = _matrix.method_fields("qlora4")
    fields["lora"] = fields["lora"].replace("lora_dropout=0.1", "lora_dropout=0.0")
    return _matrix.write_config(folder, assets, param_scheduler="[]", **fields, **kwargs)


@pytest.mark.slow
def test_adapter_gradients_equal_the_directly_built_model(tmp_path, demo_assets):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from xtuner.model import SupervisedFinetune

    (tmp_path / "dump_hook.py").write_text(DUMP_MODULE)
    dump = tmp_path / "first_iter.pt"
    cfg = qlora_config(
        tmp_path,
        demo_assets,
        max_iters=1,
        save_steps=1,
        header="custom_imports = dict(imports=['dump_hook'])\n"
        f"custom_hooks_extra = [dict(type='DumpFirstIterHook', path={str(dump)!r})]",
    )
    with open(cfg, encoding="utf-8") as f:
        text = f.read().replace(
            "if use_varlen_attn:", "custom_hooks += custom_hooks_extra\nif use_varlen_attn:"
        )
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(text)
    out = _matrix.run_console_script("train", cfg, "--work-dir", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = torch.load(dump, weights_only=False)
    assert record["grads"] and set(record["grads"]) == set(record["params"])
    assert all("lora_" in name for name in record["grads"])

    llm = AutoModelForCausalLM.from_pretrained(
        demo_assets["model"],
        dtype=torch.float16,
        quantization_config=BitsAndBytesConfig(**QLORA_4BIT),
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = SupervisedFinetune(llm=llm, lora=lora)
    missing = model.load_state_dict(record["params"], strict=False)
    assert not missing.unexpected_keys
    model.train()
    data = model.data_preprocessor(record["batch"], training=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training process (OMP_NUM_THREADS=1): same sum order
    try:
        losses = model(**data, mode="loss")
        sum(v for k, v in losses.items() if "loss" in k).backward()
    finally:
        torch.set_num_threads(threads)
    direct = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(direct) == set(record["grads"])
    for name, grad in record["grads"].items():
        assert direct[name] is not None, name
        torch.testing.assert_close(direct[name], grad, rtol=1e-6, atol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in direct.values())


@pytest.mark.slow
def test_qlora_resumes_exactly_and_converts(tmp_path, demo_assets):
    full_cfg = qlora_config(tmp_path, demo_assets, name="full.py", max_iters=4, save_steps=2)
    short_cfg = qlora_config(tmp_path, demo_assets, name="short.py", max_iters=2, save_steps=2)
    run = _matrix.run_console_script
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    out = run("train", full_cfg, "--work-dir", full_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("train", short_cfg, "--work-dir", part_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("train", full_cfg, "--work-dir", part_dir, "--seed", "0", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _matrix.logged(part_dir, "loss") == pytest.approx(
        _matrix.logged(full_dir, "loss")[2:], rel=1e-5
    )

    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    out = run("convert", "pth_to_hf", full_cfg, osp.join(full_dir, "iter_4.pth"), adapter)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("convert", "merge", demo_assets["model"], adapter, merged)
    assert out.returncode == 0, out.stderr[-3000:]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = torch.load(osp.join(full_dir, "iter_4.pth"), weights_only=False)["state_dict"]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_assets["model"]), adapter
    )
    adapter_weights = {
        n: p for n, p in peft_model.named_parameters() if "lora_" in n and "default" in n
    }
    # Every trained adapter tensor made it into the HF adapter, unchanged.
    assert len(adapter_weights) == len(trained)
    for name, value in trained.items():
        key = name.removeprefix("llm.")
        torch.testing.assert_close(adapter_weights[key], value.float(), rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(demo_assets["model"])
    result = AutoModelForCausalLM.from_pretrained(merged)
    changed = [
        n
        for (n, p), q in zip(base.named_parameters(), result.parameters())
        if not torch.equal(p, q.to(p.dtype))
    ]
    assert changed, "merging the trained adapter changed no weight"
