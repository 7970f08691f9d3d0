"""Map functions for multi-turn chat data (OpenAI messages, ShareGPT-style, OASST1 text)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from xtuner.registry import MAP_FUNC

from ._fields import (
    Conversation,
    build_turns,
    loss_weight_of,
    message_items,
    require_list,
    require_str,
)

OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# Only "### Human:" / "### Assistant:" start a turn; other "###" (markdown headings) are text.
_OASST1_MARKER = re.compile(r"###\s*(Human|Assistant):")


def _loss_flag(message: Mapping, where: str, fn_name: str) -> bool:
    value = message.get("loss")
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{fn_name}: {where}['loss'] must be true or false, got {value!r}")


@MAP_FUNC.register_module()
def openai_map_fn(example: dict) -> Conversation:
    """OpenAI fine-tuning format: ``messages``, a list of ``{role, content}``.

    Roles are system, user and assistant. An assistant message may carry ``loss`` (False: its
    reply is context only, ``output_with_loss=False``) and ``loss_weight`` (kept on its turn;
    other turns of the record then get 1.0). Consecutive user or system messages are joined
    with newlines; a system message applies to the next turn; an assistant message right
    after another one gets a turn with an empty input; messages after the last reply are
    dropped.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn, ...]}``, each turn with ``system``, ``input``, ``output``
        and ``output_with_loss``.
    """
    name = "openai_map_fn"
    messages = require_list(example, "messages", name)

    def normalised():
        for i, role, text, message in message_items(
            messages, name, "messages", "role", "content", OPENAI_ROLES
        ):
            extra: dict[str, Any] = {}
            if role == "assistant":
                where = f"messages[{i}]"
                extra["output_with_loss"] = _loss_flag(message, where, name)
                weight = loss_weight_of(message, where, name)
                if weight is not None:
                    extra["loss_weight"] = weight
            yield role, text, extra

    return {"conversation": build_turns(normalised())}


def sharegpt_turns(example: dict, fn_name: str) -> list[dict[str, Any]]:
    """Turns of a ``conversations`` list of ``{from: human|gpt|system, value}`` messages."""
    messages = require_list(example, "conversations", fn_name)
    items = message_items(messages, fn_name, "conversations", "from", "value", SHAREGPT_ROLES)
    return build_turns((role, text, {}) for _, role, text, _ in items)


@MAP_FUNC.register_module()
def wizardlm_map_fn(example: dict) -> Conversation:
    """WizardLM / ShareGPT record: ``conversations`` of ``{from: human|gpt, value}``.

    Consecutive messages are grouped as in :func:`openai_map_fn`.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn, ...]}``.
    """
    return {"conversation": sharegpt_turns(example, "wizardlm_map_fn")}


@MAP_FUNC.register_module()
def oasst1_map_fn(example: dict) -> Conversation:
    """OASST1 (guanaco) record: ``text`` of ``### Human: ...### Assistant: ...`` turns.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn, ...]}``.
    """
    name = "oasst1_map_fn"
    text = require_str(example, "text", name)
    # split() gives [before, speaker, text, speaker, text, ...]; text before the first
    # marker belongs to no speaker and is ignored.
    parts = _OASST1_MARKER.split(text)
    if len(parts) == 1:
        raise ValueError(f"{name}: field 'text' has no '### Human:' or '### Assistant:' marker")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = ((roles[who], said.strip(), {}) for who, said in zip(parts[1::2], parts[2::2]))
    return {"conversation": build_turns(messages)}
