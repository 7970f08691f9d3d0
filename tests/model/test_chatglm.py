"""ChatGLM (remote code, XTuner 0.x's 49 ChatGLM configs): the chunked loss reads the head
``transformer.output_layer`` and turns ChatGLM2/3's sequence-first hidden states; the loss
and every gradient equal the remote code's own loss, in both layouts (ChatGLM2/3 and GLM-4),
with LoRA (upstream's, and on the head), and through ``xtuner train`` on an upstream-style
QLoRA config."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from tests.model.chatglm_remote import build_chatglm
from tests.model.test_dpo import batch_of, make_pairs
from tests.model.test_families import assert_equals_hf, naive_focal, total
from tests.tools.test_config_matrix import LORA, QUANT_4BIT
from tests.tools.test_train_cli import losses_of, run_xtuner, write_config
from xtuner.model import SupervisedFinetune
from xtuner.model.losses import HeadMismatchError
from xtuner.model.losses.head import HiddenLayout, linear_head
from xtuner.model.reward import RewardModel
from xtuner.registry import HEAD_ADAPTERS

LAYOUTS = {"chatglm3_sequence_first": False, "glm4_batch_first": True}


@pytest.fixture(scope="module")
def chatglm_paths(demo_assets, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("chatglm")
    return {
        name: build_chatglm(str(root / name), demo_assets["tokenizer"], batch_first=first)
        for name, first in LAYOUTS.items()
    }


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)


def glm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 20 tokens (not square: the layout shows in the shape), the second padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 14:] = -100
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_default_loss_and_gradients_equal_chatglm_own_loss(chatglm_paths, layout):
    model = SupervisedFinetune(load(chatglm_paths[layout]), use_activation_checkpointing=False)
    head = model.output_head()
    assert head.adapter == "chatglm"
    assert head.module is model.llm.transformer.output_layer
    assert head.layout.sequence_first is (not LAYOUTS[layout])  # learned by the build probe
    assert_equals_hf(model, glm_batch())


def test_focal_loss_equals_naive_focal_on_chatglm_logits(chatglm_paths):
    model = SupervisedFinetune(
        load(chatglm_paths["chatglm3_sequence_first"]),
        use_activation_checkpointing=False,
        loss=dict(type="FocalLoss", gamma=2.0),
    )
    data = glm_batch(1)
    ours = total(model(data, mode="loss"))
    ref = naive_focal(model.llm(input_ids=data["input_ids"]).logits, data["labels"], 2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_upstream_lora_leaves_the_head_out_and_lora_on_the_head_equals_peft(chatglm_paths):
    path = chatglm_paths["chatglm3_sequence_first"]
    # XTuner's ChatGLM configs give no target_modules: every linear layer but the head.
    upstream = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.1, bias="none")
    model = SupervisedFinetune(load(path), lora=upstream, use_activation_checkpointing=False)
    targets = set(model.llm.peft_config["default"].target_modules)
    assert targets == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    on_head = dict(
        type=LoraConfig,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["query_key_value", "output_layer"],
    )
    model = SupervisedFinetune(load(path), lora=on_head, use_activation_checkpointing=False)
    assert_equals_hf(model, glm_batch())
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "output_layer" in n]
    assert trained, "the head's adapter must be trained"


def test_an_adapter_that_ignores_the_layout_is_caught_by_the_probe(chatglm_paths):
    # Without the layout, the head would read [S, B, H] as [B, S, H]: the probe refuses.
    HEAD_ADAPTERS.register_module(
        name="ChatGLMForConditionalGeneration",
        module=lambda m: linear_head(m, module=m.transformer.output_layer),
    )
    try:
        with pytest.raises(HeadMismatchError, match="ChatGLMForConditionalGeneration.*shape"):
            SupervisedFinetune(
                load(chatglm_paths["chatglm3_sequence_first"]), use_activation_checkpointing=False
            )
    finally:
        HEAD_ADAPTERS.module_dict.pop("ChatGLMForConditionalGeneration")
    model = SupervisedFinetune(
        load(chatglm_paths["chatglm3_sequence_first"]),
        use_activation_checkpointing=False,
        loss=dict(type="CrossEntropyLoss", head="model"),
    )
    assert_equals_hf(model, glm_batch())


def test_reward_model_on_chatglm_scores_as_in_the_batch_first_layout(chatglm_paths):
    """Both stand-ins hold the same weights: a reward model scores alike on either layout, and
    equals the value head on the backbone's own (batch-first) hidden states."""
    data = batch_of(make_pairs(reward_token=7), "padded")
    scores, losses = [], []
    for layout in LAYOUTS:
        model = RewardModel(load(chatglm_paths[layout]), use_activation_checkpointing=False)
        with torch.no_grad():
            model.v_head.weight.copy_(torch.linspace(-1, 1, model.v_head.weight.numel()))
        scores.append(model(data, mode="tensor"))
        losses.append(model(data)["loss_rank"])
    glm4 = model.llm.transformer(
        input_ids=data["input_ids"], attention_mask=data["attention_mask"]
    ).last_hidden_state
    torch.testing.assert_close(scores[1], model.v_head(glm4).squeeze(-1))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_varlen_attention_is_refused_for_chatglm(chatglm_paths):
    # Its attention is causal over the whole row: packed documents would see each other.
    with pytest.raises(ValueError, match="use_varlen_attn=True.*attend each other"):
        SupervisedFinetune(
            load(chatglm_paths["chatglm3_sequence_first"]),
            use_varlen_attn=True,
            use_activation_checkpointing=False,
        )


def test_hidden_layout_learns_from_shapes_and_refuses_to_guess():
    layout = HiddenLayout()
    square = torch.zeros(3, 3, 8)
    with pytest.raises(ValueError, match="cannot tell.*head='model'"):
        layout(square, 3, 3)
    hidden = torch.arange(2 * 5 * 4.0).view(5, 2, 4)  # [S, B, H]
    torch.testing.assert_close(layout(hidden, 2, 5), hidden.transpose(0, 1))
    assert layout.sequence_first is True
    assert layout(square, 3, 3) is not square  # once learned, square batches follow it
    with pytest.raises(ValueError, match=r"shape \(5, 2, 4\) for 3 rows of 4 tokens"):
        layout(hidden, 3, 4)


@pytest.mark.slow
def test_upstream_style_chatglm_qlora_config_trains(chatglm_paths, demo_assets, tmp_path):
    """An XTuner 0.x ChatGLM3 QLoRA config (remote code, 4-bit, upstream's LoRA), by
    ``xtuner train``: it builds (the probe passes), trains with finite losses, and the
    gradient reaches the adapters (LoRA's B matrices start at zero and move). Then the user's
    next steps: ``convert pth_to_hf`` writes the adapter, ``convert merge`` asks for
    ``--trust-remote-code`` and with it writes a model whose logits are the base model's with
    the adapter applied (peft's own forward)."""
    assets = {"model": chatglm_paths["chatglm3_sequence_first"], "data": demo_assets["data"]}
    config = write_config(
        tmp_path,
        assets,
        max_iters=4,
        save_steps=4,
        torch_dtype="torch.float16",
        quantization=QUANT_4BIT,
        lora=LORA,
    )
    work = tmp_path / "work"
    out = run_xtuner("train", config, "--work-dir", str(work), "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    losses = losses_of(str(work))
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses), losses
    state = torch.load(work / "iter_4.pth", map_location="cpu", weights_only=False)["state_dict"]
    lora_b = {k: v for k, v in state.items() if "lora_B" in k}
    assert any("query_key_value" in k for k in lora_b) and not any(
        "output_layer" in k for k in state
    )
    assert all(float(v.abs().max()) > 0 for v in lora_b.values())

    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    out = run_xtuner("convert", "pth_to_hf", config, str(work / "iter_4.pth"), adapter)
    assert out.returncode == 0, out.stderr[-3000:]
    base_path = assets["model"]
    out = run_xtuner("convert", "merge", base_path, adapter, merged)
    assert out.returncode != 0 and "add --trust-remote-code" in out.stderr, out.stderr[-2000:]
    out = run_xtuner("convert", "merge", base_path, adapter, merged, "--trust-remote-code")
    assert out.returncode == 0, out.stderr[-3000:]
    ids = glm_batch()["input_ids"]
    with torch.no_grad():
        ours = load(merged)(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(load(base_path), adapter)(input_ids=ids).logits
        base = load(base_path)(input_ids=ids).logits
    torch.testing.assert_close(ours, with_adapter, rtol=1e-4, atol=1e-5)
    assert float((ours - base).abs().max()) > 1e-4  # the adapter is in the merged weights
