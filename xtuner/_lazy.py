"""Lazy package exports: a package lists its public names, each imported on first use.

``from xtuner.model import SupervisedFinetune`` then imports ``xtuner.model.sft`` only, and
``import xtuner.dataset.map_fns`` no longer drags in ``datasets`` and ``torch`` through the
package's ``__init__``. A package uses it like this (PEP 562 module ``__getattr__``)::

    __getattr__, __dir__, __all__ = lazy_exports(
        __name__,
        {
            "SupervisedFinetune": ".sft",  # public name -> submodule that defines it
            "LLaVAModel": ".llava",
        },
    )

Adding a public name is one more line in that mapping.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package whose names load on first access.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the submodule defining it, relative to the package
            (``".sft"``) or absolute.

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` functions and the ``__all__`` list.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        # Cached on the package, so later look-ups no longer reach __getattr__.
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__, list(exports)
