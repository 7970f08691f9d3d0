"""Publishes the packed-document boundaries of each batch in the message hub.

This fork keeps packed documents apart through ``position_ids`` (restarting at 0 at each
document), so the model itself does not need this hook; it is kept for configs that list it
and for user code that reads ``cumulative_len``/``max_seqlen`` from the message hub.
"""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.logging import MessageHub
from mmengine.registry import HOOKS


@HOOKS.register_module()
class VarlenAttnArgsToMessageHubHook(Hook):
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        data = (data_batch or {}).get("data", {})
        hub = MessageHub.get_instance("varlen_attn_args")
        for key in ("cumulative_len", "max_seqlen"):
            if key in data:
                hub.update_info(f"{key}_rank_0", data[key])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        hub = MessageHub.get_instance("varlen_attn_args")
        for key in ("cumulative_len", "max_seqlen"):
            hub.runtime_info.pop(f"{key}_rank_0", None)
