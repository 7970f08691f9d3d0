"""MSAgent-Bench agent conversations rewritten in the ReAct (Thought / Action) format."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping

from xtuner.registry import MAP_FUNC

from ._fields import Conversation, build_turns, message_items, require_list
from .chat import OPENAI_ROLES

_NAME = "msagent_react_map_fn"
# A tool call and its result inside an assistant message, each usually a fenced JSON block.
_BLOCK = re.compile(
    r"<\|startofthink\|>(?P<call>.*?)<\|endofthink\|>|<\|startofexec\|>(?P<result>.*?)<\|endofexec\|>",
    re.S,
)
# MSAgent system prompts list one tool per line as "N. {json}".
_TOOL_LINE = re.compile(r"^\s*\d+\.\s*(\{.*\})\s*$", re.M)

REACT_FORMAT = (
    "To use a tool, reply in this format:\n"
    "Thought: what to do next and why\n"
    "Action: the name of the tool to call\n"
    "Action Input: the arguments of the call, as JSON\n"
    'The result of the call comes back as "Observation: ...". Call tools as often as '
    "needed, then give the answer as:\n"
    "Final Answer: the answer to the user's request"
)


def _unfence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    if text.endswith("```"):
        text = text[:-3]
    return text.strip()


def _react_system(system: str) -> str:
    tools = []
    for match in _TOOL_LINE.finditer(system):
        try:
            tool = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            description = tool.get("description")
            tools.append(f"{tool['name']}: {description}" if description else tool["name"])
    if not tools:
        return f"{system}\n\n{REACT_FORMAT}" if system else REACT_FORMAT
    return "You can call these tools:\n" + "\n".join(tools) + "\n\n" + REACT_FORMAT


def _action(call_text: str, where: str) -> str:
    try:
        call = json.loads(_unfence(call_text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{_NAME}: {where} has a tool call that is not valid JSON") from exc
    if not isinstance(call, dict) or not isinstance(call.get("api_name"), str):
        raise ValueError(f"{_NAME}: {where} has a tool call without a string 'api_name'")
    arguments = json.dumps(call.get("parameters", {}), ensure_ascii=False)
    return f"Action: {call['api_name']}\nAction Input: {arguments}"


def _react_messages(text: str, where: str) -> Iterator[tuple[str, str, dict]]:
    """One assistant message -> assistant steps, with tool results as user observations."""
    steps: list[str] = []
    start = 0
    for block in _BLOCK.finditer(text):
        thought = text[start : block.start()].strip()
        start = block.end()
        if block.group("call") is not None:
            action = _action(block.group("call"), where)
            steps.append(f"Thought: {thought}\n{action}" if thought else action)
            continue
        if thought:
            steps.append(f"Thought: {thought}")
        if steps:
            yield "assistant", "\n".join(steps), {}
            steps = []
        yield "user", f"Observation: {_unfence(block.group('result'))}", {}
    answer = text[start:].strip()
    if answer:
        steps.append(f"Final Answer: {answer}")
    if steps:
        yield "assistant", "\n".join(steps), {}


@MAP_FUNC.register_module()
def msagent_react_map_fn(example: dict) -> Conversation:
    """MSAgent-Bench record -> ReAct-style multi-turn conversation.

    ``conversations`` holds ``{from, value}`` (or ``{role, content}``) messages with roles
    system, user and assistant. In an assistant message, a tool call
    ``<|startofthink|>{"api_name": ..., "parameters": ...}<|endofthink|>`` becomes
    ``Thought`` / ``Action`` / ``Action Input`` lines, a tool result
    ``<|startofexec|>...<|endofexec|>`` ends the turn and becomes the next turn's input
    (``Observation: ...``, not trained on), and the remaining text becomes
    ``Final Answer: ...``. The system prompt is rewritten to list the tools found in it (one
    ``N. {json}`` line each) and to describe the format.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn, ...]}``.
    """
    messages = require_list(example, "conversations", _NAME)
    first = messages[0] if messages else None
    keys = ("role", "content") if isinstance(first, Mapping) and "role" in first else None
    role_key, text_key = keys or ("from", "value")

    def normalised():
        for i, role, text, _ in message_items(
            messages, _NAME, "conversations", role_key, text_key, OPENAI_ROLES
        ):
            if role == "system":
                yield role, _react_system(text), {}
            elif role == "user":
                yield role, text, {}
            else:
                yield from _react_messages(text, f"conversations[{i}]")

    return {"conversation": build_turns(normalised())}
