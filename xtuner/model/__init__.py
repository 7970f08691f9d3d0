"""Models: supervised fine-tuning (and LLaVA) with a pluggable loss."""

from .llava import LLaVAModel
from .sft import SupervisedFinetune

__all__ = ["SupervisedFinetune", "LLaVAModel"]
