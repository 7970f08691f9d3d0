"""The config matrix: upstream-style configs through the ``xtuner`` console script.

{full, LoRA, QLoRA 4-bit} x {SFT, LLaVA} x {one process, 2 processes, 2 processes + ZeRO-2} x
{default loss, a user loss registered in a ``custom_imports`` module, a user loss by dotted
path}: 54 runs. ``make test`` (CI) runs an orthogonal-array diagonal of 9 of them, in which
every pair of values of any two axes occurs at least once (``model`` has 2 values, so its
third level repeats SFT), plus 8-bit QLoRA; ``make test-all`` runs all 54. Each run must
log a finite loss and a finite non-zero gradient norm at every iteration and save a
checkpoint, which under LoRA/QLoRA holds only the trainable weights.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import math
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "train_cli", osp.join(osp.dirname(osp.abspath(__file__)), "test_train_cli.py")
)
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
write_config, HERE = _cli.write_config, _cli.HERE

METHODS = ("full", "lora", "qlora4")
MODELS = ("sft", "llava")
LAUNCHES = ("1proc", "2proc", "2proc_zero2")
LOSSES = ("default", "custom_imports", "dotted")

# L9(3^4) orthogonal array; model's third level maps back to SFT.
_L9 = [(0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1)]
_L9 += [(2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0)]
DIAGONAL = {(METHODS[a], MODELS[c % 2], LAUNCHES[b], LOSSES[d]) for a, b, c, d in _L9}

#: the user's loss module, as a user writes it next to their config.
USER_LOSS_MODULE = '''
import torch.nn.functional as F

from xtuner.model.losses import TokenLoss
from xtuner.registry import LOSSES


@LOSSES.register_module()
class MatrixPoly1Loss(TokenLoss):
    """Poly-1 cross-entropy (CE + epsilon * (1 - p))."""

    default_name = "poly1"

    def __init__(self, epsilon=1.0, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        print("MATRIX_USER_LOSS_BUILT", flush=True)

    def token_loss(self, logits, targets, extras):
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ce + self.epsilon * (1 - (-ce).exp())
'''

QUANT_4BIT = (
    ",\n        quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, "
    "load_in_8bit=False, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False, "
    "bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True, "
    "bnb_4bit_quant_type='nf4')"
)
QUANT_8BIT = (
    ",\n        quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=False, "
    "load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False)"
)
LORA = (
    "dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.1, bias='none', "
    "task_type='CAUSAL_LM')"
)
VIT_LORA = "dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.05, bias='none')"
LOSS_KEYS = {
    "default": "",
    "custom_imports": ",\n    loss=dict(type='MatrixPoly1Loss', epsilon=0.5)",
    "dotted": ",\n    loss=dict(type='matrix_user_losses.MatrixPoly1Loss', epsilon=0.5)",
}
MAX_ITERS = 2


@pytest.fixture(scope="module")
def matrix_assets(demo_assets, tmp_path_factory) -> dict[str, str]:
    from xtuner.demo.llava import build_tiny_clip, write_llava_data

    root = tmp_path_factory.mktemp("matrix_assets")
    clip = str(root / "clip")
    build_tiny_clip(clip)
    llava = write_llava_data(str(root / "llava"))
    return dict(demo_assets, clip=clip, llava_root=osp.dirname(llava["finetune_data"]))


def method_fields(method: str) -> dict[str, str]:
    """The config text of a fine-tuning method: dtype, quantisation, LoRA."""
    if method == "full":
        return dict(torch_dtype="torch.float32", quantization="", lora="None")
    if method == "lora":
        return dict(torch_dtype="torch.float32", quantization="", lora=LORA)
    quant = {"qlora4": QUANT_4BIT, "qlora8": QUANT_8BIT}[method]
    return dict(torch_dtype="torch.float16", quantization=quant, lora=LORA)


def write_matrix_config(folder, assets, method: str, model: str, loss: str) -> str:
    """An upstream-style config for one corner, and the user's loss module beside it."""
    (folder / "matrix_user_losses.py").write_text(USER_LOSS_MODULE)
    header = (
        "custom_imports = dict(imports=['matrix_user_losses'], allow_failed_imports=False)"
        if loss == "custom_imports"
        else ""
    )
    fields = method_fields(method)
    if model == "sft":
        return write_config(
            folder,
            assets,
            name="matrix.py",
            max_iters=MAX_ITERS,
            save_steps=MAX_ITERS,
            loss=LOSS_KEYS[loss],
            header=header,
            param_scheduler="[]",
            **fields,
        )
    with open(osp.join(HERE, "upstream_style_llava_config.py.tmpl"), encoding="utf-8") as f:
        text = f.read().format(
            header=header,
            model_path=assets["model"],
            clip_path=assets["clip"],
            data_root=assets["llava_root"],
            max_iters=MAX_ITERS,
            save_steps=MAX_ITERS,
            freeze_llm=method != "full",
            torch_dtype=fields["torch_dtype"],
            quantization=fields["quantization"],
            lora=fields["lora"],
            visual_encoder_lora="None" if method == "full" else VIT_LORA,
            loss=LOSS_KEYS[loss],
        )
    path = folder / "matrix.py"
    path.write_text(text)
    return str(path)


def run_console_script(*args, env=None, cwd=None):
    """``xtuner ...`` as a user types it: the console script, whose ``sys.path`` has neither
    the current directory nor the config's folder (``python -m`` would add the former)."""
    script = osp.join(osp.dirname(sys.executable), "xtuner")
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [script, *args], capture_output=True, text=True, env=full_env, timeout=900, cwd=cwd
    )


def logged(work_dir: str, key: str) -> list[float]:
    runs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    assert runs, f"no scalars.json under {work_dir}"
    with open(runs[-1], encoding="utf-8") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """The model weights of an mmengine ``.pth`` or a DeepSpeed checkpoint folder."""
    if osp.isdir(path):
        files = glob.glob(osp.join(path, "*model_states.pt"))
        assert files, f"no model states in {path}: {os.listdir(path)}"
        return torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def run_corner(tmp_path, assets, method, model, launch, loss):
    cfg = write_matrix_config(tmp_path, assets, method, model, loss)
    work_dir = str(tmp_path / "work")
    args = ["train", cfg, "--work-dir", work_dir, "--seed", "0"]
    env = {}
    if launch != "1proc":
        env["NPROC_PER_NODE"] = "2"
    if launch == "2proc_zero2":
        args += ["--deepspeed", "deepspeed_zero2"]
    # From another folder: the config's folder is where custom_imports finds the module.
    out = run_console_script(*args, env=env, cwd=str(tmp_path.parent))
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert out.returncode == 0, "\n".join(errors[:20]) or out.stderr[-4000:]

    losses, norms = logged(work_dir, "loss"), logged(work_dir, "grad_norm")
    assert len(losses) == MAX_ITERS and len(norms) == MAX_ITERS, (losses, norms)
    assert all(math.isfinite(v) for v in losses), losses
    assert all(math.isfinite(v) and v > 0 for v in norms), norms
    assert ("MATRIX_USER_LOSS_BUILT" in out.stdout) == (loss != "default")
    ckpt = osp.join(work_dir, f"iter_{MAX_ITERS}.pth")
    assert osp.exists(ckpt), os.listdir(work_dir)
    weights = checkpoint_weights(ckpt)
    assert weights, "empty checkpoint"
    if method != "full":
        # Adapters (and LLaVA's projector) only: no frozen or quantised base weight.
        frozen = [k for k in weights if "lora_" not in k and "projector" not in k]
        assert not frozen, frozen[:5]
    return out


CORNERS = list(itertools.product(METHODS, MODELS, LAUNCHES, LOSSES))


def _marks(corner):
    marks = [] if corner in DIAGONAL else [pytest.mark.slow_all]
    if corner[2] != "1proc":
        marks.append(pytest.mark.multiproc)
    return marks + [pytest.mark.slow]


@pytest.mark.parametrize(
    "method,model,launch,loss",
    [pytest.param(*c, marks=_marks(c), id="-".join(c)) for c in CORNERS],
)
def test_matrix(tmp_path, matrix_assets, method, model, launch, loss):
    run_corner(tmp_path, matrix_assets, method, model, launch, loss)


def test_diagonal_covers_every_pair():
    axes = (METHODS, MODELS, LAUNCHES, LOSSES)
    for i, j in itertools.combinations(range(4), 2):
        seen = {(c[i], c[j]) for c in DIAGONAL}
        assert seen == set(itertools.product(axes[i], axes[j])), (i, j)


@pytest.mark.parametrize(
    "launch",
    [
        pytest.param("1proc", marks=pytest.mark.slow),
        pytest.param("2proc", marks=[pytest.mark.slow_all, pytest.mark.multiproc]),
        pytest.param("2proc_zero2", marks=[pytest.mark.slow_all, pytest.mark.multiproc]),
    ],
)
def test_qlora_8bit_trains(tmp_path, matrix_assets, launch):
    run_corner(tmp_path, matrix_assets, "qlora8", "sft", launch, "custom_imports")
