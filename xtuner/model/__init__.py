"""Models: supervised fine-tuning (and LLaVA) with a pluggable loss."""

from .sft import SupervisedFinetune

__all__ = ["SupervisedFinetune"]
