"""Models: supervised fine-tuning (and LLaVA) with a pluggable loss.

Each name is imported on first use (:mod:`xtuner._lazy`): add a model with one line below.
"""

from xtuner._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "SupervisedFinetune": ".sft",
        "LLaVAModel": ".llava",
        "InternVL_V1_5": ".internvl",
    },
)
