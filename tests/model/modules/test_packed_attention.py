"""Flex-attention for packed documents: packed documents equal each document alone (CPU, no
gradients: torch's FlexAttention has no CPU backward), a training step with flex on the CPU is
refused with the way out, a family without flex support gets transformers' error."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.model.test_families import COMMON, documents, family_llm, packed_batch, total
from xtuner.model import SupervisedFinetune
from xtuner.model.modules.packed_attention import check_trainable_attention

REFUSAL = r"attn_implementation='flex_attention', which cannot train on the CPU"


def flex_model(family: str, **kwargs) -> SupervisedFinetune:
    llm = family_llm(family)
    llm.set_attn_implementation("flex_attention")
    return SupervisedFinetune(llm, use_activation_checkpointing=False, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen2_tied", "mistral", "gemma2"])
def test_flex_packed_documents_equal_each_document_alone(family, uncompiled_flex):
    """Two packed rows of two documents each (batch 2) on flex-attention, no gradients (torch
    has no CPU backward for flex): the per-document loss of SupervisedFinetune (labels on one
    document at a time) and the whole loss equal the model's own loss of each document alone
    on eager attention; flex really ran, with a BlockMask."""
    from torch.nn.attention.flex_attention import BlockMask

    model = flex_model(family, use_varlen_attn=True)
    assert not uncompiled_flex  # the build-time probes ran on sdpa (CPU)
    model.eval()
    docs = documents()
    packed = packed_batch(docs)
    starts = (packed["position_ids"] == 0).nonzero().tolist()  # (row, start) of each document
    with torch.no_grad():
        whole = total(model(packed, mode="loss"))
        assert uncompiled_flex and all(isinstance(m, BlockMask) for m in uncompiled_flex)
        per_doc = []
        for (row, start), doc in zip(starts, docs):
            labels = torch.full_like(packed["labels"], -100)
            labels[row, start : start + len(doc)] = doc
            per_doc.append(total(model({**packed, "labels": labels}, mode="loss")))
        model.llm.set_attn_implementation("eager")
        alone = [model.llm(input_ids=d[None], labels=d[None]).loss for d in docs]
    for ours, ref in zip(per_doc, alone):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    counts = torch.tensor([len(d) - 1 for d in docs], dtype=torch.float32)
    mean = (torch.stack(alone) * counts).sum() / counts.sum()
    torch.testing.assert_close(whole, mean, rtol=1e-5, atol=1e-6)


def test_flex_training_on_the_cpu_is_refused_before_the_forward():
    """The step is refused before flex compiles (the model is switched to flex after the
    build, so nothing compiles here at all); without gradients it would run."""
    model = SupervisedFinetune(family_llm("llama"), use_activation_checkpointing=False)
    model.llm.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=REFUSAL) as info:
        model(packed_batch(documents()), mode="loss")
    message = str(info.value)
    assert "LlamaForCausalLM" in message
    assert "on a CUDA GPU" in message and "attn_implementation='sdpa'" in message


def test_refusal_needs_flex_gradients_and_the_cpu():
    llm = family_llm("llama")
    inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    check_trainable_attention(llm, inputs)  # sdpa trains on the CPU
    llm.set_attn_implementation("flex_attention")
    with torch.no_grad():
        check_trainable_attention(llm, inputs)
    check_trainable_attention(
        llm, {"input_ids": torch.zeros(1, 4, dtype=torch.long, device="meta")}
    )
    embeds = torch.zeros(1, 4, COMMON["hidden_size"], requires_grad=True)
    llm.requires_grad_(False)
    check_trainable_attention(llm, inputs)  # nothing to train
    with pytest.raises(ValueError, match=REFUSAL):
        check_trainable_attention(llm, {"inputs_embeds": embeds})
    llm.model.layers[0].self_attn.q_proj.requires_grad_(True)
    with pytest.raises(ValueError, match=REFUSAL):
        check_trainable_attention(llm, inputs)


def test_varlen_probe_refuses_a_flex_model_that_lets_documents_attend_each_other(monkeypatch):
    """The build-time packing probe (run on sdpa for a flex model on the CPU) still catches
    documents attending each other (here transformers' masking functions no longer find the
    packed documents, for every kernel), and names the kernel the model trains with."""
    import transformers.masking_utils as masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    llm = family_llm("llama")
    llm.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' lets packed"):
        SupervisedFinetune(llm, use_activation_checkpointing=False, use_varlen_attn=True)
    assert llm.config._attn_implementation == "flex_attention"


def test_flex_on_a_family_without_flex_support_gets_transformers_error():
    config = transformers.StableLmConfig(**{**COMMON, "num_key_value_heads": 4})
    llm = dict(type=AutoModelForCausalLM.from_config, config=config)
    with pytest.raises(ValueError, match="StableLmForCausalLM does not support.*flex_attention"):
        SupervisedFinetune(llm={**llm, "attn_implementation": "flex_attention"})
