"""LLaVAModel: the multimodal merge, the loss path shared with SFT, stages and HF export."""

from __future__ import annotations

import pytest
import torch
from mmengine.config import Config
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from xtuner.model.llava import ImageSplice, LLaVAModel
from xtuner.registry import LOSSES
from xtuner.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

LORA = dict(type="peft.LoraConfig", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
P = 16  # patches of a 32x32 image with 8x8 patches


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> str:
    from xtuner.demo.llava import build_tiny_clip

    path = str(tmp_path_factory.mktemp("tiny_clip"))
    build_tiny_clip(path)
    return path


def build(tiny_llama_path, clip_path, **kwargs) -> LLaVAModel:
    torch.manual_seed(0)
    kwargs.setdefault("use_activation_checkpointing", False)
    return LLaVAModel(
        llm=dict(
            type=AutoModelForCausalLM.from_pretrained,
            pretrained_model_name_or_path=tiny_llama_path,
            torch_dtype=torch.float32,
        ),
        visual_encoder=dict(
            type=CLIPVisionModel.from_pretrained, pretrained_model_name_or_path=clip_path
        ),
        **kwargs,
    )


def batch(seed: int = 0) -> dict:
    """Three samples: one image; two images; text only (with a placeholder image); padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        [1, *range(30, 34), IMAGE_TOKEN_INDEX, *range(40, 47), 2],
        [1, 50, IMAGE_TOKEN_INDEX, 51, 52, IMAGE_TOKEN_INDEX, *range(60, 68), 2],
        [1, *range(70, 80), 2],
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    labels = torch.where(mask, input_ids, IGNORE_INDEX)
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX
    pixel_values = [
        torch.randn(3, 32, 32, generator=g),
        torch.randn(2, 3, 32, 32, generator=g),
        torch.zeros(3, 32, 32),
    ]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixel_values,
    }


def reference_merge(model: LLaVAModel, data: dict):
    """The merge written naively, sample by sample: (embeds, labels, mask)."""
    embed = model.base_llm.get_input_embeddings()
    rows_e, rows_l = [], []
    for ids, labels, mask, images in zip(
        data["input_ids"], data["labels"], data["attention_mask"], data["pixel_values"]
    ):
        images = images if images.dim() == 4 else images[None]
        parts_e, parts_l, used = [], [], 0
        for token, label in zip(ids[mask.bool()], labels[mask.bool()]):
            if token == IMAGE_TOKEN_INDEX:
                out = model.visual_encoder(images[used : used + 1], output_hidden_states=True)
                parts_e.append(model.projector(out.hidden_states[-2][0, 1:]))
                parts_l.append(torch.full((P,), IGNORE_INDEX))
                used += 1
            else:
                parts_e.append(embed(token[None]))
                parts_l.append(label[None])
        rows_e.append(torch.cat(parts_e))
        rows_l.append(torch.cat(parts_l))
    width = max(len(r) for r in rows_e)
    embeds = torch.zeros(len(rows_e), width, rows_e[0].shape[-1])
    labels = torch.full((len(rows_e), width), IGNORE_INDEX)
    mask = torch.zeros(len(rows_e), width, dtype=torch.long)
    for i, (e, lab) in enumerate(zip(rows_e, rows_l)):
        embeds[i, : len(e)] = e
        labels[i, : len(lab)] = lab
        mask[i, : len(e)] = 1
    return embeds, labels, mask


def grads(model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def test_splice_layout():
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, 0], [IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    splice = ImageSplice(ids, mask, num_patches=3)
    assert splice.lengths.tolist() == [5, 8]
    merged = splice.merged_ids(ids, pad_id=-1)
    i = IMAGE_TOKEN_INDEX
    assert merged.tolist() == [[5, i, i, i, 6, -1, -1, -1], [i, i, i, 7, i, i, i, 8]]
    assert splice.attention_mask().tolist() == [[1] * 5 + [0] * 3, [1] * 8]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_default_loss_equals_hf_loss_on_merged_embeddings(
    tiny_llama_path, clip_path, checkpointing
):
    model = build(tiny_llama_path, clip_path, use_activation_checkpointing=checkpointing)
    model.train()
    data = batch()
    ours = model(data, mode="loss")
    ours["loss"].backward()
    ours_grads = grads(model)
    model.zero_grad()
    embeds, labels, mask = reference_merge(model, data)
    ref = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = grads(model)
    assert ours["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert int(ours["num_tokens"]) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert int(model.loss_denominators(data)["token"]) == int(ours["num_tokens"])
    assert set(ours_grads) == set(ref_grads)
    assert any(k.startswith("visual_encoder.") for k in ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pretrain_stage_trains_only_the_projector(tiny_llama_path, clip_path):
    model = build(tiny_llama_path, clip_path, freeze_llm=True, freeze_visual_encoder=True)
    model(batch(), mode="loss")["loss"].backward()
    trained = set(grads(model))
    assert trained and all(name.startswith("projector.") for name in trained)
    assert set(model.state_dict()) == {
        f"projector.model.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
    }


def test_lora_both_sides_with_checkpointing(tiny_llama_path, clip_path):
    model = build(
        tiny_llama_path,
        clip_path,
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=LORA,
        visual_encoder_lora=LORA,
        use_activation_checkpointing=True,
    )
    model.train()
    model(batch(), mode="loss")["loss"].backward()
    trained = set(grads(model))
    assert any("lora_" in n and n.startswith("llm.") for n in trained)
    assert any("lora_" in n and n.startswith("visual_encoder.") for n in trained)
    keys = set(model.state_dict())
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in k or k.startswith("projector.") for k in keys)


def test_qlora_llm(tiny_llama_path, clip_path):
    from transformers import BitsAndBytesConfig

    quant = dict(
        type=BitsAndBytesConfig,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    torch.manual_seed(0)
    model = LLaVAModel(
        llm=dict(
            type=AutoModelForCausalLM.from_pretrained,
            pretrained_model_name_or_path=tiny_llama_path,
            dtype=torch.float32,
            quantization_config=quant,
        ),
        visual_encoder=dict(
            type=CLIPVisionModel.from_pretrained, pretrained_model_name_or_path=clip_path
        ),
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=LORA,
    )
    assert model.base_llm.is_loaded_in_4bit
    model.train()
    out = model(batch(), mode="loss")
    out["loss"].backward()
    trained = set(grads(model))
    assert any("lora_" in n for n in trained) and "projector.model.0.weight" in trained
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="quantized LLM"):
        model.build_hf_llava(AutoTokenizer.from_pretrained(tiny_llama_path))


def test_text_only_batch_still_reaches_the_projector(tiny_llama_path, clip_path):
    model = build(tiny_llama_path, clip_path, freeze_llm=True, freeze_visual_encoder=True)
    data = batch()
    text_only = {k: v[2:] for k, v in data.items()}
    model(text_only, mode="loss")["loss"].backward()
    grad = model.projector.model[0].weight.grad
    assert grad is not None and not grad.any()


def test_more_image_tokens_than_images_is_an_error(tiny_llama_path, clip_path):
    model = build(tiny_llama_path, clip_path)
    data = batch()
    data["pixel_values"][1] = data["pixel_values"][1][:1]
    with pytest.raises(ValueError, match="sample 1 of the batch has 2 image token"):
        model(data, mode="loss")


def test_non_default_builtin_loss_trains(tiny_llama_path, clip_path):
    others = sorted(set(LOSSES.module_dict) - {"CrossEntropyLoss", "CompositeLoss"})
    loss = dict(type="FocalLoss", gamma=2.0) if "FocalLoss" in others else None
    if loss is None:
        loss = dict(type="CrossEntropyLoss", label_smoothing=0.1)
    model = build(tiny_llama_path, clip_path, freeze_visual_encoder=True, loss=loss)
    assert type(model.loss).__name__ == loss["type"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    data = batch()
    values = []
    for _ in range(6):
        out = model(data, mode="loss")
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        values.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(values)))
    assert values[-1] < 0.8 * values[0], values


def test_pretrain_then_finetune_loads_projector(tiny_llama_path, clip_path, tmp_path):
    stage1 = build(tiny_llama_path, clip_path, freeze_llm=True, freeze_visual_encoder=True)
    optimizer = torch.optim.SGD(stage1.projector.parameters(), lr=1.0)
    stage1(batch(), mode="loss")["loss"].backward()
    optimizer.step()
    pth = tmp_path / "iter_1.pth"
    torch.save({"meta": {}, "state_dict": stage1.state_dict()}, pth)

    stage2 = build(
        tiny_llama_path,
        clip_path,
        freeze_visual_encoder=True,
        llm_lora=LORA,
        pretrained_pth=str(pth),
    )
    for key, value in stage1.projector.state_dict().items():
        torch.testing.assert_close(stage2.projector.state_dict()[key], value)
    fresh = build(tiny_llama_path, clip_path)
    assert not torch.equal(fresh.projector.model[0].weight, stage1.projector.model[0].weight)

    unrelated = tmp_path / "other.pth"
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, unrelated)
    with pytest.raises(ValueError, match="none of its 1 weights"):
        build(tiny_llama_path, clip_path, pretrained_pth=str(unrelated))


def test_huggingface_format_loads_and_gives_same_logits(
    tiny_llama_path, clip_path, demo_assets, tmp_path
):
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    model = build(tiny_llama_path, clip_path, llm_lora=LORA, visual_encoder_lora=LORA)
    model.eval()
    cfg = Config(
        dict(
            tokenizer=dict(
                type=AutoTokenizer.from_pretrained,
                pretrained_model_name_or_path=demo_assets["tokenizer"],
            ),
            image_processor=dict(
                type=CLIPImageProcessor.from_pretrained, pretrained_model_name_or_path=clip_path
            ),
        )
    )
    out_dir = str(tmp_path / "hf")
    model.to_hf(cfg, out_dir, fp32=True, save_format="huggingface")

    hf = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    image_id = AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids("<image>")
    assert hf.config.image_token_id == image_id
    data = batch()
    data = {k: (v[:2] if k != "pixel_values" else v[:2]) for k, v in data.items()}
    with torch.no_grad():
        ours = torch.stack([r["logits"] for r in model(data, mode="predict")])
        _, merged = model.prepare_inputs(data)
        ids = merged["input_ids"].masked_fill(merged["input_ids"] == IMAGE_TOKEN_INDEX, image_id)
        pixel_values = torch.cat([data["pixel_values"][0][None], data["pixel_values"][1]])
        theirs = hf(
            input_ids=ids, attention_mask=merged["attention_mask"], pixel_values=pixel_values
        ).logits
    valid = merged["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-4, atol=1e-5)


def test_xtuner_format_saves_parts(tiny_llama_path, clip_path, tmp_path):
    from xtuner.model.modules.projector import ProjectorModel

    model = build(tiny_llama_path, clip_path, freeze_visual_encoder=True, llm_lora=LORA)
    out_dir = tmp_path / "xtuner"
    model.to_hf(None, str(out_dir), save_format="xtuner")
    assert (out_dir / "llm_adapter" / "adapter_config.json").exists()
    assert not (out_dir / "visual_encoder").exists()
    projector = ProjectorModel.from_pretrained(str(out_dir / "projector"))
    torch.testing.assert_close(
        projector.model[0].weight.float(), model.projector.model[0].weight, rtol=1e-2, atol=1e-2
    )
    with pytest.raises(ValueError, match="save_format='gguf' is not supported"):
        model.to_hf(None, str(out_dir), save_format="gguf")


def official_llava_logits(folder: str, input_ids: list[int], pixel_values) -> torch.Tensor:
    """The logits of an official-layout LLaVA checkpoint, computed the way the original LLaVA
    code runs it, written out here without xtuner: the vision tower (from the checkpoint, or
    from ``mm_vision_tower`` when it holds none), hidden state ``mm_vision_select_layer``
    without CLS, the ``mm_projector`` MLP, image features in place of ``-200``."""
    import glob
    import json
    import os.path as osp

    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPVisionConfig

    with open(osp.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    state = {}
    for shard in glob.glob(osp.join(folder, "*.safetensors")):
        state.update(load_file(shard))
    tower = "model.vision_tower.vision_tower."
    parts = {"vision": {}, "projector": {}, "llm": {}}
    for key, value in state.items():
        if key.startswith(tower):
            parts["vision"][key[len(tower) :]] = value.float()
        elif key.startswith("model.mm_projector."):
            parts["projector"][key[len("model.mm_projector.") :]] = value.float()
        else:
            parts["llm"][key] = value.float()

    text_type = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
    text_type = text_type[config["model_type"]]
    text_config = AutoConfig.for_model(
        text_type, **{k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    )
    llm = AutoModelForCausalLM.from_config(text_config).float().eval()
    missing, unexpected = llm.load_state_dict(parts["llm"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if missing:
        assert config["tie_word_embeddings"]
        llm.tie_weights()
    if config["unfreeze_mm_vision_tower"]:
        vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(config["mm_vision_tower"]))
        vision.load_state_dict(parts["vision"], strict=True)
    else:
        assert not parts["vision"]
        vision = CLIPVisionModel.from_pretrained(config["mm_vision_tower"])
    depth = int(config["mm_projector_type"].removeprefix("mlp").removesuffix("x_gelu"))
    layers = [torch.nn.Linear(config["mm_hidden_size"], config["hidden_size"])]
    for _ in range(depth - 1):
        layers += [torch.nn.GELU(), torch.nn.Linear(config["hidden_size"], config["hidden_size"])]
    projector = torch.nn.Sequential(*layers)
    projector.load_state_dict(parts["projector"], strict=True)
    assert config["mm_vision_select_feature"] == "patch"

    with torch.no_grad():
        hidden = vision(pixel_values, output_hidden_states=True).hidden_states
        features = iter(projector(hidden[config["mm_vision_select_layer"]][:, 1:]))
        embed = llm.get_input_embeddings()
        pieces = [
            next(features) if t == IMAGE_TOKEN_INDEX else embed(torch.tensor([t]))
            for t in input_ids
        ]
        return llm(inputs_embeds=torch.cat(pieces)[None]).logits[0]


@pytest.fixture(scope="module")
def tiny_qwen2_path(tmp_path_factory) -> str:
    """A tiny random Qwen2 (the bundled LLaVA's language model class), tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "llm,trained_vision,architecture",
    [
        ("llama", True, "LlavaLlamaForCausalLM"),
        ("llama", False, "LlavaLlamaForCausalLM"),
        ("qwen2", True, "LlavaQwenForCausalLM"),
    ],
)
def test_official_format_has_llava_layout_and_the_trained_weights(
    tiny_llama_path, tiny_qwen2_path, clip_path, tmp_path, llm, trained_vision, architecture
):
    import json

    path = tiny_llama_path if llm == "llama" else tiny_qwen2_path
    if trained_vision:
        model = build(path, clip_path, llm_lora=LORA, visual_encoder_lora=LORA)
    else:
        model = build(path, clip_path, freeze_visual_encoder=True, llm_lora=LORA)
    model.eval()
    with torch.no_grad():  # trained (non-initial) projector weights
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out_dir = str(tmp_path / "official")
    model.to_hf(None, out_dir, fp32=True, save_format="official")

    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    model_type = {"LlavaLlamaForCausalLM": "llava_llama", "LlavaQwenForCausalLM": "llava_qwen"}
    assert config["model_type"] == model_type[architecture]
    assert config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_tower"] == clip_path
    assert config["unfreeze_mm_vision_tower"] is trained_vision
    assert config["mm_use_im_start_end"] is False and config["image_aspect_ratio"] == "pad"

    data = batch()
    for row in (0, 1):  # one image; two images
        length = int(data["attention_mask"][row].sum())
        ids = data["input_ids"][row, :length].tolist()
        pixels = data["pixel_values"][row]
        pixels = pixels if pixels.dim() == 4 else pixels[None]
        sample = {
            "input_ids": data["input_ids"][row : row + 1, :length],
            "attention_mask": data["attention_mask"][row : row + 1, :length],
            "pixel_values": [data["pixel_values"][row]],
        }
        with torch.no_grad():
            ours = model(sample, mode="predict")[0]["logits"]
        theirs = official_llava_logits(out_dir, ids, pixels)
        torch.testing.assert_close(ours[: len(theirs)], theirs, rtol=1e-4, atol=1e-5)


def test_official_format_refuses_what_llava_cannot_load(tiny_llama_path, clip_path, tmp_path):
    model = build(tiny_llama_path, clip_path, freeze_visual_encoder=True, projector_depth=2)
    model.projector.config.hidden_act = "silu"
    with pytest.raises(ValueError, match="hidden_act='silu': use save_format='xtuner'"):
        model.to_hf(None, str(tmp_path), save_format="official")


def test_evaluate_chat_hook_generates_from_the_image(
    tiny_llama_path, clip_path, demo_assets, tmp_path
):
    from transformers import CLIPImageProcessor

    from xtuner.demo.llava import draw_shape
    from xtuner.engine.hooks import EvaluateChatHook

    model = build(tiny_llama_path, clip_path)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    processor = CLIPImageProcessor.from_pretrained(clip_path)
    draw_shape("green", "circle", (32, 32)).save(tmp_path / "green.png")
    hook = EvaluateChatHook(
        tokenizer,
        ["What is it?"],
        evaluation_images=str(tmp_path / "green.png"),
        image_processor=processor,
        max_new_tokens=1,
    )
    answer = hook.generate(model)[0]

    ids = [
        *tokenizer.encode(""),
        IMAGE_TOKEN_INDEX,
        *tokenizer.encode("\nWhat is it?", add_special_tokens=False),
    ]
    pixel_values = processor.preprocess(
        draw_shape("green", "circle", (32, 32)), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        logits = model(
            {"input_ids": torch.tensor([ids]), "pixel_values": pixel_values}, mode="predict"
        )
    assert answer == tokenizer.decode([int(logits[0]["logits"][-1].argmax())])
    assert model.llm.training  # generation left the training mode as it was

    missing = EvaluateChatHook(
        tokenizer,
        ["What is it?"],
        evaluation_images=str(tmp_path / "nope.png"),
        image_processor=processor,
        max_new_tokens=1,
    )
    assert len(missing.generate(model)) == 1  # warned, asked without the image


def _run_xtuner(*args, cwd, env):
    import os
    import subprocess
    import sys

    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "xtuner.entry_point", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def _losses(work_dir) -> list[float]:
    import glob
    import json

    (scalars,) = glob.glob(f"{work_dir}/2*/vis_data/scalars.json")
    with open(scalars, encoding="utf-8") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_demo_configs_train_pretrain_then_finetune(tmp_path):
    """The bundled upstream-style configs, run as a user would, from one directory."""
    env = {"XTUNER_DEMO_DIR": str(tmp_path / "demo")}
    pretrain = "llava_tiny_llama_tiny_clip_e10_cpu_pretrain"
    finetune = "llava_tiny_llama_tiny_clip_lora_e10_cpu_finetune"
    out = _run_xtuner("train", pretrain, "--seed", "0", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    stage1 = torch.load(tmp_path / f"work_dirs/{pretrain}/iter_30.pth", weights_only=False)
    assert set(stage1["state_dict"]) == {
        f"projector.model.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
    }
    losses = _losses(tmp_path / f"work_dirs/{pretrain}")
    assert losses[-1] < losses[0]
    assert "[chat before training]" in out.stdout

    out = _run_xtuner("train", finetune, "--seed", "0", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"loaded 4 weights from ./work_dirs/{pretrain}/iter_30.pth" in out.stdout
    stage2 = torch.load(tmp_path / f"work_dirs/{finetune}/iter_40.pth", weights_only=False)
    keys = set(stage2["state_dict"])
    assert {k for k in keys if not k.startswith("projector.")} and all(
        k.startswith("projector.") or "lora_" in k for k in keys
    )
    losses = _losses(tmp_path / f"work_dirs/{finetune}")
    assert losses[-1] < 0.95 * losses[0]


@pytest.mark.multiproc
def test_sequence_parallel_2_equals_1(tmp_path):
    """Loss and every gradient (LLM, projector, vision encoder) with sp=2 equal sp=1."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_sp_worker.py")
    out = tmp_path / "results.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), worker, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = torch.load(out, weights_only=False)
    assert set(results) == {"ce", "focal_sample"}
    for name, r in results.items():
        torch.testing.assert_close(r["sp_loss"], r["ref_loss"], rtol=1e-5, atol=1e-6, msg=name)
        assert r["sp_grads"].keys() == r["ref_grads"].keys()
        assert any(k.startswith("visual_encoder.") for k in r["ref_grads"])
        for key, ref in r["ref_grads"].items():
            # (1e-7 floor: some gradients are zero in exact arithmetic, e.g. attention key biases)
            atol = max(1e-5 * float(ref.abs().max()), 1e-7)
            torch.testing.assert_close(
                r["sp_grads"][key], ref, rtol=1e-4, atol=atol, msg=f"{name} {key}"
            )


def test_kd_teacher_sees_the_text_tokens(tiny_llama_path, clip_path):
    from xtuner.model.sft import shift_labels

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    model = build(tiny_llama_path, clip_path, loss=dict(type="KDLoss", teacher=teacher))
    data = batch()
    _, merged = model.prepare_inputs(data)
    labels = shift_labels(merged["labels"], merged["position_ids"])
    hidden = model.loss.extra_inputs(merged, labels)[model.loss.teacher_key]
    for b in range(len(data["input_ids"])):
        keep = data["attention_mask"][b] & (data["input_ids"][b] != IMAGE_TOKEN_INDEX)
        text, text_labels = data["input_ids"][b][keep], data["labels"][b][keep]
        with torch.no_grad():
            want = teacher.model(input_ids=text[None]).last_hidden_state[0]
        # The targets in the merged order are those of the text alone, in the same order.
        targets_text = (text_labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)
        valid = labels[b] != IGNORE_INDEX
        assert labels[b][valid].tolist() == text_labels[1:][targets_text].tolist()
        torch.testing.assert_close(hidden[b][valid], want[targets_text], rtol=1e-5, atol=1e-6)
    out = model(data, mode="loss")
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
