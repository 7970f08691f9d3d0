"""Knowledge distillation against a tiny Llama teacher, checked with full teacher logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from xtuner.demo import tiny_llama_config
from xtuner.model.losses import KDLoss, LossInputError, build_loss

from .reference import check_against, make_case, run_loss

VOCAB = 13
TEACHER = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher"))
    LlamaForCausalLM(tiny_llama_config(VOCAB, **TEACHER)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)


def naive_kd(teacher_logits, divergence, temperature, beta, ce_weight):
    def fn(logits, targets):
        log_p = (logits / temperature).log_softmax(-1)
        log_q = (teacher_logits.to(logits.dtype) / temperature).log_softmax(-1)
        if divergence == "forward_kl":
            div = (log_q.exp() * (log_q - log_p)).sum(-1)
        elif divergence == "reverse_kl":
            div = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            mix = torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)])
            log_m = mix.logsumexp(0)
            div = beta * (log_q.exp() * (log_q - log_m)).sum(-1)
            div = div + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1)
        out = (1 - ce_weight) * temperature**2 * div
        if ce_weight:
            ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            out = out + ce_weight * ce
        return out

    return fn


def _batch(case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, case.labels.shape, generator=gen)
    return {"input_ids": input_ids, "position_ids": case.position_ids}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.3)])
def test_kd_against_full_teacher_logits(teacher, layout, dtype, divergence, temperature, ce_weight):
    teacher.to(dtype)
    case = make_case(layout, dtype, vocab=VOCAB)
    batch = _batch(case)
    loss = KDLoss(
        teacher,
        divergence=divergence,
        temperature=temperature,
        beta=0.3,
        ce_weight=ce_weight,
        chunk_size=7,
    )
    extras = loss.extra_inputs(batch, case.labels)
    with torch.no_grad():
        # use_cache=False, as in training: packed documents do not attend to each other.
        teacher_logits = teacher(**batch, use_cache=False).logits.double()
    naive = naive_kd(teacher_logits, divergence, temperature, 0.3, ce_weight)
    check_against(loss, naive, case, "token", extras)
    teacher.to(torch.float64)


def test_kd_terms_are_named_and_weighted(teacher):
    case = make_case("padded", vocab=VOCAB)
    loss = KDLoss(teacher, ce_weight=0.25)
    result = run_loss(loss, case, loss.extra_inputs(_batch(case), case.labels))
    assert {"loss_kd", "loss_ce", "acc", "num_tokens"} == set(result)
    assert loss.term_names() == ["kd", "ce"]


def test_teacher_from_config_is_frozen_and_not_a_submodule(teacher_dir):
    loss = build_loss(
        dict(
            type="KDLoss",
            teacher=dict(
                type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=teacher_dir
            ),
        )
    )
    assert isinstance(loss.teacher, LlamaForCausalLM)
    assert list(loss.parameters()) == [] and len(loss.state_dict()) == 0
    assert all(not p.requires_grad for p in loss.teacher.parameters())
    assert not loss.teacher.training
    loss.train()
    assert not loss.teacher.training
    model = torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2), "loss": loss})
    assert len(list(model.parameters())) == 2  # what an optimizer would get: no teacher
    assert set(model.state_dict()) == {"head.weight", "head.bias"}
    model.to(torch.float64)  # dtype and device moves reach the teacher
    assert next(loss.teacher.parameters()).dtype == torch.float64


def test_vocabulary_mismatch_is_a_clear_error():
    teacher = LlamaForCausalLM(tiny_llama_config(VOCAB + 3, **TEACHER)).double()
    case = make_case("padded", vocab=VOCAB)
    loss = KDLoss(teacher)
    with pytest.raises(
        LossInputError, match="vocabulary \\(16\\) differs from the student's \\(13\\)"
    ):
        run_loss(loss, case, loss.extra_inputs(_batch(case), case.labels))


def test_bad_options_and_teacher():
    teacher = LlamaForCausalLM(tiny_llama_config(VOCAB, **TEACHER))
    with pytest.raises(ValueError, match="divergence"):
        KDLoss(teacher, divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        KDLoss(teacher, divergence="jsd", beta=1.0)
    with pytest.raises(TypeError, match="teacher must be"):
        KDLoss(torch.nn.Linear(2, 2))

    class HeadOnly(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Linear(2, VOCAB)

    loss = KDLoss(HeadOnly())
    with pytest.raises(TypeError, match="cannot find the decoder of the teacher"):
        loss.extra_inputs({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, None)
