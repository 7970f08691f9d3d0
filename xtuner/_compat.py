"""Fixes for mmengine 0.10.7 (no longer updated) on the current torch/deepspeed/setuptools.

:func:`apply_patches` (called when :mod:`xtuner` is imported) installs each fix without
importing torch or mmengine: a fix to an mmengine module is applied right after that module is
first executed (an import hook), or at once if it already is, so ``import xtuner`` stays cheap
and the light ``xtuner`` commands start in a fraction of a second. Every fix is idempotent and
has a test in ``tests/test_compat.py`` that fails without it.

1. Checkpoints: ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, and
   mmengine checkpoints hold ``HistoryBuffer`` and numpy objects. Paths the user named
   (``--resume``, ``load_from``, the work dir) are registered as trusted with
   :func:`trust_checkpoint_path` and loaded with ``weights_only=False``; any other path keeps
   torch's safe default.
2. Distributed on CPU: ``mmengine.dist`` calls ``torch.cuda.set_device`` unconditionally and
   asks for NCCL; ``Runner.wrap_model`` passes ``device_ids`` to DDP. Without CUDA we use
   gloo, skip ``set_device`` and drop ``device_ids``.
3. deepspeed >= 0.19 removed ``deepspeed.runtime.fp16.onebit``, which mmengine's DeepSpeed
   strategy imports: an import hook serves a stand-in module only when the real one is
   missing (its optimizers raise a clear error if a config asks for them).
4. setuptools >= 81 removed ``pkg_resources``, which mmengine uses to find installed
   packages (``pkg::`` config paths): rewritten on :mod:`importlib.metadata`.
5. ``AmpOptimWrapper`` asserts that a GPU exists: :func:`adapt_config_to_device` swaps it
   (and flash attention) for what the machine has, with a one-line warning each.
6. ``IterBasedTrainLoop`` sleeps 2 s whenever its dataloader restarts an epoch:
   :class:`xtuner.engine.runner.TrainLoop` iterates without that sleep.
7. Start-up time: every ``mmengine.runner`` import imports deepspeed (for its DeepSpeed
   strategy) and bitsandbytes (to register its optimizers), and every HF ``save_pretrained``
   imports deepspeed (accelerate's model unwrapping), used or not: 1.5-2.5 s of CPU per
   run. Each import now happens when the run needs it: a DeepSpeed strategy is built, a
   config names a bitsandbytes optimizer by string, a DeepSpeed engine exists.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import os.path as osp
import sys
import types
from collections.abc import Callable, Iterator

_APPLIED = False
_TRUSTED: set[str] = set()


# 1. trusted checkpoint loading -------------------------------------------------------------
def trust_checkpoint_path(path: str) -> None:
    """Allows full unpickling of checkpoints at or under ``path`` (a file or folder)."""
    _TRUSTED.add(osp.realpath(osp.expanduser(path)))


def is_trusted_checkpoint(path: str) -> bool:
    real = osp.realpath(osp.expanduser(path))
    return any(real == root or real.startswith(root + os.sep) for root in _TRUSTED)


def load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local loader, with ``weights_only=False`` for trusted paths only."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"checkpoint {filename} does not exist")
    import torch

    weights_only = not is_trusted_checkpoint(filename)
    return torch.load(filename, map_location=map_location, weights_only=weights_only)


def _patch_checkpoint_loader(checkpoint: types.ModuleType) -> None:
    checkpoint.CheckpointLoader.register_scheme(
        prefixes="", loader=load_local_checkpoint, force=True
    )


# 2. distributed on CPU ----------------------------------------------------------------------
def _init_dist_pytorch_cpu_aware(backend="nccl", init_backend="torch", **kwargs) -> None:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        return _ORIGINAL["init_dist_pytorch"](backend, init_backend=init_backend, **kwargs)
    if init_backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", **kwargs)
    else:
        dist.init_process_group(backend="gloo", **kwargs)


_ORIGINAL: dict = {}


def _patch_init_dist(dist_utils: types.ModuleType) -> None:
    if dist_utils._init_dist_pytorch is not _init_dist_pytorch_cpu_aware:
        _ORIGINAL.setdefault("init_dist_pytorch", dist_utils._init_dist_pytorch)
    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu_aware


def _patch_ddp(wrappers: types.ModuleType) -> None:
    MMDistributedDataParallel = wrappers.MMDistributedDataParallel
    original_init = MMDistributedDataParallel.__init__
    if getattr(original_init, "_xtuner_cpu_aware", False):
        return

    def __init__(self, module, detect_anomalous_params=False, **kwargs):
        first = next(module.parameters(), None)
        if first is not None and first.device.type == "cpu":
            kwargs.pop("device_ids", None)
            kwargs.pop("output_device", None)
        original_init(self, module, detect_anomalous_params=detect_anomalous_params, **kwargs)

    __init__._xtuner_cpu_aware = True
    MMDistributedDataParallel.__init__ = __init__


# 3. deepspeed.runtime.fp16.onebit -----------------------------------------------------------
_ONEBIT = "deepspeed.runtime.fp16.onebit"


class _MissingOptimizer:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__} was removed from deepspeed {_deepspeed_version()}; "
            "choose another optimizer in the config (e.g. torch.optim.AdamW)"
        )


def _deepspeed_version() -> str:
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class _OnebitFallbackFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Consulted last: serves the stand-in only when no real module was found."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _ONEBIT:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        for name in ("OnebitAdam", "OnebitLamb", "ZeroOneAdam"):
            setattr(module, name, type(name, (_MissingOptimizer,), {}))
        return module

    def exec_module(self, module):
        return None


def _patch_deepspeed_onebit() -> None:
    if not any(isinstance(f, _OnebitFallbackFinder) for f in sys.meta_path):
        sys.meta_path.append(_OnebitFallbackFinder())


# 4. pkg_resources ---------------------------------------------------------------------------
def is_installed(package: str) -> bool:
    """Whether a distribution or an importable module of that name exists."""
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def get_installed_path(package: str) -> str:
    """Folder of an installed package's module (as mmengine's ``pkg::`` paths need)."""
    from mmengine.utils.package_utils import package2module

    try:
        module = package2module(package)
    except Exception:
        module = package
    spec = importlib.util.find_spec(module) or importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{package} is not installed")
    return osp.dirname(spec.origin)


def _package2module(package: str) -> str:
    dist = importlib.metadata.distribution(package)
    top = dist.read_text("top_level.txt")
    if top:
        return top.split("\n")[0]
    files = dist.files or []
    for f in files:
        if f.name == "__init__.py" and len(f.parts) == 2:
            return f.parts[0]
    raise ValueError(f"cannot infer the module name of {package}")


def _patch_package_lookup(module: types.ModuleType) -> None:
    """Replaces the lookups in a module that defines or imported them."""
    for name, fn in (
        ("is_installed", is_installed),
        ("get_installed_path", get_installed_path),
        ("package2module", _package2module),
    ):
        if hasattr(module, name):
            setattr(module, name, fn)


# 5. configs that ask for a GPU --------------------------------------------------------------
def flash_attn_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def adapt_config_to_device(cfg) -> list[str]:
    """Rewrites GPU-only choices of a config for this machine; returns one line per change."""
    import torch

    changes: list[str] = []
    optim = cfg.get("optim_wrapper")
    if optim is not None and not torch.cuda.is_available():
        wrapper = optim.get("type")
        name = wrapper if isinstance(wrapper, str) else getattr(wrapper, "__name__", "")
        if name == "AmpOptimWrapper":
            optim["type"] = "OptimWrapper"
            for key in ("dtype", "loss_scale", "use_fsdp"):
                optim.pop(key, None)
            changes.append("AmpOptimWrapper needs a GPU: training in fp32 with OptimWrapper")
    model = cfg.get("model")
    llm = model.get("llm") if model is not None else None
    wants_flash = isinstance(llm, dict) and llm.get("attn_implementation") == "flash_attention_2"
    if wants_flash and not flash_attn_available():
        llm["attn_implementation"] = "sdpa"
        changes.append("flash-attn is not usable here: attention falls back to sdpa")
    return changes


# 7. imports nobody asked for ----------------------------------------------------------------
@contextlib.contextmanager
def _import_blocked(name: str) -> Iterator[None]:
    """While active, ``import name`` raises ImportError (unless it is already imported)."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # the documented way to make an import fail
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


class _DeferredDeepSpeed(types.ModuleType):
    """Stands in for ``deepspeed`` in mmengine's strategy module until first used."""

    def __init__(self, owner: types.ModuleType):
        super().__init__("deepspeed")
        self._owner = owner

    def __getattr__(self, name: str):
        real = importlib.import_module("deepspeed")
        self._owner.deepspeed = real
        return getattr(real, name)


@contextlib.contextmanager
def _defer_deepspeed(strategy: types.ModuleType) -> Iterator[None]:
    """Executes ``mmengine._strategy.deepspeed`` without importing deepspeed.

    While the module runs, ``import deepspeed`` fails as if deepspeed were absent; then the
    module's ``deepspeed`` global becomes a stand-in that imports the real package at its
    first use: ``DeepSpeedStrategy()`` checks it, and registers DeepSpeed's optimizers by
    importing it.
    """
    with _import_blocked("deepspeed"):
        yield
    if strategy.deepspeed is None and importlib.util.find_spec("deepspeed") is not None:
        strategy.deepspeed = _DeferredDeepSpeed(strategy)


def _patch_unwrap_model(other: types.ModuleType) -> None:
    """accelerate's ``extract_model_from_parallel`` (behind every HF ``save_pretrained``)
    imports deepspeed whenever it is installed, to test ``isinstance(model, DeepSpeedEngine)``;
    no model can be a DeepSpeedEngine while deepspeed is not imported, so it then skips it."""
    installed = other.is_deepspeed_available
    if getattr(installed, "_xtuner_imported_only", False):
        return

    def is_deepspeed_available() -> bool:
        return "deepspeed" in sys.modules and installed()

    is_deepspeed_available._xtuner_imported_only = True
    other.is_deepspeed_available = is_deepspeed_available


@contextlib.contextmanager
def _defer_bitsandbytes(builder: types.ModuleType) -> Iterator[None]:
    """Executes ``mmengine.optim.optimizer.builder`` without importing bitsandbytes.

    The builder registers bitsandbytes' optimizers by importing it (1-2 s of CPU). Here the
    registration happens when the optimizer registry first misses a name instead: only a
    config naming such an optimizer by string (``type='PagedAdamW8bit'``) needs it.
    """
    with _import_blocked("bitsandbytes"):
        yield
    if builder.BITSANDBYTES_OPTIMIZERS or importlib.util.find_spec("bitsandbytes") is None:
        return
    registry = builder.OPTIMIZERS
    get = registry.get

    def get_registering_bitsandbytes(key):
        found = get(key)
        if found is None and registry.get is get_registering_bitsandbytes:
            registry.get = get  # first miss: register once (it looks names up itself)
            builder.BITSANDBYTES_OPTIMIZERS = builder.register_bitsandbytes_optimizers()
            found = get(key)
        return found

    registry.get = get_registering_bitsandbytes


# applying the fixes -------------------------------------------------------------------------
#: module -> the fix run right after it is executed (fixes 1, 2, 4 and 7).
_AFTER_IMPORT: dict[str, Callable[[types.ModuleType], None]] = {
    "mmengine.runner.checkpoint": _patch_checkpoint_loader,
    "mmengine.dist.utils": _patch_init_dist,
    "mmengine.model.wrappers.distributed": _patch_ddp,
    "mmengine.utils.package_utils": _patch_package_lookup,
    "mmengine.utils": _patch_package_lookup,
    "mmengine.config.config": _patch_package_lookup,
    "accelerate.utils.other": _patch_unwrap_model,
}
#: module -> the context its execution runs in (fix 7's deferred imports).
_AROUND_IMPORT: dict[str, Callable[[types.ModuleType], contextlib.AbstractContextManager]] = {
    "mmengine._strategy.deepspeed": _defer_deepspeed,
    "mmengine.optim.optimizer.builder": _defer_bitsandbytes,
}


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, with its fixes applied around and after executing it."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        around = _AROUND_IMPORT.get(module.__name__, contextlib.nullcontext)
        with around(module):
            self._loader.exec_module(module)
        if module.__name__ in _AFTER_IMPORT:
            _AFTER_IMPORT[module.__name__](module)

    def __getattr__(self, name: str):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _PatchOnImportFinder(importlib.abc.MetaPathFinder):
    """Consulted first: finds the modules that have fixes with the other finders and hands
    back their specs with a :class:`_PatchingLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _AFTER_IMPORT and fullname not in _AROUND_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def apply_patches() -> None:
    """Installs fixes 1-4 and 7 (5 and 6 act where configs are read and loops run).

    Modules already imported are fixed now; the others when they are first imported.
    """
    global _APPLIED
    if _APPLIED:
        return
    _patch_deepspeed_onebit()
    for name, patch in _AFTER_IMPORT.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PatchOnImportFinder())
    _APPLIED = True
