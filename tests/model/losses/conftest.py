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
