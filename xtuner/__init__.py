"""XTuner fork: fine-tune LLMs with XTuner 0.x configs and a pluggable loss."""

from ._compat import apply_patches
from .version import __version__

apply_patches()

__all__ = ["__version__"]
