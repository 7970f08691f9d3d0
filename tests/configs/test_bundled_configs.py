"""The bundled configs: every one parses and names only things that exist; one config of each
model family, and every preference (DPO, ORPO, reward) config, trains 3 iterations with its
model swapped for a tiny one of the same architecture class (``make test-all``: every other
config too, as its header runs it), and the docs' config list is the generated one.

The swap edits the config's settings block the way a user would (the model and data paths,
the sizes), writes the result next to the test, and trains it with ``xtuner train`` in a
subprocess; several configs share one process to keep the test short.
"""

from __future__ import annotations

import importlib
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
from mmengine.config import Config, ConfigDict

from tests.conftest import CHATML_TEMPLATE
from xtuner.configs import CONFIG_DIR, cfgs_name_path

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BUNDLED = sorted(n for n in cfgs_name_path if not n.startswith(("demo_", "llava_tiny_")))

# The model class of each family's checkpoint (its config.json "architectures"); the tiny
# stand-in is built from that class's config class. InternLM3 ships remote code
# (InternLM3ForCausalLM, not in transformers): its stand-in is the Llama class, whose layout
# InternLM3 follows.
FAMILIES = {
    "qwen2_5_": "Qwen2ForCausalLM",
    "deepseek_r1_distill_qwen_": "Qwen2ForCausalLM",
    "qwen3_30b_a3b": "Qwen3MoeForCausalLM",
    "qwen3_": "Qwen3ForCausalLM",
    "llama3_": "LlamaForCausalLM",
    "deepseek_r1_distill_llama_": "LlamaForCausalLM",
    "internlm3_": "LlamaForCausalLM",
    "gemma3_": "Gemma3ForCausalLM",
    "mistral_": "MistralForCausalLM",
    "ministral_": "MistralForCausalLM",
    "llava_qwen2_5_": "Qwen2ForCausalLM",
    "internvl3_": "InternVLForConditionalGeneration",
}
# Multimodal families whose tiny stand-in is built by their own test below.
MULTIMODAL = {"llava_qwen2_5_", "internvl3_"}
CONFIG_CLASS = {
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
    "LlamaForCausalLM": "LlamaConfig",
    "Gemma3ForCausalLM": "Gemma3TextConfig",
    "MistralForCausalLM": "MistralConfig",
}


# The model class of each kind of preference config (the name's ``_dpo_``, ``_orpo_``,
# ``_reward_``, as upstream's configs/dpo, configs/orpo and configs/reward_model).
PREFERENCE_KINDS = {"dpo": "DPO", "orpo": "ORPO", "reward": "RewardModel"}


def _preference_kind(name: str) -> str | None:
    return next((kind for kind in PREFERENCE_KINDS if f"_{kind}_" in name), None)


def family_of(name: str) -> str:
    for key in FAMILIES:  # the more specific prefixes come first
        if name.startswith(key):
            return key
    raise AssertionError(f"bundled config {name} belongs to no family of this test")


def _types(node, path="cfg"):
    """Every ``type`` value of a config, with where it sits."""
    if isinstance(node, dict | ConfigDict):
        if "type" in node:
            yield path, node["type"]
        for key, value in node.items():
            yield from _types(value, f"{path}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _types(value, f"{path}[{i}]")


def _resolves(name: str) -> bool:
    from mmengine.registry import HOOKS, LOOPS, OPTIM_WRAPPERS

    from xtuner.registry import BUILDER, LOSSES, MAP_FUNC

    if any(registry.get(name) is not None for registry in (LOSSES, BUILDER, MAP_FUNC)):
        return True
    if any(registry.get(name) is not None for registry in (HOOKS, LOOPS, OPTIM_WRAPPERS)):
        return True
    module, _, attr = name.rpartition(".")
    return bool(module) and hasattr(importlib.import_module(module), attr)


def test_the_families_of_the_issue_are_bundled():
    families = {family_of(name) for name in BUNDLED}
    assert families == set(FAMILIES)
    for method in ("full", "lora", "qlora"):
        for prefix in ("qwen2_5_7b", "qwen3_8b", "qwen3_30b_a3b", "llama3_1", "llama3_2"):
            assert any(n.startswith(prefix) and f"_{method}_" in n for n in BUNDLED), prefix
        for prefix in ("internlm3", "gemma3", "mistral", "deepseek_r1"):
            assert any(n.startswith(prefix) and f"_{method}_" in n for n in BUNDLED), prefix
    for loss in ("focal", "dft", "kd", "zloss"):
        assert any(n.endswith(f"_{loss}") for n in BUNDLED), loss
    # Each model family of the issue has a config with a non-default loss.
    losses = ("_focal", "_dft", "_kd", "_zloss")
    for group in (
        ("qwen2_5_",),
        ("qwen3_0_", "qwen3_8b"),
        ("qwen3_30b_a3b",),
        ("llama3_1_",),
        ("llama3_2_",),
        ("internlm3_",),
        ("gemma3_",),
        ("mistral_", "ministral_"),
        ("deepseek_r1_distill_",),
    ):
        assert any(n.startswith(group) and n.endswith(losses) for n in BUNDLED), group
    assert any("_sp4" in n for n in BUNDLED)
    for kind in ("dpo", "orpo", "reward"):
        assert any(f"_{kind}_" in n for n in BUNDLED), kind


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_config_parses_and_every_type_resolves(name):
    cfg = Config.fromfile(cfgs_name_path[name])
    for key in ("model", "train_dataloader", "optim_wrapper", "train_cfg", "custom_hooks"):
        assert key in cfg, f"{name} has no {key}"
    found = list(_types(cfg._cfg_dict.to_dict()))
    assert found
    for where, value in found:
        if isinstance(value, str):
            assert _resolves(value), f"{name}: {where}.type={value!r} resolves to nothing"
        else:
            assert callable(value), f"{name}: {where}.type={value!r} is not callable"
    sp = cfg.get("sequence_parallel_size", 1)
    assert (f"_sp{sp}" in name) == (sp > 1), f"{name}: sequence_parallel_size={sp}"
    if "_varlenattn" in name:
        assert cfg.use_varlen_attn, f"{name}: use_varlen_attn is off"
    if name.startswith("llava_"):
        return  # the LLaVA stages' names follow upstream's LLaVA scheme
    if name.startswith("internvl"):  # upstream's InternVL scheme: LoRA on the LLM
        assert getattr(cfg.model.type, "__name__", None) == "InternVL_V1_5", name
        assert ("_lora_" in name) == (cfg.model.get("llm_lora") is not None), name
        return
    kind = PREFERENCE_KINDS.get(_preference_kind(name), "SupervisedFinetune")
    assert getattr(cfg.model.type, "__name__", cfg.model.type) == kind, name
    method = re.search(r"_(full|lora|qlora)_", name + "_")
    method = method and method.group(1)
    if method == "qlora":
        assert cfg.model.llm.quantization_config.load_in_4bit
    if method in ("lora", "qlora"):
        assert cfg.model.lora is not None
    if method == "full":
        assert cfg.model.get("lora") is None
    if family_of(name) == "qwen3_30b_a3b":  # MoE: the router's load-balancing term is trained
        assert cfg.model.llm.output_router_logits is True, name


# -- training with tiny models ---------------------------------------------------------------


def _tiny_config(class_name: str, vocab_size: int, tokenizer):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    extra = {
        "Qwen3Config": dict(head_dim=16),
        "Qwen3MoeConfig": dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
        ),
        "Gemma3TextConfig": dict(head_dim=16, sliding_window=32),
        "MistralConfig": dict(sliding_window=None),
    }.get(class_name, {})
    return getattr(transformers, class_name)(**common, **extra)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, demo_assets) -> dict[str, str]:
    """One tiny random model folder (with the demo tokenizer) per architecture class."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for model_class in sorted({FAMILIES[f] for f in FAMILIES if f != "internvl3_"}):
        torch.manual_seed(0)
        config = _tiny_config(CONFIG_CLASS[model_class], len(tokenizer), tokenizer)
        model = AutoModelForCausalLM.from_config(config)
        assert type(model).__name__ == model_class
        path = str(root / model_class)
        model.save_pretrained(path)
        tokenizer.chat_template = CHATML_TEMPLATE  # preference pairs use the chat template
        tokenizer.save_pretrained(path)
        paths[model_class] = path
    return paths


def tiny_version(name: str, settings: dict[str, str], save_dir: str) -> str:
    """The bundled config with some of its PART 1 settings replaced (each must exist once)."""
    with open(cfgs_name_path[name], encoding="utf-8") as f:
        text = f.read()
    for key, value in settings.items():
        # One line, or a value ruff wrapped in parentheses over several lines.
        pattern = re.compile(rf"^{key} = (?:\((?:\n.*?)*?\n\)|.*)$", re.M)
        assert len(pattern.findall(text)) == 1, f"{name} has no single '{key} = ...' setting"
        line = f"{key} = {value}"
        text = pattern.sub(lambda _, line=line: line, text)
    path = osp.join(save_dir, f"{name}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _alpaca_dir(tmp_path, demo_assets) -> str:
    folder = tmp_path / "alpaca"
    folder.mkdir()
    with open(demo_assets["data"], encoding="utf-8") as f:
        lines = f.readlines()[:400]  # enough iterations per epoch for the warm-up
    (folder / "train.jsonl").write_text("".join(lines))
    return str(folder)


def _repeated(path: str, tmp_path, count: int = 200) -> str:
    """A copy of a small JSONL data file with ``count`` records (a 1-epoch config's warm-up
    needs a few dozen iterations per epoch)."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    out = tmp_path / osp.basename(path)
    out.write_text("".join(lines[i % len(lines)] for i in range(count)))
    return str(out)


def _train_all(jobs: list[tuple[str, str]]) -> subprocess.CompletedProcess:
    """Trains each (config, work_dir) for 3 iterations, one after the other, in one process."""
    code = (
        "import sys\nfrom xtuner.tools.train import main\n"
        "args = sys.argv[1:]\n"
        "for cfg, work in zip(args[::2], args[1::2]):\n"
        "    opts = ['train_cfg.max_epochs=None', 'train_cfg.max_iters=3',\n"
        "            'default_hooks.logger.interval=1']\n"
        "    if main([cfg, '--work-dir', work, '--seed', '0', '--cfg-options', *opts]):\n"
        "        sys.exit(f'training {cfg} failed')\n"
    )
    argv = [item for job in jobs for item in job]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        cwd=ROOT,
    )


def _logged(work_dir: str) -> list[dict]:
    from tests.tools.test_train_cli import losses_of

    losses_of(work_dir)  # asserts the run logged
    import glob

    (scalars,) = glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json"))
    with open(scalars, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


# One config per family, the one with the family's non-default loss where there is one; the
# loss terms each must log.
TRAINED = {
    "qwen2_5_7b_instruct_qlora_alpaca_e3_focal": {"loss"},
    "qwen3_8b_lora_alpaca_e3_kd": {"loss_kd", "loss_ce"},
    "qwen3_30b_a3b_lora_alpaca_e3_zloss": {"loss_ce", "loss_z", "loss_router_aux", "loss_router_z"},
    "llama3_1_8b_instruct_full_alpaca_e3_dft": {"loss"},
    "llama3_2_1b_instruct_full_alpaca_e3_kd": {"loss_kd", "loss_ce"},
    "internlm3_8b_instruct_qlora_alpaca_e3_focal": {"loss"},
    "gemma3_1b_it_full_alpaca_e3_zloss": {"loss_ce", "loss_z"},
    "mistral_7b_instruct_v0_3_qlora_alpaca_e3_dft": {"loss"},
    "ministral_8b_instruct_2410_lora_alpaca_e3": {"loss"},
    "deepseek_r1_distill_qwen_1_5b_full_alpaca_e3_kd": {"loss_kd", "loss_ce"},
    "deepseek_r1_distill_llama_8b_qlora_alpaca_e3": {"loss"},
}


@pytest.mark.slow
def test_one_config_per_family_trains_3_iterations_on_a_tiny_model(
    tmp_path, tiny_models, demo_assets, internvl_path
):
    from xtuner.demo.llava import (
        LLAVA_DEMO_FINETUNE,
        LLAVA_DEMO_IMAGES,
        LLAVA_DEMO_PRETRAIN,
        build_tiny_clip,
    )

    assert {family_of(n) for n in TRAINED} | MULTIMODAL == set(FAMILIES)
    data = _alpaca_dir(tmp_path, demo_assets)
    jobs = []
    for name in TRAINED:
        settings = _sft_settings(name, tiny_models, data)
        jobs.append((tiny_version(name, settings, str(tmp_path)), str(tmp_path / name)))

    # LLaVA: stage 1 then stage 2 from its checkpoint, with a tiny Qwen2 and a tiny CLIP.
    clip = str(tmp_path / "clip")
    build_tiny_clip(clip)
    (pretrain,) = [n for n in BUNDLED if n.startswith("llava_") and n.endswith("_pretrain")]
    (finetune,) = [n for n in BUNDLED if n.startswith("llava_") and n.endswith("_finetune")]
    llava = {
        "llm_name_or_path": repr(tiny_models["Qwen2ForCausalLM"]),
        "visual_encoder_name_or_path": repr(clip),
        "image_folder": repr(LLAVA_DEMO_IMAGES),
        "batch_size": "2",
        "dataloader_num_workers": "0",
        "evaluation_images": repr(osp.join(LLAVA_DEMO_IMAGES, "red_circle.png")),
        "evaluation_inputs": "[]",
    }
    pre_data, ft_data = (_repeated(p, tmp_path) for p in (LLAVA_DEMO_PRETRAIN, LLAVA_DEMO_FINETUNE))
    pre = tiny_version(pretrain, {**llava, "data_path": repr(pre_data)}, str(tmp_path))
    pth = str(tmp_path / pretrain / "iter_3.pth")
    ft_settings = {**llava, "data_path": repr(ft_data), "pretrained_pth": repr(pth)}
    ft = tiny_version(finetune, ft_settings, str(tmp_path))
    jobs += [(pre, str(tmp_path / pretrain)), (ft, str(tmp_path / finetune))]

    # InternVL: a tiny native InternVL (tiny InternVL vision tower, tiny Qwen2).
    from xtuner.demo.internvl import write_internvl_data

    internvl_data = write_internvl_data(str(tmp_path / "internvl_data"), repeat=12)
    (internvl_name,) = [n for n in BUNDLED if n.startswith("internvl3_")]
    internvl_settings = {
        "path": repr(internvl_path),
        "data_path": repr(internvl_data["data"]),
        "image_folder": repr(internvl_data["image_folder"]),
        "max_length": "512",
        "batch_size": "2",
        "accumulative_counts": "1",
        "dataloader_num_workers": "0",
    }
    cfg = tiny_version(internvl_name, internvl_settings, str(tmp_path))
    jobs.append((cfg, str(tmp_path / internvl_name)))

    out = _train_all(jobs)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    multimodal = [(pretrain, {"loss"}), (finetune, {"loss"}), (internvl_name, {"loss"})]
    for name, terms in [*TRAINED.items(), *multimodal]:
        records = _logged(str(tmp_path / name))
        assert [r["step"] for r in records] == [1, 2, 3], name
        for record in records:
            assert terms <= set(record), f"{name} logged {sorted(record)}, not {terms}"
            assert all(record[t] == record[t] for t in terms), f"{name}: NaN loss"  # noqa: PLR0124
            if "loss_router_aux" in terms:  # the total is the four terms, each one non-zero
                parts = [record[t] for t in terms - {"loss"}]
                assert record["loss"] == pytest.approx(sum(parts), rel=1e-5), record
                assert all(v > 0 for v in parts), record
    assert "loaded " in out.stdout + out.stderr  # the finetune stage read the pretrain's weights

    # The finetune's checkpoint in the original LLaVA layout (LlavaQwenForCausalLM).
    import torch
    from safetensors.torch import load_file

    from xtuner.entry_point import cli

    pth, official = str(tmp_path / finetune / "iter_3.pth"), tmp_path / "official"
    argv = ["convert", "pth_to_hf", ft, pth, str(official), "--fp32", "--save-format", "official"]
    assert cli(argv) == 0
    with open(official / "config.json", encoding="utf-8") as f:
        assert json.load(f)["architectures"] == ["LlavaQwenForCausalLM"]
    saved = load_file(official / "model.safetensors")
    trained = torch.load(pth, map_location="cpu", weights_only=False)["state_dict"]
    for key in ("model.0.weight", "model.2.bias"):
        assert torch.equal(saved[f"model.mm_projector.{key[6:]}"], trained[f"projector.{key}"])


def _sft_settings(name: str, tiny_models: dict[str, str], data: str) -> dict[str, str]:
    """The PART 1 settings that swap an SFT config's model and data for tiny local ones."""
    model = tiny_models[FAMILIES[family_of(name)]]
    settings = {
        "pretrained_model_name_or_path": repr(model),
        "alpaca_en_path": repr(data),
        "max_length": "128",
        "batch_size": "2",
        "accumulative_counts": "1",
        "evaluation_inputs": "[]",  # generation is tested elsewhere
    }
    if name.endswith("_kd"):
        settings["teacher_model_name_or_path"] = repr(model)
    return settings


def _launch_of(name: str) -> list[str]:
    """The ``--deepspeed PRESET`` of the config's own run command (its header), if any."""
    with open(cfgs_name_path[name], encoding="utf-8") as f:
        found = re.search(r"^#\s+.*xtuner train \S+ --deepspeed (\w+)", f.read(), re.M)
    return ["--deepspeed", found.group(1)] if found else []


# Every other text config (one per family trains in CI above): make test-all trains them all,
# each as its header says to run it (its DeepSpeed preset; sequence parallel on 2 ranks).
OTHER_SFT = [
    n
    for n in BUNDLED
    if n not in TRAINED and not n.startswith("llava_") and not _preference_kind(n)
]


@pytest.mark.slow_all
def test_every_other_sft_config_trains_3_iterations_on_a_tiny_model(
    tmp_path, tiny_models, demo_assets
):
    data = _alpaca_dir(tmp_path, demo_assets)
    jobs = [
        (tiny_version(n, _sft_settings(n, tiny_models, data), str(tmp_path)), str(tmp_path / n))
        for n in OTHER_SFT
        if "_sp" not in n
    ]
    out = _train_all(jobs)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for _, work_dir in jobs:
        records = _logged(work_dir)
        assert [r["step"] for r in records] == [1, 2, 3], work_dir
        assert all(r["loss"] == r["loss"] for r in records), work_dir  # noqa: PLR0124


@pytest.mark.slow_all
@pytest.mark.multiproc
@pytest.mark.parametrize("name", [n for n in OTHER_SFT if "_sp" in n])
def test_sequence_parallel_config_trains_with_its_deepspeed_preset(
    tmp_path, tiny_models, demo_assets, name
):
    settings = _sft_settings(name, tiny_models, _alpaca_dir(tmp_path, demo_assets))
    settings["sequence_parallel_size"] = "2"  # the tiny model on 2 CPU ranks
    cfg = tiny_version(name, settings, str(tmp_path))
    work_dir = str(tmp_path / "work")
    launch = _launch_of(name)
    assert launch, f"{name}: its header names no --deepspeed preset"
    args = [sys.executable, "-m", "xtuner.entry_point", "train", cfg, "--work-dir", work_dir]
    args += ["--seed", "0", *launch, "--cfg-options", "train_cfg.max_epochs=None"]
    args += ["train_cfg.max_iters=3", "default_hooks.logger.interval=1"]
    env = dict(os.environ, NPROC_PER_NODE="2", OMP_NUM_THREADS="1")  # xtuner picks a port
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "xtuner_ulysses" in out.stdout + out.stderr
    assert [r["step"] for r in _logged(work_dir)] == [1, 2, 3]


def _conversation_pairs(tmp_path, count: int = 300) -> str:
    """A folder with a JSONL file of pairs in the layout of mlabonne/orpo-dpo-mix-40k and
    UltraFeedback: ``chosen`` and ``rejected`` conversations differing in the last turn."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    lines = []
    for i in range(count):
        question = {"role": "user", "content": f"Tell me about the number {i}."}
        good = {"role": "assistant", "content": f"The number {i} is a fine number."}
        bad = {"role": "assistant", "content": "No."}
        lines.append(json.dumps({"chosen": [question, good], "rejected": [question, bad]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


# The data-path setting of each kind (upstream's data sets for them).
PREFERENCE_DATA = {
    "dpo": "orpo_dpo_mix_40k_path",
    "orpo": "ultrafeedback_path",
    "reward": "ultrafeedback_path",
}
# The terms each kind of preference config must log.
PREFERENCE_TERMS = {
    "dpo": {"loss", "reward_acc", "reward_margin"},
    "orpo": {"loss", "loss_nll", "loss_or"},
    "reward": {"loss", "reward_acc"},
}


@pytest.mark.slow
def test_preference_configs_train_3_iterations_on_a_tiny_model(tmp_path, tiny_models):
    names = [n for n in BUNDLED if _preference_kind(n)]
    assert {_preference_kind(n) for n in names} == set(PREFERENCE_KINDS)
    data = _conversation_pairs(tmp_path)
    jobs = []
    for name in names:
        settings = {
            "pretrained_model_name_or_path": repr(tiny_models[FAMILIES[family_of(name)]]),
            "max_length": "64",
            "accumulative_counts": "1",
        }
        settings[PREFERENCE_DATA[_preference_kind(name)]] = repr(data)
        if _preference_kind(name) == "reward":
            settings["reward_token_id"] = "0"  # the tiny vocabulary's <unk>
        else:
            settings["evaluation_inputs"] = "[]"
        jobs.append((tiny_version(name, settings, str(tmp_path)), str(tmp_path / name)))
    out = _train_all(jobs)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for name in names:
        records = _logged(str(tmp_path / name))
        assert [r["step"] for r in records] == [1, 2, 3], name
        terms = PREFERENCE_TERMS[_preference_kind(name)]
        for record in records:
            assert terms <= set(record), f"{name} logged {sorted(record)}, not {terms}"
            assert all(record[t] == record[t] for t in terms), f"{name}: NaN"  # noqa: PLR0124


# -- the docs' config list -----------------------------------------------------------------


def test_docs_config_list_is_the_generated_one():
    sys.path.insert(0, osp.join(ROOT, "tools"))
    try:
        import config_list
    finally:
        sys.path.pop(0)
    for lang in ("en", "zh_cn"):
        path = osp.join(ROOT, "docs", lang, "configs.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert config_list.render(CONFIG_DIR, lang) in text, (
            f"docs/{lang}/configs.md is out of date: run python tools/config_list.py"
        )


def test_list_cfg_and_copy_cfg_find_the_bundled_configs(tmp_path, capsys):
    from xtuner.entry_point import cli

    assert cli(["list-cfg", "-p", "qwen3_8b"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted(n for n in cfgs_name_path if "qwen3_8b" in n) and len(listed) == 5
    assert cli(["copy-cfg", "qwen3_8b_qlora_alpaca_e3", str(tmp_path)]) == 0
    copied = tmp_path / "qwen3_8b_qlora_alpaca_e3_copy.py"
    with open(cfgs_name_path["qwen3_8b_qlora_alpaca_e3"], encoding="utf-8") as f:
        assert copied.read_text() == f.read()
