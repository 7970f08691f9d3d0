"""Map functions for datasets whose records make a single turn (Q&A pairs, plain text)."""

from __future__ import annotations

from xtuner.registry import MAP_FUNC
from xtuner.utils.templates import SYSTEM_TEMPLATE

from ._fields import Conversation, join_input, optional_str, require_str, single_turn


@MAP_FUNC.register_module()
def default_map_fn(example: dict) -> Conversation:
    """Record already in turn form: ``input``, ``output`` and optionally ``system``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}``; ``system`` is kept only when the record has that key.
    """
    name = "default_map_fn"
    input = require_str(example, "input", name)
    output = require_str(example, "output", name)
    system = optional_str(example, "system", name) if "system" in example else None
    return single_turn(example, name, input, output, system)


@MAP_FUNC.register_module()
def code_alpaca_map_fn(example: dict) -> Conversation:
    """Code Alpaca record: ``prompt`` -> ``completion``, with the coder system prompt.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}``.
    """
    name = "code_alpaca_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "prompt", name),
        require_str(example, "completion", name),
        SYSTEM_TEMPLATE.coder,
    )


@MAP_FUNC.register_module()
def tiny_codes_map_fn(example: dict) -> Conversation:
    """tiny-codes record: ``prompt`` -> ``response``, with the coder system prompt.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}``.
    """
    name = "tiny_codes_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "prompt", name),
        require_str(example, "response", name),
        SYSTEM_TEMPLATE.coder,
    )


@MAP_FUNC.register_module()
def arxiv_map_fn(example: dict) -> Conversation:
    """arXiv record: the paper's ``abstract`` -> its ``title``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the arxiv_gentile system prompt.
    """
    name = "arxiv_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "abstract", name),
        require_str(example, "title", name),
        SYSTEM_TEMPLATE.arxiv_gentile,
    )


@MAP_FUNC.register_module()
def colors_map_fn(example: dict) -> Conversation:
    """Colours record: a colour ``description`` -> its hex code (``color``).

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the colorist system prompt.
    """
    name = "colors_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "description", name),
        require_str(example, "color", name),
        SYSTEM_TEMPLATE.colorist,
    )


@MAP_FUNC.register_module()
def crime_kg_assitant_map_fn(example: dict) -> Conversation:
    """CrimeKgAssitant record (the misspelling is the dataset's): ``input`` -> ``output``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the lawyer system prompt.
    """
    name = "crime_kg_assitant_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "input", name),
        require_str(example, "output", name),
        SYSTEM_TEMPLATE.lawyer,
    )


@MAP_FUNC.register_module()
def law_reference_map_fn(example: dict) -> Conversation:
    """Law reference record: ``question`` -> ``answer``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the lawyer system prompt.
    """
    name = "law_reference_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "question", name),
        require_str(example, "answer", name),
        SYSTEM_TEMPLATE.lawyer,
    )


@MAP_FUNC.register_module()
def medical_map_fn(example: dict) -> Conversation:
    """Medical record: ``instruction`` (+ optional ``input`` on a new line) -> ``output``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the medical system prompt.
    """
    name = "medical_map_fn"
    instruction = require_str(example, "instruction", name)
    extra = optional_str(example, "input", name)
    return single_turn(
        example,
        name,
        join_input(instruction, extra),
        require_str(example, "output", name),
        SYSTEM_TEMPLATE.medical,
    )


@MAP_FUNC.register_module()
def sql_map_fn(example: dict) -> Conversation:
    """SQL record: table schema ``context`` and ``question`` (on the next line) -> ``answer``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}`` with the sql system prompt.
    """
    name = "sql_map_fn"
    context = optional_str(example, "context", name)
    question = require_str(example, "question", name)
    return single_turn(
        example,
        name,
        f"{context}\n{question}" if context else question,
        require_str(example, "answer", name),
        SYSTEM_TEMPLATE.sql,
    )


@MAP_FUNC.register_module()
def openorca_map_fn(example: dict) -> Conversation:
    """OpenOrca record: ``system_prompt`` (may be empty), ``question`` -> ``response``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}``.
    """
    name = "openorca_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "question", name),
        require_str(example, "response", name),
        optional_str(example, "system_prompt", name),
    )


@MAP_FUNC.register_module()
def stack_exchange_map_fn(example: dict) -> Conversation:
    """Stack Exchange record: ``question`` -> ``response``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}``.
    """
    name = "stack_exchange_map_fn"
    return single_turn(
        example,
        name,
        require_str(example, "question", name),
        require_str(example, "response", name),
    )


@MAP_FUNC.register_module()
def pretrain_map_fn(example: dict) -> Conversation:
    """Plain text for (continued) pre-training: the whole ``text`` is the output.

    The turn has an empty input and ``need_eos_token=False``; surrounding whitespace is
    stripped.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn]}``.
    """
    text = require_str(example, "text", "pretrain_map_fn").strip()
    return {"conversation": [{"input": "", "output": text, "need_eos_token": False}]}
