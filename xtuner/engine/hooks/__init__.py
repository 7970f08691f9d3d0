from .dataset_info_hook import DatasetInfoHook
from .evaluate_chat_hook import EvaluateChatHook
from .hf_checkpoint_hook import HFCheckpointHook
from .preference import PrecomputeRefLogpsHook
from .throughput_hook import ThroughputHook
from .varlen_attn_args_to_messagehub_hook import VarlenAttnArgsToMessageHubHook

__all__ = [
    "DatasetInfoHook",
    "EvaluateChatHook",
    "HFCheckpointHook",
    "PrecomputeRefLogpsHook",
    "ThroughputHook",
    "VarlenAttnArgsToMessageHubHook",
]
