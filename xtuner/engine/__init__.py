"""Training engine: the loop and the hooks XTuner configs use."""

from .hooks import (
    DatasetInfoHook,
    EvaluateChatHook,
    HFCheckpointHook,
    ThroughputHook,
    VarlenAttnArgsToMessageHubHook,
)
from .runner import TrainLoop

__all__ = [
    "DatasetInfoHook",
    "EvaluateChatHook",
    "HFCheckpointHook",
    "ThroughputHook",
    "VarlenAttnArgsToMessageHubHook",
    "TrainLoop",
]
