"""InternVL_V1_5 on a tiny native InternVL: the merge and loss shared with LLaVA, the trained
parts, stages, HF export, and an upstream-style config through ``xtuner train``."""

from __future__ import annotations

import json
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from tests.tools.test_train_cli import losses_of, run_xtuner
from xtuner.model.internvl import ContextTokenSplice, InternVL_V1_5
from xtuner.model.modules.sequence_parallel_attention import PREFIX
from xtuner.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

HERE = osp.dirname(osp.abspath(__file__))
LORA = dict(type="peft.LoraConfig", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
N = 4  # features per 32x32 tile: (32 / 8)^2 patches, pixel-shuffled by 0.5


def build(path, **kwargs) -> InternVL_V1_5:
    torch.manual_seed(0)
    kwargs.setdefault("use_activation_checkpointing", False)
    return InternVL_V1_5(path, **kwargs)


def batch(path, seed: int = 0) -> dict:
    """Three samples: one image of 3 tiles; two images (1 and 3 tiles); text only with a
    placeholder tile; right-padded."""
    tok = AutoTokenizer.from_pretrained(path)
    s, c, e = tok.start_image_token_id, tok.context_image_token_id, tok.end_image_token_id

    def image(tiles):
        return [s, *[c] * (tiles * N), e]

    rows = [
        [1, *range(30, 34), *image(3), *range(40, 47), 2],
        [1, 50, *image(1), 51, 52, *image(3), *range(60, 68), 2],
        [1, *range(70, 80), 2],
    ]
    g = torch.Generator().manual_seed(seed)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
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


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_default_loss_and_every_gradient_equal_the_hf_models_own(internvl_path):
    model = build(internvl_path, use_activation_checkpointing=True)
    model.train()
    data = batch(internvl_path)
    ours = model(data, mode="loss")
    ours["loss"].backward()
    ours_grads = grads(model)
    model.zero_grad()
    # The HF model on the same batch, built naively: the tiles of the images used, in order.
    hf = model.llm
    ref = hf(
        input_ids=data["input_ids"],
        attention_mask=data["attention_mask"].long(),
        pixel_values=torch.cat(data["pixel_values"][:2]),
        labels=data["labels"],
    ).loss
    ref.backward()
    ref_grads = grads(model)
    assert ours["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert int(ours["num_tokens"]) == int((data["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(model.loss_denominators(data)["token"]) == int(ours["num_tokens"])
    assert ours_grads.keys() == ref_grads.keys()
    assert any("vision_tower" in k for k in ours_grads)
    assert any("multi_modal_projector" in k for k in ours_grads)
    for key, ref_grad in ref_grads.items():
        # (float32 summation order differs: tolerance relative to the tensor's largest entry)
        atol = max(1e-5 * float(ref_grad.abs().max()), 1e-8)
        torch.testing.assert_close(ours_grads[key], ref_grad, rtol=1e-5, atol=atol, msg=key)


def test_context_token_splice_layout_and_a_cut_image_is_an_error():
    ids = torch.tensor([[5, 9, 9, 6, 0], [9, 9, 9, 9, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    splice = ContextTokenSplice(ids, mask, image_token_id=9, tokens_per_image=2)
    assert splice.images_per_row.tolist() == [1, 2]
    i = IMAGE_TOKEN_INDEX
    assert splice.merged_ids(ids).tolist() == [[5, i, i, 6, 0], [i, i, i, i, 7]]
    assert splice.place(ids, -1).tolist() == [[5, -1, -1, 6, -1], [-1, -1, -1, -1, 7]]
    with pytest.raises(
        ValueError,
        match="sample 0 of the batch has 2 image-context tokens, not a multiple of the 3",
    ):
        ContextTokenSplice(ids, None, image_token_id=9, tokens_per_image=3)


def test_lora_on_each_side_and_what_trains(internvl_path):
    model = build(internvl_path, freeze_llm=True, llm_lora=LORA, visual_encoder_lora=LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert {n for n in lora if ".language_model." in n} and {
        n for n in lora if ".vision_tower." in n
    }
    assert all(".language_model." in n or ".vision_tower." in n for n in lora)
    assert trainable - lora == {
        n for n, _ in model.named_parameters() if "multi_modal_projector" in n
    }
    assert set(model.state_dict()) == trainable
    # Both adapters take part in the loss.
    model(batch(internvl_path), mode="loss")["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in lora)

    # LoRA on the LLM only: no adapter in the vision tower, which trains in full.
    llm_only = build(internvl_path, llm_lora=dict(LORA, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in llm_only.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    vision = {n for n, _ in llm_only.named_parameters() if ".vision_tower." in n}
    assert vision <= trainable

    frozen = build(internvl_path, freeze_llm=True, freeze_visual_encoder=True)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {
        n for n, _ in frozen.named_parameters() if "multi_modal_projector" in n
    }


def test_bad_model_paths_and_options_are_explained(internvl_path, tmp_path):
    with pytest.raises(ValueError, match="quantization_llm=True needs llm_lora"):
        InternVL_V1_5(internvl_path, quantization_llm=True)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        InternVL_V1_5(str(tmp_path))
    remote = tmp_path / "remote"
    remote.mkdir()
    config = {
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
    }
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        FileNotFoundError, match="code is not in the folder.*modeling_internvl_chat"
    ):
        InternVL_V1_5(str(remote), trust_remote_code=True)
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
        (remote / name).write_text("")
    with pytest.raises(ValueError, match="pass trust_remote_code=True"):
        InternVL_V1_5(str(remote))


def test_export_reloads_with_from_pretrained_and_gives_the_same_logits(internvl_path, tmp_path):
    model = build(internvl_path, llm_lora=LORA, visual_encoder_lora=LORA)
    model.eval()
    data = batch(internvl_path)
    model.to_hf(None, str(tmp_path / "hf"), fp32=True)
    reloaded = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ours = model(data, mode="tensor").logits
        theirs = reloaded(
            input_ids=data["input_ids"],
            attention_mask=data["attention_mask"].long(),
            pixel_values=torch.cat(data["pixel_values"][:2]),
        ).logits
    mask = data["attention_mask"]
    torch.testing.assert_close(theirs[mask], ours[mask], rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.context_image_token_id == reloaded.config.image_token_id
    assert osp.isfile(tmp_path / "hf" / "preprocessor_config.json")


@pytest.mark.slow
@pytest.mark.multiproc
def test_sequence_parallel_2_equals_1(internvl_path, tmp_path):
    """Loss and every gradient (LLM, projector, vision tower) with sp=2 equal sp=1."""
    check_sequence_parallel(internvl_path, tmp_path, ".vision_tower.")


def check_sequence_parallel(path, tmp_path, vision_key: str, *worker_args: str) -> None:
    """Runs internvl_sp_worker.py on 2 ranks and checks sp=2 against sp=1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "results.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += [osp.join(HERE, "internvl_sp_worker.py"), path, str(out), *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = torch.load(out, weights_only=False)
    assert set(results) == {"ce", "focal_sample"}
    for name, r in results.items():
        torch.testing.assert_close(r["sp_loss"], r["ref_loss"], rtol=1e-5, atol=1e-6, msg=name)
        # Ulysses attention on the text; the vision tower (tiles are not split) keeps its own.
        assert r["sp_kernels"] == {"text": PREFIX + "sdpa", "vision": "sdpa"}, r["sp_kernels"]
        assert r["sp_grads"].keys() == r["ref_grads"].keys()
        assert any(vision_key in k for k in r["ref_grads"])
        for key, ref in r["ref_grads"].items():
            atol = max(1e-5 * float(ref.abs().max()), 1e-7)
            torch.testing.assert_close(
                r["sp_grads"][key], ref, rtol=1e-4, atol=atol, msg=f"{name} {key}"
            )


# -- through the front door ------------------------------------------------------------------


def write_config(
    tmp_path,
    name,
    *,
    model_path,
    data_root,
    max_iters,
    lr="2e-3",
    freeze_llm=True,
    llm_lora="None",
    pretrained_pth="None",
    loss="",
    extra_hooks="",
    header="",
) -> str:
    with open(
        osp.join(HERE, "..", "tools", "upstream_style_internvl_config.py.tmpl"), encoding="utf-8"
    ) as f:
        text = f.read()
    text = text.format(
        model_path=model_path,
        data_root=data_root,
        max_iters=max_iters,
        lr=lr,
        freeze_llm=freeze_llm,
        llm_lora=llm_lora,
        pretrained_pth=pretrained_pth,
        loss=loss,
        extra_hooks=extra_hooks,
        header=header,
    )
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.slow_all
def test_xtuner_train_pretrain_then_finetune_with_focal_loss_and_export(internvl_path, tmp_path):
    """Stage 1 (projector only, default loss), then stage 2 from its checkpoint (LoRA,
    FocalLoss, HF export at the end): the projector trains, the loss falls, and the exported
    model (hook and ``xtuner convert pth_to_hf``) reloads with ``from_pretrained`` and gives
    the trained model's logits."""
    from mmengine.config import Config

    from xtuner.demo.internvl import write_internvl_data
    from xtuner.registry import BUILDER
    from xtuner.tools.model_converters.pth_to_hf import main as pth_to_hf

    data = write_internvl_data(str(tmp_path / "data"))
    root = osp.dirname(data["data"])
    common = dict(model_path=internvl_path, data_root=root)
    pre = write_config(tmp_path, "pretrain.py", max_iters=10, **common)
    out = run_xtuner("train", pre, "--work-dir", str(tmp_path / "pre"), "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(losses_of(str(tmp_path / "pre"))) == 10
    # Stage 1 trains the projector alone (which moves a random tiny LLM's loss little).
    stage1 = torch.load(tmp_path / "pre" / "iter_10.pth", weights_only=False)["state_dict"]
    assert stage1 and all(".multi_modal_projector." in k for k in stage1)
    initial = InternVLForConditionalGeneration.from_pretrained(internvl_path).state_dict()
    assert all(not torch.equal(v, initial[k.removeprefix("llm.")]) for k, v in stage1.items())

    pth = str(tmp_path / "pre" / "iter_10.pth")
    ft = write_config(
        tmp_path,
        "finetune.py",
        max_iters=10,
        lr="1e-2",
        freeze_llm=False,
        pretrained_pth=repr(pth),
        llm_lora="dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, "
        "target_modules=None, task_type='CAUSAL_LM')",
        loss=",\n    loss=dict(type='FocalLoss', gamma=2.0)",
        header="from xtuner.engine.hooks import HFCheckpointHook",
        extra_hooks="\n    dict(type=HFCheckpointHook),",
        **common,
    )
    out = run_xtuner("train", ft, "--work-dir", str(tmp_path / "ft"), "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"loaded {len(stage1)} weights from {pth}" in out.stdout + out.stderr
    losses = losses_of(str(tmp_path / "ft"))
    assert len(losses) == 10 and losses[-1] < 0.97 * losses[0], losses

    assert (
        pth_to_hf([ft, str(tmp_path / "ft" / "iter_10.pth"), str(tmp_path / "conv"), "--fp32"]) == 0
    )
    cfg = Config.fromfile(ft)
    cfg.model.pretrained_pth = None
    trained = BUILDER.build(cfg.model)
    trained.load_state_dict(
        torch.load(tmp_path / "ft" / "iter_10.pth", weights_only=False)["state_dict"],
        strict=False,
    )
    trained.eval()
    sample = batch(internvl_path)
    with torch.no_grad():
        want = trained(sample, mode="tensor").logits
        for folder in ("ft/hf_model", "conv"):
            hf = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / folder)).eval()
            got = hf(
                input_ids=sample["input_ids"],
                attention_mask=sample["attention_mask"].long(),
                pixel_values=torch.cat(sample["pixel_values"][:2]),
            ).logits
            mask = sample["attention_mask"]
            torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5, msg=folder)


def test_qlora_4bit_on_cpu_builds_and_trains_its_adapters(internvl_path):
    """``quantization_llm=True`` + ``llm_lora`` on CPU (bitsandbytes' CPU 4-bit kernels): the
    language model's Linear layers are 4-bit, a step gives a finite loss and a gradient on
    every adapter and the projector, and no 4-bit weight is trainable."""
    import bitsandbytes as bnb

    model = build(internvl_path, quantization_llm=True, llm_lora=LORA, freeze_visual_encoder=True)
    base = model.base_llm
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.model.language_model.modules())
    for unquantized in (base.model.vision_tower, base.model.multi_modal_projector, base.lm_head):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in unquantized.modules())
    model.train()
    out = model(batch(internvl_path), mode="loss")
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    got = grads(model)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(n in got and got[n].abs().sum() > 0 for n in lora)
    assert any("multi_modal_projector" in n for n in got)
    assert all("lora_" in n or "multi_modal_projector" in n for n in got), sorted(got)
