"""DPO, ORPO and RewardModel on a tiny Llama against direct computations from ``llm(...)``.

The direct computation runs every answer alone through the HF model (no padding, no
packing), takes its logits' log-softmax at the shifted labels, sums per answer, and applies
the formula; loss values and every trainable gradient must match.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import PackedPreferenceDataset
from xtuner.engine.hooks import PrecomputeRefLogpsHook
from xtuner.model.dpo import DPO
from xtuner.model.losses import LossConfigError
from xtuner.model.orpo import ORPO
from xtuner.model.reward import RewardModel

LORA = dict(type="peft.LoraConfig", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
BETA = 0.2


def llm_cfg(path):
    return dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=path,
        dtype=torch.float32,
    )


def make_pairs(n=3, seed=0, vocab=500, reward_token=None):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(
            5, vocab, (int(torch.randint(3, 6, (1,), generator=g)),), generator=g
        )
        pair = {}
        for side, label in (("chosen", 0), ("rejected", 1)):
            answer = torch.randint(
                5, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g
            )
            ids = prompt.tolist() + answer.tolist()
            if reward_token is None:
                labels = [-100] * len(prompt) + answer.tolist()
            else:
                ids = ids + [reward_token]
                labels = [-100] * (len(ids) - 1) + [label]
            pair[f"{side}_ids"], pair[f"{side}_labels"] = ids, labels
        pairs.append(pair)
    return pairs


class _Pairs(list):
    fingerprint = "test"


def batch_of(pairs, layout):
    if layout == "padded":
        return preference_collate_fn(pairs)["data"]
    packed = PackedPreferenceDataset(
        _Pairs(pairs), max_packed_length=10_000, shuffle_before_pack=False
    )
    assert len(packed) == 1
    return preference_collate_fn([packed[0]], use_varlen_attn=True)["data"]


def direct_logps(llm, pairs):
    """[n_pairs, 2] summed log-probs and token counts, one answer at a time through llm()."""
    sums, counts = [], []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            ids = torch.tensor([pair[f"{side}_ids"]])
            labels = torch.tensor(pair[f"{side}_labels"])[1:]
            logp = torch.log_softmax(llm(input_ids=ids).logits[0, :-1].float(), -1)
            mask = labels != -100
            sums.append(logp[mask].gather(1, labels[mask][:, None]).sum())
            counts.append(mask.sum())
    return torch.stack(sums).reshape(-1, 2), torch.stack(counts).reshape(-1, 2).double()


def perturb(module, seed=1, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def naive_loss(kind, pol, ref, counts):
    if kind == "sigmoid":
        margin = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
        return -F.logsigmoid(BETA * margin).mean()
    if kind == "ipo":
        avg_p, avg_r = pol / counts, ref / counts
        margin = (avg_p[:, 0] - avg_p[:, 1]) - (avg_r[:, 0] - avg_r[:, 1])
        return ((margin - 1 / (2 * BETA)) ** 2).mean()
    avg = pol / counts  # simpo: beta=BETA, gamma_beta_ratio=0.5
    return -F.logsigmoid(BETA * (avg[:, 0] - avg[:, 1] - 0.5)).mean()


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).float()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(
    "kind, lora, family",
    [
        ("sigmoid", None, "llama"),
        ("ipo", None, "llama"),
        ("simpo", None, "llama"),
        ("sigmoid", LORA, "llama"),
        ("sigmoid", None, "qwen2_tied"),
    ],
)
def test_loss_and_gradients_equal_a_direct_computation(tiny_llama_path, layout, kind, lora, family):
    torch.manual_seed(0)
    loss = dict(type="SimPOLoss", beta=BETA, chunk_size=5) if kind == "simpo" else None
    model = DPO(
        llm_cfg(tiny_llama_path) if family == "llama" else tiny_qwen2(),
        beta=BETA,
        loss_type=kind if kind != "simpo" else "sigmoid",
        loss=loss,
        lora=lora,
        use_varlen_attn=layout == "packed",
        use_activation_checkpointing=False,
    )
    assert (model.ref_llm is None) == (lora is not None or kind == "simpo")
    perturb(model.llm)  # the policy moves away from its reference
    pairs = make_pairs()
    out = model(batch_of(pairs, layout))
    out["loss"].backward()
    ours = grads_of(model)
    model.zero_grad()

    pol, counts = direct_logps(model.llm, pairs)
    ref = None
    if kind != "simpo":
        with torch.no_grad():
            if lora is None:
                ref, _ = direct_logps(model.ref_llm, pairs)
            else:
                with model.llm.disable_adapter():
                    ref, _ = direct_logps(model.llm, pairs)
    naive = naive_loss(kind, pol.double(), None if ref is None else ref.double(), counts)
    naive.backward()
    theirs = grads_of(model)
    assert out["loss"].item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-6)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    if kind == "sigmoid":
        chosen = BETA * (pol[:, 0] - ref[:, 0])
        rejected = BETA * (pol[:, 1] - ref[:, 1])
        assert out["reward_margin"].item() == pytest.approx(
            (chosen - rejected).mean().item(), rel=1e-4
        )


def test_dpo_arguments_map_onto_registered_losses(tiny_llama_path):
    model = DPO(
        llm_cfg(tiny_llama_path),
        loss_type=["sigmoid", "bco_pair"],
        loss_weights=[1, 0.5],
        rpo_alpha=0.3,
    )
    assert [type(m).__name__ for m in model.loss.losses] == [
        "DPOLoss",
        "BCOPairLoss",
        "ChosenNLLLoss",
    ]
    assert model.loss.factors == [1.0, 0.5, 0.3]
    # The reference is frozen and outside state_dict and parameters (not trained, not saved).
    assert not any(k.startswith("ref_llm") for k in model.state_dict())
    assert all(p.requires_grad is False for p in model.ref_llm.parameters())
    assert len(list(model.parameters())) == len(list(model.llm.parameters()))
    with pytest.raises(LossConfigError, match="not one of"):
        DPO(llm_cfg(tiny_llama_path), loss_type="sigmod")
    with pytest.raises(LossConfigError, match="not a preference loss"):
        DPO(llm_cfg(tiny_llama_path), loss=dict(type="CrossEntropyLoss"))
    orpo = ORPO(llm_cfg(tiny_llama_path), beta=0.25)
    assert type(orpo.loss).__name__ == "ORPOLoss" and orpo.loss.beta == 0.25


def test_orpo_terms_are_logged_without_inflating_the_loss(tiny_llama_path):
    model = ORPO(llm_cfg(tiny_llama_path), beta=BETA, use_activation_checkpointing=False)
    out = model(batch_of(make_pairs(), "padded"))
    loss_keys = [k for k in out if "loss" in k]
    assert loss_keys == ["loss_nll", "loss_or"]
    assert {"log_odds_ratio", "log_odds_chosen", "reward_acc"} <= set(out)


def test_precomputed_reference_gives_the_same_loss_without_the_reference_model(
    tiny_llama_path, tmp_path
):
    torch.manual_seed(0)
    model = DPO(
        llm_cfg(tiny_llama_path),
        beta=BETA,
        precompute_ref_log_probs=True,
        use_activation_checkpointing=False,
    )
    perturb(model.llm)
    batches = [batch_of(make_pairs(seed=s), "padded") for s in range(2)]
    live = [model(dict(b))["loss"].item() for b in batches]

    class Loop:
        dataloader = [{"data": b} for b in reversed(batches)]

    class Runner:
        train_loop = Loop()

    Runner.model = model
    cache = tmp_path / "ref.pt"
    PrecomputeRefLogpsHook(cache_file=str(cache)).before_train(Runner)
    assert model.ref_llm is None and cache.exists() and len(model.ref_cache) == 12
    assert [model(dict(b))["loss"].item() for b in batches] == pytest.approx(live, rel=1e-6)
    with pytest.raises(RuntimeError, match="not in the precomputed cache"):
        model(batch_of(make_pairs(seed=7), "padded"))


def test_reward_model_scores_and_exports_a_sequence_classifier(tiny_llama_path, tmp_path):
    torch.manual_seed(0)
    token = 7
    model = RewardModel(
        llm_cfg(tiny_llama_path),
        reward_token_id=token,
        loss_type="focal",
        use_activation_checkpointing=False,
    )
    assert not model.base_llm.get_output_embeddings().weight.requires_grad
    with torch.no_grad():
        model.v_head.weight.normal_()
    pairs = make_pairs(reward_token=token)
    out = model(batch_of(pairs, "padded"))
    assert {"loss_rank", "loss_penalty", "reward_acc", "chosen_score_mean"} <= set(out)
    out["loss_rank"].backward()
    assert model.v_head.weight.grad.abs().sum() > 0

    model.to_hf(None, str(tmp_path / "rm"), fp32=True)
    classifier = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    scores = []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            with torch.no_grad():
                scores.append(
                    classifier(input_ids=torch.tensor([pair[f"{side}_ids"]])).logits[0, 0]
                )
    chosen = torch.stack(scores[0::2]).mean()
    assert chosen.item() == pytest.approx(out["chosen_score_mean"].item(), rel=1e-4, abs=1e-5)


def test_reward_model_refuses_policy_data(tiny_llama_path):
    model = RewardModel(llm_cfg(tiny_llama_path), use_activation_checkpointing=False)
    with pytest.raises(ValueError, match=r"not reward labels .*is_reward=True"):
        model(batch_of(make_pairs(), "padded"))  # DPO pairs: every answer token labelled


def test_reward_model_on_a_bare_decoder_as_upstream_polar_configs_build_it(tiny_llama_path):
    from transformers import AutoModel

    cfg = dict(type=AutoModel.from_pretrained, pretrained_model_name_or_path=tiny_llama_path)
    model = RewardModel(cfg, use_activation_checkpointing=False)
    with torch.no_grad():
        model.v_head.weight.normal_()
    out = model(batch_of(make_pairs(reward_token=7), "packed"))
    out["loss_rank"].backward()
    assert model.v_head.weight.grad.abs().sum() > 0


def test_unpaired_kto_data_trains_with_kto_loss(chat_model_path):
    from transformers import AutoTokenizer

    from xtuner.dataset.preference_dataset import build_preference_dataset

    tokenizer = AutoTokenizer.from_pretrained(chat_model_path)
    records = [
        {"prompt": "Say hi.", "completion": "Hi there.", "label": True},
        {"prompt": "Say hi.", "completion": "Go away.", "label": False},
        {"prompt": "Count.", "completion": "one two three", "label": True},
        {"prompt": "Count.", "completion": "no label"},
    ]
    data = build_preference_dataset(records, tokenizer, max_length=64)
    assert len(data) == 3 and data.unpaired
    batch = preference_collate_fn([data[i] for i in range(3)])["data"]
    assert batch["kto_labels"].tolist() == [True, False, True]
    model = DPO(
        llm_cfg(chat_model_path),
        loss=dict(type="KTOLoss", beta=BETA, undesirable_weight=2.0),
        use_activation_checkpointing=False,
    )
    perturb(model.llm)
    out = model(batch)
    pol, ref = [], []
    for i in range(3):
        item = data[i]
        pair = {"chosen_ids": item["input_ids"], "chosen_labels": item["labels"]}
        pair.update(rejected_ids=item["input_ids"], rejected_labels=item["labels"])
        pol.append(direct_logps(model.llm, [pair])[0][0, 0])
        with torch.no_grad():
            ref.append(direct_logps(model.ref_llm, [pair])[0][0, 0])
    r = torch.stack(pol) - torch.stack(ref)
    z = r.detach().mean().clamp(min=0)
    good = torch.tensor([True, False, True])
    naive = torch.where(
        good, 1 - torch.sigmoid(BETA * (r - z)), 2.0 * (1 - torch.sigmoid(BETA * (z - r)))
    ).mean()
    assert out["loss"].item() == pytest.approx(naive.item(), rel=1e-5)
    with pytest.raises(ValueError, match="use_varlen_attn=False"):
        build_preference_dataset(records, tokenizer, max_length=64, use_varlen_attn=True)
