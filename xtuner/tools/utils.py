"""Shared helpers of the command-line tools: finding configs and reporting errors.

Importing this module is cheap (no mmengine, no torch): tools parse their arguments first,
so ``-h`` and a mistyped flag answer at once, and import the heavy libraries afterwards.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import os.path as osp
import re
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from xtuner.configs import cfgs_name_path

if TYPE_CHECKING:
    from mmengine.config import Config

RUNNER_KEYS = [
    "model",
    "work_dir",
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
    "train_cfg",
    "val_cfg",
    "test_cfg",
    "auto_scale_lr",
    "optim_wrapper",
    "param_scheduler",
    "val_evaluator",
    "test_evaluator",
    "default_hooks",
    "custom_hooks",
    "data_preprocessor",
    "load_from",
    "resume",
    "launcher",
    "env_cfg",
    "log_processor",
    "log_level",
    "visualizer",
    "default_scope",
    "randomness",
    "experiment_name",
    "strategy",
]


class UserError(Exception):
    """A problem the user can fix; printed as one paragraph, without a traceback."""


def resolve_config_path(config: str) -> str:
    """A config argument is a file path or the name of a bundled config."""
    if osp.isfile(config):
        return config
    if config in cfgs_name_path:
        return cfgs_name_path[config]
    close = difflib.get_close_matches(config, list(cfgs_name_path), n=1)
    hint = f" Did you mean the bundled config {close[0]!r}?" if close else ""
    raise UserError(
        f"config {config!r} is neither a file nor a bundled config name.{hint} "
        "'xtuner list-cfg' lists the bundled configs."
    )


def load_config(config: str, cfg_options: dict | None = None) -> Config:
    from mmengine.config import Config

    path = resolve_config_path(config)
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as exc:
        raise UserError(
            f"config {path} has a syntax error at line {exc.lineno}: {exc.msg}"
        ) from exc
    except (ImportError, NameError) as exc:
        raise UserError(f"config {path} failed to load: {exc}") from exc
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    _check_top_level_keys(cfg, path)
    import_custom_modules(cfg, path)
    return cfg


def user_module_folders(path: str) -> list[str]:
    """Where a config's own modules are found: the current directory, then its folder.

    Both are appended to ``sys.path`` (so they never shadow an installed package) for
    ``custom_imports`` and for dotted paths such as ``loss=dict(type='my_losses.MyLoss')``.
    """
    folders = [os.getcwd(), osp.dirname(osp.abspath(path))]
    for folder in folders:
        if folder not in sys.path:
            sys.path.append(folder)
    return folders


def import_custom_modules(cfg: Config, path: str) -> list[str]:
    """Imports the config's ``custom_imports`` (user losses, map functions, templates, hooks).

    mmengine does this only for configs it parses eagerly; XTuner configs import ``xtuner``,
    ``transformers`` ... at their top, so mmengine parses them lazily and skips
    ``custom_imports``. Modules are looked up on ``sys.path``, then in the current directory,
    then in the config's folder (:func:`user_module_folders`). Every process of a job
    (torchrun ranks, ``check-loss``, the data tools) loads the config through here, so every
    one registers the same components.

    Args:
        cfg: the loaded config.
        path: the config file (its folder is searched).

    Returns:
        The names of the modules imported.
    """
    folders = user_module_folders(path)
    spec = cfg.get("custom_imports")
    if not spec:
        return []
    if isinstance(spec, (list, tuple, str)):
        spec = {"imports": spec}
    if "imports" not in spec:
        raise UserError(
            f"config {path}: custom_imports must be dict(imports=['my_module', ...]), got {spec!r}"
        )
    names = spec["imports"]
    names = [names] if isinstance(names, str) else list(names)
    allow_failed = bool(spec.get("allow_failed_imports", False))
    imported = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if allow_failed:
                from mmengine.logging import print_log

                print_log(f"custom_imports: {name!r} failed to import: {exc}", "current", 30)
                continue
            raise UserError(
                f"config {path}: custom_imports could not import {name!r} ({exc}). Modules are "
                f"looked up on sys.path, in the current directory ({folders[0]}) and in the "
                f"config's folder ({folders[1]}); put it there or add its folder to PYTHONPATH."
            ) from exc
        imported.append(name)
    return imported


def _check_top_level_keys(cfg: Config, path: str) -> None:
    # Names the config imports (``Visualizer``) are not settings, whatever they look like.
    imported = getattr(cfg, "_imported_names", set())
    for key in cfg:
        if key in RUNNER_KEYS or key in imported:
            continue
        close = difflib.get_close_matches(key, RUNNER_KEYS, n=1, cutoff=0.8)
        if close and close[0] not in cfg:
            raise UserError(
                f"config {path} sets {key!r}, which looks like a misspelling of {close[0]!r} "
                f"(and {close[0]!r} is not set). Rename it."
            )


class _CfgOptionsAction(argparse.Action):
    """mmengine's ``DictAction``, imported only when ``--cfg-options`` is given."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction

        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=_CfgOptionsAction,
        help="override config keys, e.g. train_dataloader.batch_size=2 model.loss.type=FocalLoss",
    )


_UNEXPECTED = re.compile(r"got an unexpected keyword argument '(\w+)'")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
#: optional packages some XTuner 0.x configs import, and how to get each.
OPTIONAL_PACKAGES = {
    "modelscope": "it is an optional extra: pip install 'xtuner[modelscope]' (or '.[all]')",
    "openmind": (
        "openMind (openmind, openmind_hub) supports Python 3.8-3.10 only, so it is no extra "
        "of this fork: on such a Python run pip install openmind openmind_hub, or load the "
        "data with datasets.load_dataset instead (docs/en/compatibility.md)"
    ),
    "deepspeed": "it is an optional extra: pip install 'xtuner[deepspeed]'",
    "bitsandbytes": "it is an optional extra: pip install 'xtuner[quant]'",
}
OPTIONAL_PACKAGES["openmind_hub"] = OPTIONAL_PACKAGES["openmind"]


def explain(exc: BaseException) -> str:
    """One paragraph saying what went wrong and, where we can tell, how to fix it."""
    text = str(exc).strip() or type(exc).__name__
    match = _UNEXPECTED.search(text)
    if match:
        hint = _suggest_argument(_called_class(exc), match.group(1))
        return f"{text}.{hint} Check that key in the config."
    missing = _NO_MODULE.search(text) if isinstance(exc, ImportError) else None
    top = missing.group(1).split(".")[0] if missing else None
    if top in OPTIONAL_PACKAGES:
        return (
            f"{text}. The config needs {top!r}, which is not installed: {OPTIONAL_PACKAGES[top]}."
        )
    if isinstance(exc, FileNotFoundError):
        return f"{text}. Check the path in the config or on the command line."
    if isinstance(exc, OSError) and ("does not appear to have" in text or "not a valid" in text):
        return f"{text}. Check the model path in the config (a local folder in HF format)."
    return f"{type(exc).__name__}: {text}"


def _called_class(exc: BaseException):
    """The class mmengine was building when ``exc`` was raised (from the traceback)."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("obj_cls")
        if isinstance(candidate, type) or callable(candidate):
            found = candidate
        tb = tb.tb_next
    return found


def _suggest_argument(cls, arg: str) -> str:
    if cls is None:
        return ""
    try:
        params = [
            name
            for name, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return ""
    close = difflib.get_close_matches(arg, params, n=1)
    if close:
        return f" Did you mean {close[0]!r}?"
    return f" {getattr(cls, '__name__', cls)} accepts: {', '.join(params)}."


def run_tool(main: Callable[[], int], prog: str) -> int:
    """Runs a tool's body; user errors print one paragraph and give exit status 1."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - every failure must exit non-zero, readably
        if os.environ.get("XTUNER_DEBUG"):
            traceback.print_exc()
        else:
            rank = os.environ.get("RANK")
            where = f" (rank {rank})" if rank is not None else ""
            print(
                f"{prog}: error{where}: {explain(exc)}\n"
                "(set XTUNER_DEBUG=1 to see the full traceback)",
                file=sys.stderr,
            )
        return 1
