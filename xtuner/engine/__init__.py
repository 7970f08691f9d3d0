"""Training engine: the loop and the hooks XTuner configs use.

Each name is imported on first use (:mod:`xtuner._lazy`), so ``xtuner.engine.hooks`` does
not import the loop (and ``mmengine.runner``): add a name with one line below.
"""

from xtuner._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "DatasetInfoHook": ".hooks",
        "EvaluateChatHook": ".hooks",
        "HFCheckpointHook": ".hooks",
        "ThroughputHook": ".hooks",
        "VarlenAttnArgsToMessageHubHook": ".hooks",
        "TrainLoop": ".runner",
    },
)
