"""DeepSpeed ZeRO-3 parameters: gathering them where code outside a module's forward needs them.

Under ZeRO-3 every rank keeps a slice of each parameter (``param.data`` is an empty
placeholder; ``ds_shape`` is the real shape) and DeepSpeed gathers a module's parameters
around that module's forward and backward. Code that reads a parameter elsewhere (the loss
reads the output head's weight; saving reads every weight) must gather it itself, with
DeepSpeed's :class:`deepspeed.zero.GatheredParameters`. Without ZeRO-3 everything here is a
no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from mmengine.dist import is_main_process
from torch import Tensor, nn


def is_partitioned(param: Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (DeepSpeed gives those a ``ds_id``)."""
    return hasattr(param, "ds_id")


def full_shape(param: Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also while ZeRO-3 holds only a slice of it."""
    return tuple(getattr(param, "ds_shape", param.shape))


@contextlib.contextmanager
def gathered(params: Iterable[Tensor]) -> Iterator[None]:
    """Makes the ZeRO-3 parameters among ``params`` whole on every rank inside the block
    (read-only; a collective: every rank must enter it)."""
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def register_external_parameters(module: nn.Module, params: Iterable[Tensor | None]) -> None:
    """Tells ZeRO-3 that ``module``'s forward reads ``params`` of another module.

    DeepSpeed then gathers them around ``module``'s forward and backward, and their
    gradients reach their partitions as those of any other parameter. Idempotent.
    """
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        return
    import deepspeed

    for param in partitioned:
        deepspeed.zero.register_external_parameter(module, param)


def consolidated_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with whole CPU tensors, gathered one module at a time.

    A collective under ZeRO-3 (every rank must call it); only rank 0 gets the tensors (the
    other ranks get an empty dict), so no rank holds more than one module's whole
    parameters on the device at once. The keys are those of ``model.state_dict()``, so a
    model that saves only some weights (LoRA adapters) gets only those.
    """
    wanted = set(model.state_dict())
    keep = is_main_process()
    state: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        own = [
            (name, t)
            for name, t in (*module._parameters.items(), *module._buffers.items())
            if t is not None and f"{prefix}.{name}".lstrip(".") in wanted
        ]
        if not own:
            continue
        with gathered(t for _, t in own):
            if keep:
                for name, tensor in own:
                    state[f"{prefix}.{name}".lstrip(".")] = tensor.detach().cpu().clone()
    return state


def check_whole(state: dict[str, Tensor], model: nn.Module) -> None:
    """Raises if a tensor about to be saved is not the whole parameter it stands for.

    Args:
        state: parameter name in ``model`` -> tensor to be written.
        model: the model whose (possibly partitioned) parameters give the real shapes.

    Raises:
        RuntimeError: naming the keys whose tensors are empty or of another shape.
    """
    shapes = {name: full_shape(p) for name, p in model.named_parameters()}
    bad = [
        f"{key} {tuple(tensor.shape)} (should be {shapes[key]})"
        for key, tensor in state.items()
        if key in shapes and tuple(tensor.shape) != shapes[key]
    ]
    if bad:
        raise RuntimeError(
            f"refusing to save {len(bad)} partial tensor(s), e.g. {', '.join(bad[:3])}: the "
            "weights are still partitioned (ZeRO-3). Gather them first "
            "(xtuner.parallel.zero.consolidated_state_dict), or convert the checkpoint "
            "folder with 'xtuner convert pth_to_hf'."
        )
