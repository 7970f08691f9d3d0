"""Parameters shared by the per-loss reference tests."""

import pytest
import torch

LAYOUTS = ["padded", "packed"]
REDUCTIONS = ["token", "sample", "square"]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


@pytest.fixture(params=REDUCTIONS)
def reduction(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=["fp32", "fp64"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True, params=["vocab_major", "row_major"])
def logits_layout(request, monkeypatch) -> str:
    """Runs every loss test with chunk logits in both layouts (CPU: vocabulary-major; other
    devices: row-major), so the path GPUs take is tested on the CPU too."""
    if request.param == "row_major":
        monkeypatch.setattr("xtuner.model.losses.base.vocab_major", lambda device: False)
    return request.param
