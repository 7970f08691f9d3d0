"""The chunked token-loss machinery: chunking, gradients in forward, memory, term naming."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from xtuner.model.losses import (
    BaseLoss,
    CompositeLoss,
    CrossEntropyLoss,
    DFTLoss,
    EntropyRegularization,
    FocalLoss,
    KDLoss,
    LossContext,
    LossInputError,
    LossOutput,
    LossTerm,
    TokenLoss,
    TokenWeightedCELoss,
    ZLoss,
    compute_weights,
    finalize_loss,
)

from .reference import assert_close_all, check_against, grads, make_case, run_loss, total


class SquaredProbLoss(TokenLoss):
    """A user-style token loss (autograd path), returning two named terms."""

    def token_loss(self, logits, targets, extras):
        probs = logits.softmax(-1)
        target_p = probs.gather(1, targets[:, None]).squeeze(1)
        return {"brier": (1 - target_p) ** 2, "peak": probs.amax(-1)}


class TinyTeacher(nn.Module):
    """The smallest module KDLoss accepts as a teacher: an output head."""

    def __init__(self, dim: int, vocab: int, dtype=torch.float64):
        super().__init__()
        self.head = nn.Linear(dim, vocab, bias=False, dtype=dtype)

    def get_output_embeddings(self):
        return self.head


def _builtins(chunk_size: int, vocab: int, dim: int, teacher: TinyTeacher | None = None):
    teacher = teacher or TinyTeacher(dim, vocab)
    return [
        CrossEntropyLoss(chunk_size=chunk_size, label_smoothing=0.1),
        FocalLoss(chunk_size=chunk_size, gamma=1.5),
        DFTLoss(chunk_size=chunk_size),
        ZLoss(chunk_size=chunk_size),
        EntropyRegularization(chunk_size=chunk_size),
        KDLoss(teacher, chunk_size=chunk_size, divergence="jsd", temperature=2.0, ce_weight=0.3),
        SquaredProbLoss(chunk_size=chunk_size),
    ]


def _teacher_extras(loss, case):
    if not isinstance(loss, KDLoss):
        return None
    gen = torch.Generator().manual_seed(1)
    dim = loss.teacher.head.in_features
    hidden = torch.randn(*case.labels.shape, dim, generator=gen, dtype=torch.float64)
    return {loss.teacher_key: hidden}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_equals_unchunked(layout):
    teacher = TinyTeacher(6, 13)
    for chunk in (1, 3, 7):
        for full, chunked in zip(_builtins(0, 13, 6, teacher), _builtins(chunk, 13, 6, teacher)):
            case = make_case(layout, bias=True)
            extras = _teacher_extras(full, case)
            a = total(run_loss(full, case, extras))
            b = total(run_loss(chunked, case, extras))
            assert_close_all([b, *grads(b, case)], [a, *grads(a, case)])


def test_gradcheck_chunked_path():
    for loss in _builtins(2, 5, 3):
        if isinstance(loss, DFTLoss):
            continue  # its stop-gradient makes the gradient differ from finite differences
        case = make_case("packed", vocab=5, dim=3, bias=True)
        extras = _teacher_extras(loss, case)

        def fn(hidden, weight, bias, loss=loss, case=case, extras=extras):
            case.hidden, case.weight, case.bias = hidden, weight, bias
            return total(run_loss(loss, case, extras))

        inputs = (case.hidden, case.weight, case.bias)
        ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, fast_mode=True)
        assert ok, type(loss).__name__


def test_user_token_loss_against_naive():
    def naive(logits, targets):
        probs = logits.softmax(-1)
        target_p = probs.gather(-1, targets[..., None]).squeeze(-1)
        return (1 - target_p) ** 2 + probs.amax(-1)

    for reduction in ("token", "sample", "square"):
        case = make_case("packed")
        check_against(SquaredProbLoss(chunk_size=3, reduction=reduction), naive, case, reduction)


def test_term_names_of_a_multi_term_loss():
    result = run_loss(SquaredProbLoss(chunk_size=4), make_case("padded"))
    assert {"loss_brier", "loss_peak", "acc", "num_tokens"} == set(result)
    single = run_loss(CrossEntropyLoss(), make_case("padded"))
    assert {"loss", "acc", "num_tokens"} == set(single)


class SequenceNLL(BaseLoss):
    """A full loss (the docs' example): each row's summed NLL, averaged over rows."""

    default_name = "seq_nll"

    def forward(self, ctx: LossContext) -> LossOutput:
        logits = F.linear(ctx.hidden_states, ctx.head_weight, ctx.head_bias).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ctx.labels, reduction="none")
        has_target = (ctx.labels != -100).any(-1)
        value = nll.sum(-1)[has_target].sum()
        rows = has_target.sum().to(value)
        return self.make_output(ctx, {self.name: LossTerm(value, denominator=rows)})


def test_full_loss_with_its_own_denominator():
    case = make_case("padded")
    result = run_loss(SequenceNLL(), case)
    logits = F.linear(case.hidden, case.weight)
    nll = F.cross_entropy(logits.transpose(1, 2), case.labels, reduction="none")
    expected = nll.sum(-1)[:2].mean()  # the third row has no target
    assert_close_all(
        [result["loss"], *grads(result["loss"], case)], [expected, *grads(expected, case)]
    )
    combined = run_loss(CompositeLoss([SequenceNLL(), CrossEntropyLoss()]), case)
    assert {"loss_seq_nll", "loss_ce"} <= set(combined)


def test_every_position_valid_matches_gathered():
    case = make_case("padded")
    case.labels = case.labels.clamp_min(0)  # every position has a target: the view path
    naive = lambda z, y: F.cross_entropy(z.transpose(1, 2), y, reduction="none")  # noqa: E731
    check_against(CrossEntropyLoss(chunk_size=5), naive, case, "token")


def test_metrics_count_tokens_and_accuracy():
    case = make_case("padded")
    result = run_loss(CrossEntropyLoss(chunk_size=2), case)
    logits = F.linear(case.hidden, case.weight)
    valid = case.labels != -100
    correct = (logits.argmax(-1) == case.labels)[valid].float().mean()
    assert result["num_tokens"].item() == valid.sum().item()
    torch.testing.assert_close(result["acc"].double(), correct.double())


def test_no_valid_token_gives_zero_loss_and_zero_gradients():
    case = make_case("padded", dtype=torch.float32)
    case.labels[:] = -100
    for reduction in ("token", "sample"):
        result = run_loss(CrossEntropyLoss(reduction=reduction), case)
        value = total(result)
        assert value.item() == 0.0 and result["num_tokens"].item() == 0
        assert all(bool((g == 0).all()) for g in grads(value, case))


def test_second_backward_through_the_same_graph_recomputes():
    case = make_case("packed")
    value = total(run_loss(FocalLoss(chunk_size=3), case))
    first = torch.autograd.grad(value, case.leaves(), retain_graph=True)
    second = torch.autograd.grad(value, case.leaves())
    assert_close_all(list(second), list(first))


def test_terms_of_one_pass_need_equal_output_gradients():
    case = make_case("padded")
    result = run_loss(SquaredProbLoss(chunk_size=3), case)
    with pytest.raises(RuntimeError, match="back-propagated together"):
        (result["loss_brier"] + 2 * result["loss_peak"]).backward()


def test_bfloat16_head_matches_the_hf_style_path():
    # HF computes bfloat16 logits and upcasts them for the loss; so does the chunked loss.
    case = make_case("padded", dtype=torch.bfloat16, vocab=50, dim=16)
    value = total(run_loss(CrossEntropyLoss(chunk_size=4), case))
    ref = make_case("padded", dtype=torch.bfloat16, vocab=50, dim=16)
    logits = F.linear(ref.hidden, ref.weight).float()
    expected = F.cross_entropy(logits.transpose(1, 2), ref.labels)
    torch.testing.assert_close(value.float(), expected, rtol=1e-3, atol=1e-3)
    for got, exp in zip(grads(value, case), grads(expected, ref)):
        assert got.dtype == torch.bfloat16
        scale = float(exp.abs().max())
        torch.testing.assert_close(got.float(), exp.float(), rtol=2e-2, atol=1e-2 * scale)


def test_missing_batch_field_names_it_and_the_data_option():
    loss = TokenWeightedCELoss()
    with pytest.raises(LossInputError, match="'loss_weight'.*loss_weight.*collate"):
        loss.extra_inputs({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, torch.zeros(1, 3))


def test_target_outside_the_vocabulary_is_a_clear_error():
    case = make_case("padded", vocab=7)
    case.labels[0, 3] = 9
    with pytest.raises(LossInputError, match="label id 9 is outside.*\\[0, 7\\)"):
        run_loss(CrossEntropyLoss(), case)


# -- memory ---------------------------------------------------------------------------------


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage made by the ops run under it (forward and backward).

    Every op's outputs are recorded with a weak reference to their storage; a storage counts
    until it is freed. This is exact and repeatable, unlike the resident set, whose counters
    the kernel keeps per CPU and reports approximately (off by megabytes on some machines).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@pytest.fixture
def peak_probe():
    """Measures the peak tensor memory a function allocates (on its second call), in MiB."""

    def probe(fn) -> float:
        fn()  # first calls allocate once for good (lazy initialisation)
        gc.collect()
        tracker = LiveTensorPeak()
        with tracker:
            fn()
        return tracker.peak / 2**20

    return probe


def _loss_step(loss, tokens: int, vocab: int, dim: int, teacher_dim: int = 16):
    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * dim**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    extras = {}
    if isinstance(loss, KDLoss):
        extras = {loss.teacher_key: torch.randn(1, tokens, teacher_dim)}

    def step():
        hidden.grad = weight.grad = None
        weights = compute_weights(loss.weight_specs(), labels)
        ctx = LossContext(hidden, weight, None, labels, weights, extras)
        total(finalize_loss(loss(ctx), weights)).backward()

    return step


def test_peak_memory_does_not_grow_with_tokens_times_vocab(peak_probe):
    vocab, dim, rows = 16384, 16, 64
    chunk_mib = rows * vocab * 4 / 2**20  # one chunk of float32 logits: 4 MiB
    head_grad_mib = vocab * dim * 4 / 2**20  # 1 MiB
    full, chunked = {}, {}
    for n in (512, 2048):
        full[n] = peak_probe(_loss_step(CrossEntropyLoss(chunk_size=0), n, vocab, dim))
        chunked[n] = peak_probe(_loss_step(CrossEntropyLoss(chunk_size=rows), n, vocab, dim))
    # The probe sees the full logits (32 and 128 MiB) ...
    assert full[2048] - full[512] > 80, full
    # ... and the chunked loss stays at one chunk plus the head's gradient, at any length.
    assert chunked[2048] < chunk_mib + head_grad_mib + 3, chunked
    assert chunked[2048] - chunked[512] < 2, chunked


def test_every_builtin_stays_within_its_chunk(peak_probe):
    vocab, dim, rows = 16384, 16, 64
    bound = rows * vocab * 4 / 2**20 * 1.25 + vocab * dim * 4 / 2**20 + 3
    teacher = TinyTeacher(16, vocab, dtype=torch.float32)
    losses = [
        CrossEntropyLoss(chunk_size=rows, label_smoothing=0.1),
        FocalLoss(chunk_size=rows),
        DFTLoss(chunk_size=rows),
        ZLoss(chunk_size=rows),
        EntropyRegularization(chunk_size=rows),
        KDLoss(teacher, chunk_size=rows, divergence="reverse_kl", ce_weight=0.5),
        KDLoss(teacher, chunk_size=rows, divergence="jsd", ce_weight=0.5),
    ]
    for loss in losses:
        peak = peak_probe(_loss_step(loss, 256, vocab, dim))
        assert peak < bound, (loss, peak, bound)
