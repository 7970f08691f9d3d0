"""Applying a chat prompt template (an entry of ``PROMPT_TEMPLATE``) to a conversation."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from xtuner.utils.templates import get_template

from .dataset_map_fns._fields import Conversation


def _check_template(template: Mapping) -> None:
    if not isinstance(template, Mapping):
        raise ValueError(
            f"template_map_fn: a prompt template must be a dict such as "
            f"PROMPT_TEMPLATE.qwen_chat, got {type(template).__name__}"
        )
    for key, placeholder in (("INSTRUCTION", "{input}"), ("SYSTEM", "{system}")):
        value = template.get(key)
        if not isinstance(value, str):
            raise ValueError(f"template_map_fn: the prompt template has no string {key!r} field")
        if placeholder not in value:
            raise ValueError(
                f"template_map_fn: the prompt template's {key!r} lacks the {placeholder} "
                f"placeholder: {value!r}"
            )


def template_map_fn(example: Mapping, template: Mapping) -> Conversation:
    """Formats every turn of ``example['conversation']`` with a prompt template.

    For turn ``i`` (0-based) the input becomes ``INSTRUCTION.format(input=..., round=i + 1)``,
    preceded by ``SYSTEM.format(system=...)`` when the turn has a non-empty system; the
    output gets ``SUFFIX`` appended (if any); ``need_eos_token`` is ``not SUFFIX_AS_EOS``,
    except that a turn whose map function already set it to False keeps False; ``sep`` is
    ``SEP`` (or '').

    Args:
        example: a record holding ``conversation``, as a dataset map function returns it.
        template: a prompt template, e.g. ``PROMPT_TEMPLATE.internlm2_chat``.

    Returns:
        ``{'conversation': [turn, ...]}`` with new turn dicts (the input is not modified).
    """
    conversation = example.get("conversation") if isinstance(example, Mapping) else None
    if not isinstance(conversation, list | tuple):
        raise ValueError(
            "template_map_fn: record has no 'conversation' list; map the dataset to "
            "conversations first (dataset_map_fn)"
        )
    _check_template(template)
    suffix = template.get("SUFFIX") or ""
    suffix_as_eos = bool(template.get("SUFFIX_AS_EOS", False))
    sep = template.get("SEP") or ""
    formatted = []
    for i, turn in enumerate(conversation):
        text = template["INSTRUCTION"].format(input=turn.get("input") or "", round=i + 1)
        system = turn.get("system")
        if system:
            text = template["SYSTEM"].format(system=system) + text
        formatted.append(
            {
                **turn,
                "input": text,
                "output": (turn.get("output") or "") + suffix,
                "need_eos_token": not suffix_as_eos and turn.get("need_eos_token") is not False,
                "sep": sep,
            }
        )
    return {"conversation": formatted}


def template_map_fn_factory(template: Mapping) -> partial:
    """Returns ``template_map_fn`` bound to ``template`` (picklable, for ``datasets.map``).

    Args:
        template: a prompt template, e.g. ``PROMPT_TEMPLATE.internlm2_chat``, or its name
            (``'internlm2_chat'``, also a template a ``custom_imports`` module added); checked
            here so a broken template fails when the config is built.

    Returns:
        A callable taking one record.
    """
    template = get_template(template)
    _check_template(template)
    return partial(template_map_fn, template=template)
