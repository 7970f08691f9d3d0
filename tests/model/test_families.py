"""The default loss equals each family's own loss: tiny random models from transformers' config
classes (fp32), LoRA and modules_to_save on the head, a NormHead-style head the probe must
catch; FocalLoss equals a naive focal loss on the family's own logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from xtuner.model import SupervisedFinetune
from xtuner.model.losses import HeadMismatchError
from xtuner.model.losses.head import linear_head
from xtuner.model.transformers_models.deepseek_v2 import DeepseekV2ForCausalLM
from xtuner.registry import HEAD_ADAPTERS

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    # Large weights make logits O(1), so a soft cap or a multiplier left out is visible.
    initializer_range=0.3,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3)
#: multi-head latent attention with a low-rank query, one dense layer, one shared expert.
DEEPSEEK_V2 = dict(
    num_key_value_heads=4,  # multi-head latent attention: one latent key-value per head
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=24,
    first_k_dense_replace=1,
    num_hidden_layers=3,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "mistral": ("MistralConfig", {}),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=1.5)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=1.5)),
    "cohere": ("CohereConfig", dict(logit_scale=0.3)),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0)),
    # transformers' own GLM and GLM-4 classes (the remote-code ChatGLM: test_chatglm.py).
    "glm": ("GlmConfig", dict(head_dim=8)),
    "glm4": ("Glm4Config", dict(head_dim=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **MOE)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=24, **MOE),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=24, **MOE)),
    "deepseek_v2": ("DeepseekV2Config", dict(DEEPSEEK_V2, **MOE)),
    "deepseek_v2_grouped": (
        "DeepseekV2Config",
        dict(DEEPSEEK_V2, topk_method="group_limited_greedy", n_group=2, topk_group=1, **MOE),
    ),
}
#: families whose model class is the fork's (XTuner 0.x configs import it by path).
MODEL_CLASSES = {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v2_grouped": DeepseekV2ForCausalLM}


def family_llm(name: str) -> nn.Module:
    config_cls, extra = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    if name in MODEL_CLASSES:
        return MODEL_CLASSES[name](config).float()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 14:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def total(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """What mmengine back-propagates: the sum of every key containing 'loss'."""
    return sum(v for k, v in out.items() if "loss" in k)


def assert_equals_hf(model: SupervisedFinetune, data: dict) -> dict[str, torch.Tensor]:
    ours = model(data, mode="loss")
    total(ours).backward()
    ours_grads = grads_of(model)
    model.zero_grad()
    ref = model.llm(**data).loss
    ref.backward()
    ref_grads = grads_of(model)
    torch.testing.assert_close(total(ours).detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == ours_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    return ours


def naive_focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    valid = targets != -100
    log_p = F.log_softmax(logits[valid].float(), -1).gather(1, targets[valid, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_loss_and_gradients_equal_the_family_loss(family):
    model = SupervisedFinetune(family_llm(family), use_activation_checkpointing=False)
    ours = assert_equals_hf(model, batch())
    if "output_router_logits" in FAMILIES[family][1]:
        assert set(ours) >= {"loss_ce", "loss_router_aux"}
        assert float(ours["loss_router_aux"]) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_focal_loss_equals_naive_focal_on_the_family_logits(family):
    model = SupervisedFinetune(
        family_llm(family),
        use_activation_checkpointing=False,
        loss=dict(type="FocalLoss", gamma=2.0),
    )
    data = batch(1)
    ours = model(data, mode="loss")
    total(ours).backward()
    ours_grads = grads_of(model)
    model.zero_grad()
    out = model.llm(input_ids=data["input_ids"])
    ref = naive_focal(out.logits, data["labels"], 2.0)
    if getattr(out, "aux_loss", None) is not None:
        ref = ref + model.llm.config.router_aux_loss_coef * out.aux_loss
    ref.backward()
    torch.testing.assert_close(total(ours).detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


HEAD_LORA = [
    dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("lora", HEAD_LORA, ids=["lora_on_lm_head", "modules_to_save"])
def test_lora_on_the_head_equals_peft(lora):
    lora_cfg = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    model = SupervisedFinetune(
        family_llm("llama"), lora={**lora_cfg, **lora}, use_activation_checkpointing=False
    )
    assert_equals_hf(model, batch())
    head_grads = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert head_grads, "the head's adapter (or copy) must be trained"


def test_lora_dropout_on_the_head_is_refused():
    lora = dict(type=LoraConfig, r=4, lora_dropout=0.1, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lora_dropout=0.1.*head='model'"):
        SupervisedFinetune(family_llm("llama"), lora=lora, use_activation_checkpointing=False)


def unit_row_head_model(head_cls_name: str) -> nn.Module:
    """A causal LM defined here whose head normalises its weight rows (Baichuan2-style)."""

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=-1))

    head_cls = type(head_cls_name, (nn.Linear,), {"forward": forward})

    class UnitRowLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            torch.manual_seed(1)
            self.lm_head = head_cls(config.hidden_size, config.vocab_size, bias=False)

    return UnitRowLM(LlamaConfig(**COMMON))


def test_probe_catches_an_unregistered_head_and_the_two_ways_out_are_exact():
    with pytest.raises(HeadMismatchError, match="UnitRowLM.*register a head adapter.*head='model'"):
        SupervisedFinetune(unit_row_head_model("UnitRowHead"), use_activation_checkpointing=False)
    model = SupervisedFinetune(
        unit_row_head_model("UnitRowHead"),
        use_activation_checkpointing=False,
        loss=dict(type="CrossEntropyLoss", head="model"),
    )
    assert_equals_hf(model, batch())
    HEAD_ADAPTERS.register_module(name="UnitRowLM", module=lambda m: linear_head(m, normalize=True))
    try:
        model = SupervisedFinetune(
            unit_row_head_model("UnitRowHead"), use_activation_checkpointing=False
        )
        assert_equals_hf(model, batch())
    finally:
        HEAD_ADAPTERS.module_dict.pop("UnitRowLM")


def test_baichuan_norm_head_has_a_builtin_adapter():
    model = SupervisedFinetune(unit_row_head_model("NormHead"), use_activation_checkpointing=False)
    assert model.output_head().adapter == "NormHead"
    assert_equals_hf(model, batch())


def width_scaled_model(model_type: str) -> nn.Module:
    """A causal LM defined here whose head sees ``h * dim_model_base / hidden_size`` (MiniCPM's
    width scaling, remote code there), with the given config ``model_type``."""

    class WidthScaledHead(nn.Linear):
        def forward(self, x):
            return F.linear(x / (COMMON["hidden_size"] / 8), self.weight)

    config_cls = type("WidthConfig", (LlamaConfig,), {"model_type": model_type})

    class WidthScaledLM(LlamaForCausalLM):
        config_class = config_cls

        def __init__(self, config):
            super().__init__(config)
            torch.manual_seed(1)
            self.lm_head = WidthScaledHead(config.hidden_size, config.vocab_size, bias=False)

    return WidthScaledLM(config_cls(**COMMON, dim_model_base=8))


def test_minicpm_width_scaling_has_a_builtin_adapter():
    model = SupervisedFinetune(width_scaled_model("minicpm"), use_activation_checkpointing=False)
    assert model.output_head().adapter == "minicpm"
    assert_equals_hf(model, batch())
    with pytest.raises(HeadMismatchError, match="WidthScaledLM"):
        SupervisedFinetune(width_scaled_model("not_minicpm"), use_activation_checkpointing=False)


def test_head_model_option_equals_hf_for_a_soft_capped_family():
    model = SupervisedFinetune(
        family_llm("gemma2"),
        use_activation_checkpointing=False,
        loss=[dict(type="CrossEntropyLoss", head="model")],
    )
    assert model.head_mode == "model"
    assert_equals_hf(model, batch())


def test_router_loss_coefficient_from_the_config_and_z_loss():
    model = SupervisedFinetune(
        family_llm("mixtral"),
        use_activation_checkpointing=False,
        loss=[
            dict(type="CrossEntropyLoss"),
            dict(type="RouterAuxLoss", coef=0.05),
            dict(type="RouterZLoss", coef=0.01),
        ],
    )
    data = batch()
    ours = model(data, mode="loss")
    out = model.llm(input_ids=data["input_ids"])
    torch.testing.assert_close(ours["loss_router_aux"], 0.05 * out.aux_loss, rtol=1e-5, atol=0)
    z = torch.stack([torch.logsumexp(r.float(), -1) for r in out.router_logits])
    torch.testing.assert_close(ours["loss_router_z"], 0.01 * z.square().mean(), rtol=1e-5, atol=0)


def test_router_loss_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        SupervisedFinetune(
            family_llm("llama"),
            use_activation_checkpointing=False,
            loss=[dict(type="CrossEntropyLoss"), dict(type="RouterAuxLoss")],
        )


PACKED = [
    (family, attn)
    for family in (
        "llama",
        "qwen2_tied",
        "phi3",
        "gemma2",
        "cohere",
        "mixtral",
        "qwen3_moe",
        "deepseek_v2",
    )
    for attn in ("eager", "sdpa")
    if not (family == "gemma2" and attn == "sdpa")  # Gemma2 has no sdpa (soft-capped attention)
]
DOC_LENGTHS = ((5, 7), (6, 6))


def documents(seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for row in DOC_LENGTHS for n in row]


def packed_batch(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])
    positions = torch.stack(
        [torch.cat([torch.arange(len(d)) for d in pair]) for pair in (docs[:2], docs[2:])]
    )
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def separate_batch(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        ids[i, : len(d)], mask[i, : len(d)] = d, 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize(("family", "attn"), PACKED)
def test_packed_documents_equal_separate_documents(family, attn):
    llm = family_llm(family)
    llm.set_attn_implementation(attn)
    model = SupervisedFinetune(llm, use_activation_checkpointing=False, use_varlen_attn=True)
    docs = documents()
    packed, separate = packed_batch(docs), separate_batch(docs)
    # Per-document losses from the model's own logits.
    with torch.no_grad():
        logits = model.llm(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"]
        ).logits
        alone = model.llm(
            input_ids=separate["input_ids"], attention_mask=separate["attention_mask"]
        )
    for i, doc in enumerate(docs):
        row, start = divmod(i, 2)
        start = start * DOC_LENGTHS[row][0]
        got = F.cross_entropy(logits[row, start : start + len(doc) - 1], doc[1:])
        want = F.cross_entropy(alone.logits[i, : len(doc) - 1], doc[1:])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The whole loss and every gradient.
    ours = model(packed, mode="loss")
    total(ours).backward()
    packed_grads = grads_of(model)
    model.zero_grad()
    model.use_varlen_attn = False  # the separate rows keep their padding mask
    ref = model(separate, mode="loss")
    total(ref).backward()
    torch.testing.assert_close(total(ours), total(ref), rtol=1e-5, atol=1e-6)
    for name, grad in grads_of(model).items():
        # Packed and separate rows sum in other orders: an absolute floor relative to the
        # gradient's largest entry for the entries near zero.
        floor = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=floor, msg=name)


def varlen_only_kernel(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention as flash-attention does it without a padding mask: varlen over the flattened
    batch with ``cu_seq_lens_q`` when given, else causal over each whole row (what
    transformers' flash path does for packed rows in a batch of more than one)."""
    batch, heads, length, dim = query.shape
    if kwargs.get("cu_seq_lens_q") is None:
        bounds = [(r * length, (r + 1) * length) for r in range(batch)]
    else:
        cu = kwargs["cu_seq_lens_q"].tolist()
        bounds = list(zip(cu[:-1], cu[1:]))
    # [B, H, S, D] -> [H, B*S, D]: documents are runs of the flattened batch.
    q, k, v = (x.transpose(0, 1).reshape(x.shape[1], -1, dim) for x in (query, key, value))
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True, scale=scaling, enable_gqa=True
            )
            for a, b in bounds
        ],
        dim=1,
    )
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3), None


def test_packed_flash_kwargs():
    from xtuner.model.modules.packed_attention import packed_flash_kwargs

    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert packed_flash_kwargs("sdpa", positions) == {}
    kwargs = packed_flash_kwargs("flash_attention_2", positions)
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 3, 5, 7, 10]
    assert int(kwargs["max_length_q"]) == int(kwargs["max_length_k"]) == 3


def test_packed_documents_on_flash_attention_with_batch_2(monkeypatch):
    """A flash kernel (here a CPU stand-in that, like flash-attention, keeps documents apart
    only through cu_seq_lens) gets the document boundaries of every row: packed rows, batch 2,
    equal separate documents, loss and every gradient."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(
        ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", varlen_only_kernel
    )
    model = SupervisedFinetune(family_llm("llama"), use_activation_checkpointing=False)
    docs = documents()
    ref = model(separate_batch(docs), mode="loss")
    total(ref).backward()
    ref_grads = grads_of(model)
    model.zero_grad()
    model.llm.config._attn_implementation = "flash_attention_2"
    model.use_varlen_attn = True
    ours = model(packed_batch(docs), mode="loss")
    total(ours).backward()
    torch.testing.assert_close(total(ours), total(ref), rtol=1e-5, atol=1e-6)
    for name, grad in grads_of(model).items():
        floor = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(ref_grads[name], grad, rtol=1e-5, atol=floor, msg=name)


def test_varlen_refused_for_a_model_that_lets_documents_attend_each_other():
    llm = family_llm("llama")
    # Attention that ignores position_ids: a plain causal mask over the whole row (as remote
    # code that builds its own mask does).
    backbone_forward = llm.model.forward

    def forward(*args, position_ids=None, **kwargs):
        if position_ids is not None:
            position_ids = torch.arange(position_ids.shape[-1])[None]
        return backbone_forward(*args, position_ids=position_ids, **kwargs)

    llm.model.forward = forward
    with pytest.raises(ValueError, match="use_varlen_attn=True, but LlamaForCausalLM.*attend each"):
        SupervisedFinetune(llm, use_activation_checkpointing=False, use_varlen_attn=True)
    SupervisedFinetune(llm, use_activation_checkpointing=False, use_varlen_attn=False)


def test_probe_is_skipped_when_the_head_weight_is_partitioned():
    # A ZeRO-3 shard (a parameter with ds_id) is not on this process: the probe cannot run
    # and the adapter is trusted (here it is wrong, so the build must not fail on it).
    llm = unit_row_head_model("UnitRowHead")
    llm.lm_head.weight.ds_id = 0
    SupervisedFinetune(llm, use_activation_checkpointing=False)


def naive_deepseek_balance(router_logits, config) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss (arXiv 2405.04434, eqs. 12-14), token by token."""
    n, k, total = config.n_routed_experts, config.num_experts_per_tok, 0.0
    for logits in router_logits:
        probs = logits.detach().double().softmax(-1)
        tokens = probs.shape[0]
        routed, mean_prob = [0.0] * n, [0.0] * n
        for p in probs:
            allowed = range(n)
            if config.topk_method == "group_limited_greedy":
                size = n // config.n_group
                groups = sorted(
                    range(config.n_group), key=lambda g: -p[g * size : (g + 1) * size].max()
                )
                allowed = [
                    e for g in groups[: config.topk_group] for e in range(g * size, (g + 1) * size)
                ]
            for e in sorted(allowed, key=lambda e: -p[e])[:k]:
                routed[e] += n / (k * tokens)
            for e in range(n):
                mean_prob[e] += float(p[e]) / tokens
        total += sum(f * q for f, q in zip(routed, mean_prob))
    return torch.tensor(total, dtype=torch.float64)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v2_grouped"])
def test_deepseek_v2_balance_loss_equals_a_naive_reference(family):
    model = SupervisedFinetune(family_llm(family), use_activation_checkpointing=False)
    data = batch()
    ours = model(data, mode="loss")
    out = model.llm(input_ids=data["input_ids"])
    assert len(out.router_logits) == 2  # the first layer is dense (first_k_dense_replace=1)
    want = 0.3 * naive_deepseek_balance(out.router_logits, model.llm.config)
    torch.testing.assert_close(ours["loss_router_aux"].double(), want, rtol=1e-5, atol=0)
    assert float(want) > 0


def test_deepseek_v2_from_pretrained_takes_the_upstream_config_arguments(tmp_path, caplog):
    llm = family_llm("deepseek_v2")
    llm.config.aux_loss_alpha = 0.001  # as in DeepSeek's checkpoints
    del llm.config.router_aux_loss_coef
    llm.config.output_router_logits = False
    llm.save_pretrained(tmp_path)
    loaded = DeepseekV2ForCausalLM.from_pretrained(
        str(tmp_path), moe_implementation="shard", expert_in_one_shard=8, trust_remote_code=True
    )
    # DeepSeek's code trains with the balance loss: its alpha turns the router logits on.
    assert loaded.config.output_router_logits and loaded.config.router_aux_loss_coef == 0.001
    model = SupervisedFinetune(loaded, use_activation_checkpointing=False)
    assert set(model(batch(), mode="loss")) >= {"loss_ce", "loss_router_aux"}
