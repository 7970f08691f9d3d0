"""DeepSeek-V2 (and V2-Lite) on transformers' own ``DeepseekV2ForCausalLM``: no remote code.

XTuner 0.2.0's DeepSeek-V2 configs build the model with
``DeepseekV2ForCausalLM.from_pretrained(path, moe_implementation='shard',
expert_in_one_shard=8, trust_remote_code=True)``. Here the class is transformers' own, with
the two things a fine-tuning config relies on added:

- the expert-level balance loss of DeepSeek-V2 (arXiv 2405.04434, eqs. 12-14), per MoE layer
  ``alpha * sum_i f_i * P_i`` with ``f_i = N / (K * T) * (tokens routed to expert i)`` and
  ``P_i`` the mean router probability of expert i over the ``T`` unpadded tokens, summed over
  the layers. The model's own loss (``labels=`` given) adds it to the cross-entropy, as
  transformers' Mixtral does with its auxiliary loss, and the fork's ``RouterAuxLoss``
  computes the same term (``loss_router_aux``). ``alpha`` is the config's
  ``router_aux_loss_coef``, else DeepSeek's own ``aux_loss_alpha`` (0.001 in the released
  checkpoints); a checkpoint with ``aux_loss_alpha > 0`` turns ``output_router_logits`` on,
  because DeepSeek's code always trains with the balance loss. The balance is taken over the
  micro-batch's tokens; DeepSeek's ``seq_aux`` takes it per sequence, which is the same for
  the configs' ``batch_size=1`` (packed) and close otherwise.
- ``from_pretrained`` accepts the upstream-only ``moe_implementation`` and
  ``expert_in_one_shard`` (upstream's expert-sharded kernels; transformers' experts are used
  instead) with a warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf

from xtuner.model.losses.router import BalanceScheme

#: from_pretrained options of upstream's remote-code DeepSeek-V2 that have no meaning here.
UPSTREAM_ONLY_OPTIONS = ("moe_implementation", "expert_in_one_shard")
#: DeepSeek-V2's balance-loss weight (its ``aux_loss_alpha``) when the config names none.
DEFAULT_AUX_ALPHA = 0.001


def choose_experts(
    probs: Tensor, top_k: int, n_group: int | None = None, topk_group: int | None = None
) -> Tensor:
    """The ``[tokens, top_k]`` experts DeepSeek-V2 routes each token to: the top-k of the
    probabilities, with group-limited routing only among the ``topk_group`` groups that hold
    the best experts."""
    scores = probs
    if n_group and n_group > 1:
        num_experts = probs.shape[-1]
        grouped = probs.view(-1, n_group, num_experts // n_group)
        best = grouped.max(-1).values.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0]).scatter(1, best, 1.0).bool()
        scores = grouped.masked_fill(~keep[..., None], 0.0).view(-1, num_experts)
    return scores.topk(top_k, dim=-1).indices


def load_balancing_loss_func(
    gate_logits: tuple[Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> Tensor:
    """DeepSeek-V2's expert-level balance loss, without its weight: ``sum`` over the MoE
    layers of ``sum_i f_i * P_i`` (see the module docstring).

    Args:
        gate_logits: per MoE layer, the ``[tokens, num_experts]`` router logits.
        num_experts: routed experts per layer.
        top_k: experts chosen per token.
        attention_mask: ``[B, S]`` padding mask (the tokens of the logits, in order), or None.
        n_group, topk_group: group-limited routing (DeepSeek-V2's ``group_limited_greedy``):
            experts are chosen only among the ``topk_group`` groups with the best expert.

    Returns:
        The loss, a float32 scalar.
    """
    total = torch.zeros((), dtype=torch.float32, device=gate_logits[0].device)
    for logits in gate_logits:
        probs = logits.float().softmax(-1)
        picked = choose_experts(probs, top_k, n_group, topk_group)
        chosen = F.one_hot(picked, num_experts).sum(1).float()
        weight = torch.ones_like(probs[:, :1])
        if attention_mask is not None:
            weight = attention_mask.reshape(-1, 1).to(probs)
        tokens = weight.sum().clamp_min(1)
        routed = (chosen * weight).sum(0) * num_experts / (top_k * tokens)
        mean_prob = (probs * weight).sum(0) / tokens
        total = total + (routed * mean_prob).sum()
    return total


class DeepseekV2ForCausalLM(hf.DeepseekV2ForCausalLM):
    """transformers' DeepSeek-V2 with its balance loss in the model's own loss.

    Args:
        config: a ``DeepseekV2Config`` (a DeepSeek checkpoint's ``config.json`` loads as one).
    """

    def __init__(self, config: DeepseekV2Config):
        alpha = getattr(config, "aux_loss_alpha", None)
        if getattr(config, "router_aux_loss_coef", None) is None:
            config.router_aux_loss_coef = DEFAULT_AUX_ALPHA if alpha is None else float(alpha)
        if alpha is not None and float(alpha) > 0:
            config.output_router_logits = True
        super().__init__(config)
        # What the fork's router losses read (xtuner/model/losses/router.py).
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        ignored = {k: kwargs.pop(k) for k in UPSTREAM_ONLY_OPTIONS if k in kwargs}
        if ignored:
            print_log(
                f"DeepseekV2ForCausalLM: {ignored} ignored: they select upstream XTuner's "
                "expert-sharded remote code; transformers' own DeepSeek-V2 experts are used",
                "current",
                level=30,
            )
        # transformers' own class needs no remote code, whatever the config asks.
        kwargs.pop("trust_remote_code", None)
        return super().from_pretrained(*args, **kwargs)

    def load_balancing_loss_func(
        self,
        gate_logits: tuple[Tensor, ...],
        num_experts: int,
        top_k: int,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """:func:`load_balancing_loss_func` with this model's group-limited routing."""
        return load_balancing_loss_func(
            gate_logits, num_experts, top_k, attention_mask, *self._groups()
        )

    def router_balance_scheme(self) -> BalanceScheme:
        """How the fork's ``RouterAuxLoss`` gathers this balance loss's statistics (under
        sequence parallel, across the shards): per layer, shares of the top-k choices, the
        experts chosen as this model routes."""
        groups = self._groups()
        return BalanceScheme(
            per_layer=True,
            choose=lambda probs: choose_experts(probs, self.num_experts_per_tok, *groups),
            divide_by_top_k=True,
        )

    def _groups(self) -> tuple[int | None, int | None]:
        if self.config.topk_method == "group_limited_greedy":
            return self.config.n_group, self.config.topk_group
        return None, None

    def forward(self, *args, **kwargs) -> hf.MoeCausalLMOutputWithPast:
        out = super().forward(*args, **kwargs)
        # As transformers' Mixtral: aux_loss whenever there are router logits, added to the
        # loss when labels were given.
        if out.router_logits:
            out.aux_loss = self.load_balancing_loss_func(
                out.router_logits,
                self.num_experts,
                self.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
            if out.loss is not None:
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
        return out
