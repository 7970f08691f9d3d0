"""Alpaca-style instruction data: ``instruction`` (+ optional ``input``) -> ``output``."""

from __future__ import annotations

from xtuner.registry import MAP_FUNC
from xtuner.utils.templates import SYSTEM_TEMPLATE

from ._fields import Conversation, join_input, optional_str, require_str, single_turn

# Alpaca-GPT4 marks records whose instruction has no sensible answer this way.
_NO_OUTPUT = "<nooutput>"


def _alpaca(example: dict, fn_name: str, suffix: str) -> Conversation:
    output = require_str(example, f"output{suffix}", fn_name)
    if output == _NO_OUTPUT:
        return {"conversation": []}
    instruction = require_str(example, f"instruction{suffix}", fn_name)
    extra = optional_str(example, f"input{suffix}", fn_name)
    return single_turn(
        example, fn_name, join_input(instruction, extra), output, SYSTEM_TEMPLATE.alpaca
    )


@MAP_FUNC.register_module()
def alpaca_map_fn(example: dict) -> Conversation:
    """Alpaca record (``instruction``, optional ``input``, ``output``) -> one turn.

    A non-empty ``input`` goes on a new line after the instruction; a record whose output is
    ``'<nooutput>'`` gives an empty conversation (dropped by the pipeline).

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the alpaca system prompt.
    """
    return _alpaca(example, "alpaca_map_fn", "")


@MAP_FUNC.register_module()
def alpaca_zh_map_fn(example: dict) -> Conversation:
    """Chinese Alpaca record (``instruction_zh``, optional ``input_zh``, ``output_zh``).

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the alpaca system prompt.
    """
    return _alpaca(example, "alpaca_zh_map_fn", "_zh")
