"""Reading and checking record fields, and building turns, for the dataset map functions.

Every error is a ``ValueError`` that names the map function and the field, so the dataset
pipeline can report and drop the record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

# Default per-turn weight when some turns of a record carry one and others do not: Arrow needs
# every turn of a dataset to have the same keys.
DEFAULT_LOSS_WEIGHT = 1.0

# What every map function returns: {'conversation': [turn, ...]}.
Conversation = dict[str, list[dict[str, Any]]]


def _check_record(record: Any, fn_name: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{fn_name}: a record must be a dict, got {type(record).__name__}")


def require_str(record: Mapping, key: str, fn_name: str) -> str:
    """Returns ``record[key]``, which must be present, not None, and a string."""
    _check_record(record, fn_name)
    value = record.get(key)
    if value is None:
        raise ValueError(f"{fn_name}: record has no {key!r} field")
    if not isinstance(value, str):
        raise ValueError(f"{fn_name}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def optional_str(record: Mapping, key: str, fn_name: str) -> str:
    """Returns ``record[key]`` if it is a string, '' if it is absent or None."""
    _check_record(record, fn_name)
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{fn_name}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def require_list(record: Mapping, key: str, fn_name: str) -> list:
    """Returns ``record[key]``, which must be a list (or tuple)."""
    _check_record(record, fn_name)
    value = record.get(key)
    if value is None:
        raise ValueError(f"{fn_name}: record has no {key!r} field")
    if not isinstance(value, list | tuple):
        raise ValueError(f"{fn_name}: field {key!r} must be a list, got {type(value).__name__}")
    return list(value)


def loss_weight_of(item: Mapping, where: str, fn_name: str) -> float | None:
    """Reads an optional ``loss_weight``: None if the key is absent, 1.0 if it is null."""
    if "loss_weight" not in item:
        return None
    value = item["loss_weight"]
    if value is None:
        return DEFAULT_LOSS_WEIGHT
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{fn_name}: {where}['loss_weight'] must be a number, got {type(value).__name__}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn_name}: {where}['loss_weight'] must be finite and >= 0, got {value}")
    return float(value)


def single_turn(
    record: Mapping, fn_name: str, input: str, output: str, system: str | None = None
) -> Conversation:
    """A one-turn conversation; the record's ``loss_weight`` (if any) is passed through."""
    turn: dict[str, Any] = {}
    if system is not None:
        turn["system"] = system
    turn["input"] = input
    turn["output"] = output
    weight = loss_weight_of(record, "record", fn_name)
    if weight is not None:
        turn["loss_weight"] = weight
    return {"conversation": [turn]}


def join_input(first: str, second: str) -> str:
    """``first`` and ``second`` on separate lines, or just ``first`` when ``second`` is empty."""
    return f"{first}\n{second}" if second else first


def build_turns(messages: Iterable[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Groups (role, text, extra turn fields) messages into turns.

    Roles are 'system', 'user' and 'assistant'. Consecutive system or user messages are
    joined with newlines; each assistant message closes a turn (with the extra fields of that
    message), so an assistant message with no user message before it gets an empty input.
    System text applies to the next turn only. Messages after the last assistant message have
    no reply to learn and are dropped. Every turn has the same keys, as Arrow requires.
    """
    turns: list[dict[str, Any]] = []
    system: list[str] = []
    inputs: list[str] = []
    for role, text, extra in messages:
        if role == "system":
            system.append(text)
        elif role == "user":
            inputs.append(text)
        else:
            turns.append(
                {"system": "\n".join(system), "input": "\n".join(inputs), "output": text, **extra}
            )
            system, inputs = [], []
    if any("loss_weight" in turn for turn in turns):
        for turn in turns:
            turn.setdefault("loss_weight", DEFAULT_LOSS_WEIGHT)
    return turns


def message_items(
    messages: list, fn_name: str, field: str, role_key: str, text_key: str, roles: Mapping
) -> Iterable[tuple[int, str, str, Mapping]]:
    """Yields (index, normalised role, text, message) for each message of ``record[field]``.

    Args:
        messages: the list of message dicts.
        fn_name: the map function, for error messages.
        field: the record field holding ``messages``, for error messages.
        role_key: the key of a message's role (``'role'`` or ``'from'``).
        text_key: the key of a message's text (``'content'`` or ``'value'``).
        roles: accepted role names -> 'system' | 'user' | 'assistant'.
    """
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{fn_name}: {where} must be a dict, got {type(message).__name__}")
        role = message.get(role_key)
        if role not in roles:
            raise ValueError(
                f"{fn_name}: {where}[{role_key!r}] is {role!r}; expected one of {sorted(roles)}"
            )
        text = message.get(text_key)
        if not isinstance(text, str):
            raise ValueError(
                f"{fn_name}: {where}[{text_key!r}] must be a string, got {type(text).__name__}"
            )
        yield i, roles[role], text, message
