"""`xtuner convert split` and `xtuner convert merge --is-clip --device`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from xtuner.entry_point import cli


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("safetensors", [True, False])
def test_split_output_loads_and_equals_the_input(tmp_path, demo_assets, safetensors, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "src"
    model = AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32)
    model.save_pretrained(src, safe_serialization=safetensors)
    AutoTokenizer.from_pretrained(demo_assets["model"]).save_pretrained(src)
    dst = tmp_path / "dst"
    assert cli(["convert", "split", str(src), str(dst), "--max-shard-size", "100KB"]) == 0

    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # within the limit (plus the header) unless one tensor alone is bigger
        keys = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(keys) == 1 or os.path.getsize(dst / shard) < 100_000 + 4096, keys
    assert (dst / "tokenizer.json").exists() and (dst / "config.json").exists()
    assert not list(dst.glob("*.bin"))

    reloaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    theirs, ours = _state(model), _state(reloaded)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_split_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert cli(["convert", "split", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "is not an HF model folder (no config.json)" in capsys.readouterr().err


def test_merge_is_clip_folds_the_vision_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionModel

    from xtuner.demo.llava import build_tiny_clip

    base = str(tmp_path / "clip")
    build_tiny_clip(base)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    lora.init_lora_weights = False  # random B, so the adapter changes the output
    peft = get_peft_model(CLIPVisionModel.from_pretrained(base), lora).eval()
    peft.save_pretrained(tmp_path / "adapter")
    out = str(tmp_path / "merged")
    argv = ["convert", "merge", base, str(tmp_path / "adapter"), out, "--is-clip"]
    assert cli([*argv, "--device", "cpu"]) == 0, capsys.readouterr().err

    merged = CLIPVisionModel.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = peft(pixel_values=pixels).last_hidden_state
        plain = CLIPVisionModel.from_pretrained(base)(pixel_values=pixels).last_hidden_state
        got = merged(pixel_values=pixels).last_hidden_state
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "preprocessor_config.json").exists()
    assert not any("lora" in k for k in merged.state_dict())

    assert cli([*argv, "--device", "cuda"]) == (0 if torch.cuda.is_available() else 1)


LLAVA_CONFIG = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel
from xtuner.model import LLaVAModel

tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path={llm!r})
image_processor = dict(
    type=CLIPImageProcessor.from_pretrained, pretrained_model_name_or_path={clip!r}
)
model = dict(
    type=LLaVAModel,
    freeze_llm=True,
    freeze_visual_encoder=True,
    use_activation_checkpointing=False,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path={llm!r},
        torch_dtype=torch.float32,
    ),
    visual_encoder=dict(
        type=CLIPVisionModel.from_pretrained, pretrained_model_name_or_path={clip!r}
    ),
)
"""


def test_pth_to_hf_save_format_official(tmp_path, demo_assets, capsys):
    from mmengine.config import Config
    from safetensors.torch import load_file

    from xtuner.demo.llava import build_tiny_clip
    from xtuner.registry import BUILDER

    clip = str(tmp_path / "clip")
    build_tiny_clip(clip)
    config = tmp_path / "llava_cfg.py"
    config.write_text(LLAVA_CONFIG.format(llm=demo_assets["model"], clip=clip))
    torch.manual_seed(0)
    model = BUILDER.build(Config.fromfile(str(config)).model)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.normal_()
    pth = tmp_path / "iter_1.pth"
    torch.save({"meta": {}, "state_dict": model.state_dict()}, pth)

    out = tmp_path / "official"
    argv = ["convert", "pth_to_hf", str(config), str(pth), str(out), "--fp32"]
    assert cli([*argv, "--save-format", "official"]) == 0, capsys.readouterr().err
    saved = load_file(out / "model.safetensors")
    for key, value in model.projector.state_dict().items():
        assert torch.equal(saved["model.mm_projector." + key[len("model.") :]], value), key
    assert not any(k.startswith("model.vision_tower.") for k in saved)  # frozen: not saved
    for key, value in model.base_llm.state_dict().items():
        if key in saved:
            assert torch.equal(saved[key], value), key
    assert "model.embed_tokens.weight" in saved
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == clip
    assert (out / "tokenizer_config.json").exists()
    assert (out / "preprocessor_config.json").exists()

    assert cli([*argv, "--save-format", "gguf"]) == 1
    assert "save_format='gguf' is not supported" in capsys.readouterr().err
