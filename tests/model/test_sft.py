"""SupervisedFinetune: building (full, LoRA, QLoRA), loss equal to HF's, checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from xtuner.engine.hooks.evaluate_chat_hook import keep_4bit_weights_trainable
from xtuner.model import SupervisedFinetune
from xtuner.model.sft import shift_labels


def llm_cfg(path, **kw):
    return dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=path, **kw)


def qlora_llm(path):
    quant = dict(
        type=BitsAndBytesConfig,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return llm_cfg(path, dtype=torch.float32, quantization_config=quant)


LORA = dict(type="peft.LoraConfig", r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False)


def batch(seed=0, vocab=500):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 15:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [None, LORA])
def test_default_loss_equals_hf_loss_and_gradients(tiny_llama_path, lora):
    torch.manual_seed(0)
    model = SupervisedFinetune(
        llm_cfg(tiny_llama_path, torch_dtype=torch.float32),
        lora=lora,
        use_activation_checkpointing=False,
    )
    data = batch()
    ours = model(data, mode="loss")
    ours["loss"].backward()
    ours_grads = trainable_grads(model)
    model.zero_grad()
    ref = model.llm(**data).loss
    ref.backward()
    ref_grads = trainable_grads(model)
    assert ours["loss"].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    assert int(ours["num_tokens"]) == int((data["labels"][:, 1:] != -100).sum())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_gives_same_gradients(tiny_llama_path):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SupervisedFinetune(
            llm_cfg(tiny_llama_path), lora=LORA, use_activation_checkpointing=checkpointing
        )
        model.train()
        model(batch(), mode="loss")["loss"].backward()
        grads.append(trainable_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_lora_state_dict_is_adapter_only_and_reloads(tiny_llama_path, tmp_path):
    torch.manual_seed(0)
    model = SupervisedFinetune(llm_cfg(tiny_llama_path), lora=LORA)
    state = model.state_dict()
    assert state and all("lora_" in key for key in state)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    path = tmp_path / "adapter.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    fresh = SupervisedFinetune(llm_cfg(tiny_llama_path), lora=LORA)
    data = batch()
    assert fresh(data)["loss"].item() != pytest.approx(model(data)["loss"].item())
    missing, unexpected = fresh.load_state_dict(torch.load(path), strict=False)
    assert not unexpected
    assert fresh(data)["loss"].item() == pytest.approx(model(data)["loss"].item(), rel=1e-6)


def test_qlora_forward_backward_reaches_adapters(tiny_llama_path):
    model = SupervisedFinetune(
        qlora_llm(tiny_llama_path), lora=LORA, use_activation_checkpointing=False
    )
    assert getattr(model.base_llm, "is_loaded_in_4bit", False)
    out = model(batch())
    out["loss"].backward()
    grads = trainable_grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_qlora_gradients_unchanged_by_generation_before_training(tiny_llama_path, tokenizer):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel with no backward; on
    CPUs with avx512_bf16 it does so during generation. Force that path on every CPU and
    check EvaluateChatHook's guard keeps the gradients exact (and that without it they are
    not: the test can fail)."""

    def grads_after(generate_with_guard: bool | None):
        torch.manual_seed(0)
        model = SupervisedFinetune(
            qlora_llm(tiny_llama_path), lora=LORA, use_activation_checkpointing=False
        )
        if generate_with_guard is not None:
            for module in model.llm.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = True
            model.llm.eval()
            ids = tokenizer("Reverse the word.", return_tensors="pt").input_ids
            with torch.no_grad():
                if generate_with_guard:
                    with keep_4bit_weights_trainable(model.llm):
                        model.llm.generate(ids, max_new_tokens=3)
                else:
                    model.llm.generate(ids, max_new_tokens=3)
            for module in model.llm.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
        model.train()
        model(batch())["loss"].backward()
        return torch.cat([g.flatten() for g in trainable_grads(model).values()])

    reference = grads_after(None)
    torch.testing.assert_close(grads_after(True), reference, rtol=0, atol=0)
    assert not torch.allclose(grads_after(False), reference)


def test_max_position_embeddings_adds_linear_rope_scaling(tiny_llama_path):
    model = SupervisedFinetune(llm_cfg(tiny_llama_path), max_position_embeddings=1200)
    config = model.llm.config
    assert config.max_position_embeddings == 1200
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 3.0  # ceil(1200 / 512)


def test_tokenizer_resizes_embeddings_to_multiple_of_64(tiny_llama_path, tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    model = SupervisedFinetune(llm_cfg(tiny_llama_path), tokenizer=tokenizer)
    rows = model.llm.get_input_embeddings().weight.shape[0]
    assert rows >= len(tokenizer) and rows % 64 == 0


def test_shift_labels_never_crosses_packed_documents():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_labels(labels, positions).tolist() == [[2, 3, -100, 5, 6, -100]]
    assert shift_labels(labels).tolist() == [[2, 3, 4, 5, 6, -100]]


def test_forward_modes(tiny_llama_path):
    model = SupervisedFinetune(llm_cfg(tiny_llama_path), use_activation_checkpointing=False)
    data = batch()
    assert model(data, mode="tensor").logits.shape[:2] == data["input_ids"].shape
    assert len(model(data, mode="predict")) == 2
    with pytest.raises(ValueError, match="mode"):
        model(data, mode="nope")


def test_missing_model_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SupervisedFinetune(llm_cfg(str(tmp_path / "nope")))


def test_skipped_step_gives_zero_gradients_without_nan(tiny_llama_path):
    # An Inf inside the backbone: every later activation is non-finite, so a zero that
    # back-propagated through them would give NaN gradients (0 * inf).
    model = SupervisedFinetune(
        llm_cfg(tiny_llama_path, torch_dtype=torch.float32),
        use_activation_checkpointing=False,
        loss=dict(type="CrossEntropyLoss", nonfinite="skip"),
    )

    def plant_inf(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, 8, 0] = float("inf")

    model.backbone().layers[0].register_forward_hook(plant_inf)
    out = model(batch(), mode="loss")
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool((param.grad == 0).all()), name
