"""InternVL_V1_5 on a remote-code checkpoint (``auto_map`` to ``InternVLChatModel``, as
OpenGVLab's InternVL2/2.5 folders ship): the test writes a tiny remote-code package with
that interface (``vision_model``, ``mlp1``, ``language_model``, ``extract_feature``,
``img_context_token_id``, ``num_image_token``) into the checkpoint folder, so the real
``from_pretrained(..., trust_remote_code=True)`` path runs."""

from __future__ import annotations

import os.path as osp

import pytest
import torch
from transformers import AutoTokenizer

from tests.model.remote_code import write_remote_code
from tests.model.test_internvl import LORA, build, check_sequence_parallel, grads, write_config
from tests.tools.test_train_cli import losses_of, run_xtuner
from xtuner.utils.constants import IGNORE_INDEX

CONFIG_CODE = """
from transformers import InternVLVisionConfig, PretrainedConfig, Qwen2Config


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    sub_configs = {"vision_config": InternVLVisionConfig, "llm_config": Qwen2Config}

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5,
                 select_layer=-1, force_image_size=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = InternVLVisionConfig(**(vision_config or {}))
        if not isinstance(llm_config, PretrainedConfig):
            llm_config = Qwen2Config(**(llm_config or {}))
        self.vision_config, self.llm_config = vision_config, llm_config
        self.downsample_ratio = downsample_ratio
        self.select_layer = select_layer
        self.force_image_size = force_image_size
"""

MODEL_CODE = """
import torch
from torch import nn
from transformers import InternVLVisionModel, PreTrainedModel, Qwen2ForCausalLM

from .configuration_internvl_chat import InternVLChatConfig


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        vision, llm = config.vision_config, config.llm_config
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        side = (config.force_image_size or vision.image_size[0]) // vision.patch_size[0]
        self.num_image_token = int(side * side * config.downsample_ratio**2)
        self.vision_model = InternVLVisionModel(vision)
        self.language_model = Qwen2ForCausalLM(llm)
        width = vision.hidden_size * int(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, llm.hidden_size), nn.GELU(),
            nn.Linear(llm.hidden_size, llm.hidden_size),
        )
        self.img_context_token_id = None
        self.post_init()

    def pixel_shuffle(self, x, scale):
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
        x = x.reshape(n, int(h * scale), int(w * scale), int(c / scale / scale))
        return x.permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixel_values):
        hidden = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        vit = hidden.hidden_states[self.select_layer][:, 1:, :]  # without the CLS token
        side = int(vit.shape[1] ** 0.5)
        vit = self.pixel_shuffle(vit.reshape(vit.shape[0], side, side, -1), self.downsample_ratio)
        return self.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))

    def forward(self, pixel_values, input_ids, attention_mask=None, image_flags=None,
                labels=None, **kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids).clone()
        vit = self.extract_feature(pixel_values)[image_flags.squeeze(-1) == 1]
        where = input_ids == self.img_context_token_id
        embeds[where] = vit.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )
"""

N = 4  # features per 32x32 tile: (32 / 8)^2 patches, pixel-shuffled by 0.5


def build_remote_internvl(folder: str, tokenizer_path: str) -> str:
    """A random tiny remote-code InternVL checkpoint: code, config.json, weights, tokenizer."""
    from transformers import AutoConfig, AutoModel, InternVLVisionConfig, Qwen2Config

    from xtuner.demo.internvl import tiny_internvl_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_tokens(["<img>", "</img>", "<IMG_CONTEXT>"], special_tokens=True)
    tiny = tiny_internvl_config(len(tokenizer), 0)  # the -hf test model's sizes
    llm = Qwen2Config(**{**tiny.text_config.to_dict(), "bos_token_id": tokenizer.bos_token_id})
    config = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "vision_config": InternVLVisionConfig(**tiny.vision_config.to_dict()).to_dict(),
        "llm_config": llm.to_dict(),
        "downsample_ratio": 0.5,
        "select_layer": -1,
        "force_image_size": 32,
    }
    code = {
        "configuration_internvl_chat.py": CONFIG_CODE,
        "modeling_internvl_chat.py": MODEL_CODE,
    }
    write_remote_code(folder, code, config)
    torch.manual_seed(0)
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModel.from_config(model_config, trust_remote_code=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def remote_path(demo_assets, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("internvl_remote") / "model"
    return build_remote_internvl(str(folder), demo_assets["tokenizer"])


def remote_batch(path) -> dict:
    """Two samples (3 tiles; 1 + 3 tiles) and a text-only one, right-padded."""
    tok = AutoTokenizer.from_pretrained(path)
    s, c, e = tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])

    def image(tiles):
        return [s, *[c] * (tiles * N), e]

    rows = [
        [1, *range(30, 34), *image(3), *range(40, 47), 2],
        [1, 50, *image(1), 51, 52, *image(3), *range(60, 68), 2],
        [1, *range(70, 80), 2],
    ]
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    labels = torch.where(mask & (ids != c) & (ids != s) & (ids != e), ids, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    pixel_values = [
        torch.randn(3, 3, 32, 32, generator=g),
        torch.randn(4, 3, 32, 32, generator=g),
        torch.zeros(1, 3, 32, 32),
    ]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixel_values,
    }


def test_remote_code_default_loss_and_gradients_equal_the_models_own(remote_path):
    model = build(remote_path, trust_remote_code=True)
    assert type(model.base_llm).__name__ == "InternVLChatModel"
    tok = AutoTokenizer.from_pretrained(remote_path)
    assert model.base_llm.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    model.train()
    data = remote_batch(remote_path)
    ours = model(data, mode="loss")
    ours["loss"].backward()
    ours_grads = grads(model)
    model.zero_grad()
    # The remote model's own forward (naive: every used tile, image_flags all ones).
    tiles = torch.cat(data["pixel_values"][:2])
    ref = model.base_llm(
        pixel_values=tiles,
        input_ids=data["input_ids"],
        attention_mask=data["attention_mask"].long(),
        image_flags=torch.ones(len(tiles), 1, dtype=torch.long),
        labels=data["labels"],
    ).loss
    ref.backward()
    ref_grads = grads(model)
    assert ours["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours_grads.keys() == ref_grads.keys()
    assert any(k.startswith("llm.vision_model.") for k in ours_grads)
    assert any(k.startswith("llm.mlp1.") for k in ours_grads)
    for key, ref_grad in ref_grads.items():
        atol = max(1e-5 * float(ref_grad.abs().max()), 1e-8)
        torch.testing.assert_close(ours_grads[key], ref_grad, rtol=1e-5, atol=atol, msg=key)


def test_remote_code_lora_4bit_and_what_is_refused(remote_path, tmp_path):
    """LoRA on both sides of a remote model with a 4-bit LLM trains the adapters (and the
    projector) only; export is refused."""
    import bitsandbytes as bnb

    model = build(
        remote_path,
        trust_remote_code=True,
        quantization_llm=True,
        llm_lora=LORA,
        visual_encoder_lora=LORA,
    )
    base = model.base_llm
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.language_model.model.modules())
    for unquantized in (base.vision_model, base.mlp1, base.language_model.lm_head):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in unquantized.modules())
    model.train()
    out = model(remote_batch(remote_path), mode="loss")
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    got = grads(model)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    sides = {n.split(".")[3] for n in lora}  # llm.base_model.model.<part>....
    assert sides == {"language_model", "vision_model"}, sides
    assert all(n in got and got[n].abs().sum() > 0 for n in lora)
    assert all("lora_" in n or ".mlp1." in n for n in got), sorted(got)
    with pytest.raises(NotImplementedError, match="exporting a remote-code InternVL"):
        model.to_hf(None, str(tmp_path / "hf"))


def test_xtuner_train_on_a_remote_code_checkpoint(remote_path, tmp_path):
    """An upstream-style config (InternVL_V1_5_Dataset + InternVL_V1_5, LoRA on the LLM)
    trains a remote-code checkpoint through ``xtuner train``: finite, falling loss."""
    from xtuner.demo.internvl import write_internvl_data

    data = write_internvl_data(str(tmp_path / "data"))
    cfg = write_config(
        tmp_path,
        "remote.py",
        model_path=remote_path,
        data_root=osp.dirname(data["data"]),
        max_iters=6,
        lr="1e-2",
        freeze_llm=False,
        llm_lora="dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, "
        "task_type='CAUSAL_LM')",
        loss=",\n    trust_remote_code=True",  # the slot after llm_lora in the model dict
    )
    out = run_xtuner("train", cfg, "--work-dir", str(tmp_path / "work"), "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    losses = losses_of(str(tmp_path / "work"))
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < 0.98 * losses[0], losses


@pytest.mark.multiproc
@pytest.mark.slow_all  # ~30 s; the -hf sequence-parallel test covers the shared path in CI
def test_remote_code_sequence_parallel_2_equals_1(remote_path, tmp_path):
    """Loss and every gradient of the remote-code model with sp=2 equal sp=1."""
    check_sequence_parallel(remote_path, tmp_path, ".vision_model.", "remote")
