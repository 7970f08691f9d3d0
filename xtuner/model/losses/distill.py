"""Knowledge distillation from a frozen teacher built from config."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.config import ConfigDict
from torch import Tensor, nn

from xtuner.registry import BUILDER, LOSSES

from .base import LossInputError, TokenLoss
from .cross_entropy import cross_entropy_and_grad_
from .functional import kl_rows, linear_into, log_softmax_, row_dot, scratch
from .head import build_output_head

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@LOSSES.register_module()
class KDLoss(TokenLoss):
    """Distillation from a frozen teacher, optionally mixed with cross-entropy.

    With ``P = softmax(z_student / T)`` and ``Q = softmax(z_teacher / T)``:

    * ``forward_kl``: ``D = KL(Q || P) = sum_v Q_v (log Q_v - log P_v)`` (Hinton et al.,
      "Distilling the Knowledge in a Neural Network", arXiv 1503.02531);
    * ``reverse_kl``: ``D = KL(P || Q)`` (mode-seeking; Gu et al., MiniLLM, arXiv 2306.08543);
    * ``jsd``: generalised Jensen-Shannon ``D = beta KL(Q || M) + (1 - beta) KL(P || M)``
      with ``M = beta Q + (1 - beta) P`` (Agarwal et al., GKD, arXiv 2306.13649).

    Per token: ``kd_t = (1 - ce_weight) * T^2 * D_t`` (``T^2`` keeps gradient magnitudes
    comparable across temperatures) and, when ``ce_weight > 0``, ``ce_t = ce_weight * CE_t``
    (at temperature 1), logged as ``loss_<name>`` and ``loss_ce``.

    The teacher runs once per batch under ``no_grad`` in :meth:`extra_inputs`, before any
    sequence-parallel split, and hands over only its final hidden states; its logits are
    computed chunk by chunk with its own output head, never for all tokens at once. The
    teacher is not a submodule: it stays out of ``state_dict()``, ``parameters()`` and the
    optimizer, but follows ``.to()``, ``.cuda()``, ``.half()`` of the model.

    Args:
        teacher: an HF causal LM (or any module with ``get_output_embeddings()`` and a
            decoder returning ``last_hidden_state``), or its config, built with
            ``xtuner.registry.BUILDER`` (e.g. ``dict(type=AutoModelForCausalLM.from_pretrained,
            pretrained_model_name_or_path=...)``). It must share the student's vocabulary.
        divergence: ``'forward_kl'``, ``'reverse_kl'`` or ``'jsd'``.
        temperature: ``T > 0``.
        beta: the JSD mixture weight, in ``(0, 1)``.
        ce_weight: weight of cross-entropy, in ``[0, 1]``; the divergence gets
            ``1 - ce_weight``.
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``.
    """

    default_name = "kd"
    required_fields = {"input_ids": "the tokenised batch (every XTuner data pipeline has it)"}

    def __init__(
        self,
        teacher: Any,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        ce_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if divergence not in DIVERGENCES:
            raise ValueError(f"KDLoss: divergence={divergence!r} is not one of {DIVERGENCES}")
        if temperature <= 0:
            raise ValueError(f"KDLoss: temperature must be > 0, got {temperature}")
        if divergence == "jsd" and not 0 < beta < 1:
            raise ValueError(f"KDLoss: beta must be in (0, 1) for 'jsd', got {beta}")
        if not 0 <= ce_weight <= 1:
            raise ValueError(f"KDLoss: ce_weight must be in [0, 1], got {ce_weight}")
        if isinstance(teacher, (dict, ConfigDict)):
            teacher = BUILDER.build(teacher)
        head = getattr(teacher, "get_output_embeddings", lambda: None)()
        if not isinstance(teacher, nn.Module) or head is None:
            raise TypeError(
                "KDLoss: teacher must be a causal LM module with an output head "
                f"(get_output_embeddings()), or its config dict; got {type(teacher).__name__}"
            )
        teacher.eval().requires_grad_(False)
        # Stored outside nn.Module's registry: not a submodule, so not trained or saved.
        object.__setattr__(self, "teacher", teacher)
        # The teacher's logits are made as its own family makes them (soft cap, scaling).
        object.__setattr__(self, "teacher_head", build_output_head(teacher))
        self.divergence = divergence
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.ce_weight = float(ce_weight)

    @property
    def logit_rows(self) -> int:  # type: ignore[override]
        rows = {"forward_kl": 2, "reverse_kl": 2, "jsd": 4}[self.divergence]
        return rows + (1 if self.ce_weight else 0)

    @property
    def teacher_key(self) -> str:
        """The extras key of the teacher's hidden states (unique per loss name)."""
        return f"{self.name}.teacher_hidden"

    def term_names(self) -> list[str]:
        return [self.name] + (["ce"] if self.ce_weight else [])

    def _apply(self, fn, recurse=True):
        # Device and dtype moves reach the teacher although it is not a submodule.
        self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def _teacher_backbone(self) -> nn.Module:
        prefix = getattr(self.teacher, "base_model_prefix", "")
        backbone = getattr(self.teacher, prefix, None) if prefix else None
        if backbone is None and hasattr(self.teacher, "get_decoder"):
            backbone = self.teacher.get_decoder()
        if backbone is None:
            raise TypeError(
                f"KDLoss: cannot find the decoder of the teacher ({type(self.teacher).__name__}):"
                " give an HF causal LM, or a module with get_decoder() returning a module whose "
                "output has last_hidden_state"
            )
        return backbone

    def extra_inputs(self, batch: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """Runs the teacher on the whole batch; returns its final hidden states.

        A multimodal batch (LLaVA: ``input_ids`` holds ``IMAGE_TOKEN_INDEX`` on every image
        patch) gives a text-only teacher the text tokens alone (see :meth:`_text_teacher`).
        """
        self.check_fields(batch)
        ids = batch["input_ids"]
        if bool((ids < 0).any()):
            return {self.teacher_key: self._text_teacher(ids, batch.get("position_ids"))}
        inputs = {"input_ids": ids}
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            inputs["attention_mask"] = mask
        if batch.get("position_ids") is not None:
            inputs["position_ids"] = batch["position_ids"]
        with torch.no_grad():
            out = self._teacher_backbone()(**inputs, use_cache=False)
        return {self.teacher_key: self.teacher_head.batch_first(out.last_hidden_state, ids)}

    def _text_teacher(self, ids: Tensor, position_ids: Tensor | None) -> Tensor:
        """The teacher's hidden states in the merged (multimodal) layout, from the text only.

        Each row's text tokens (ids >= 0) are packed to the left, with positions counted per
        document; the teacher runs on that. Position ``t`` of the merged row then takes the
        teacher's state at the last text token at or before ``t``: after an image, the last
        patch predicts the next text token, as the text token before the image does for the
        teacher. Image positions are never targets, so nothing else reads them.
        """
        is_text = ids >= 0
        count = is_text.long().cumsum(-1)  # text tokens up to and including t
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        starts = position_ids.expand_as(ids) == 0
        # Text tokens before the document of t (cumulative counts never decrease).
        before = torch.where(starts, count - is_text.long(), 0).cummax(-1).values
        rows, cols = is_text.nonzero(as_tuple=True)
        dest = count[rows, cols] - 1
        compact = ids.new_zeros(ids.shape[0], int(count[:, -1].max()))
        compact_pos = torch.zeros_like(compact)
        compact[rows, dest] = ids[rows, cols]
        compact_pos[rows, dest] = (count - 1 - before)[rows, cols]
        with torch.no_grad():
            out = self._teacher_backbone()(
                input_ids=compact, position_ids=compact_pos, use_cache=False
            ).last_hidden_state
        out = self.teacher_head.batch_first(out, compact)
        index = (count - 1).clamp_min(0)[..., None].expand(-1, -1, out.shape[-1])
        return out.gather(1, index)

    def _teacher_logits(self, hidden: Tensor, like: Tensor) -> Tensor:
        head = self.teacher_head
        if head.vocab_size != like.shape[-1]:
            raise LossInputError(
                f"KDLoss: the teacher's vocabulary ({head.vocab_size}) differs from the "
                f"student's ({like.shape[-1]}); distillation needs the same tokenizer and "
                "output size"
            )
        out = scratch("kd.teacher", like)
        with torch.no_grad(), head.materialized() as (weight, bias):
            hidden = hidden.to(weight.dtype)
            if weight.dtype != like.dtype:
                out.copy_(F.linear(hidden, weight, bias))
            else:
                linear_into(hidden, weight, bias, out)
        head.transform.apply_(out, key="kd.teacher_tanh")
        return out

    def loss_and_grad(self, logits, targets, extras, weights):
        values, ce_grad = {}, None
        if self.ce_weight:
            ce_logits = scratch("kd.ce", logits).copy_(logits)
            ce, ce_grad = cross_entropy_and_grad_(ce_logits, targets, self.ce_weight * weights)
            values["ce"] = self.ce_weight * ce
        coef, temp = 1 - self.ce_weight, self.temperature
        student = logits
        teacher = self._teacher_logits(extras[self.teacher_key], logits)
        if temp != 1:
            student.div_(temp)
            teacher.div_(temp)
        log_softmax_(student)
        log_softmax_(teacher)
        # Each branch leaves D in `div` and dD/d(z/T) in the student's buffer.
        if self.divergence == "forward_kl":
            div = kl_rows(teacher, student)
            grad = student.exp_().sub_(teacher.exp_())
        elif self.divergence == "reverse_kl":
            diff = teacher.sub_(student).neg_()  # log P - log Q
            student_p = student.exp_()
            div = row_dot(student_p, diff)
            grad = student_p.mul_(diff.sub_(div[:, None]))
        else:
            div, grad = self._jsd_(student, teacher)
        values[self.name] = coef * temp**2 * div
        # d(T^2 D)/dz = T * dD/d(z/T)
        grad.mul_((coef * temp * weights)[:, None])
        if ce_grad is not None:
            grad.add_(ce_grad)
        return values, grad

    def _jsd_(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """Generalised JSD and its gradient w.r.t. the student's scaled logits (in ``log_p``)."""
        beta = self.beta
        # log M = log(beta) + logaddexp(log P + log((1 - beta) / beta), log Q)
        log_m = torch.add(log_p, math.log((1 - beta) / beta), out=scratch("kd.log_m", log_p))
        torch.logaddexp(log_m, log_q, out=log_m).add_(math.log(beta))
        probs = torch.exp(log_q, out=scratch("kd.probs", log_q))
        kl_q = row_dot(probs, log_q) - row_dot(probs, log_m)
        torch.exp(log_p, out=probs)
        kl_p = row_dot(probs, log_p) - row_dot(probs, log_m)
        # dD/dP_v = (1 - beta) (log P_v - log M_v); through the softmax:
        # dD/ds_v = P_v (g_v - sum_u P_u g_u).
        g = log_p.sub_(log_m).mul_(1 - beta)
        grad = g.sub_(row_dot(probs, g)[:, None]).mul_(probs)
        return beta * kl_q + (1 - beta) * kl_p, grad

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, divergence={self.divergence!r}, "
            f"temperature={self.temperature}, ce_weight={self.ce_weight}, "
            f"teacher={type(self.teacher).__name__}"
        )
