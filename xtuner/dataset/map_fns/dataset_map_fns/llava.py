"""Map functions for LLaVA image-text data (``conversations`` of ``{from, value}``)."""

from __future__ import annotations

from xtuner.registry import MAP_FUNC
from xtuner.utils.constants import DEFAULT_IMAGE_TOKEN

from ._fields import Conversation, message_items, require_list
from .chat import SHAREGPT_ROLES, sharegpt_turns


@MAP_FUNC.register_module()
def llava_map_fn(example: dict) -> Conversation:
    """LLaVA instruction record; a single image token is moved to the start of its message.

    A user message containing one ``'<image>'`` has the token removed from where it is and
    put at its start, followed by a newline (the LLaVA convention). A message with several
    image tokens keeps them where they are (one per image, in order). Records without an
    image (text-only samples) pass through. Turns are grouped as in ``wizardlm_map_fn``.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [turn, ...]}``.
    """
    turns = sharegpt_turns(example, "llava_map_fn")
    for turn in turns:
        if turn["input"].count(DEFAULT_IMAGE_TOKEN) == 1:
            text = turn["input"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            turn["input"] = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
    return {"conversation": turns}


@MAP_FUNC.register_module()
def llava_image_only_map_fn(example: dict) -> Conversation:
    """LLaVA caption record for projector pre-training: the input is the image alone.

    The first user message must contain ``'<image>'``; its text is dropped and the first
    reply after it (the caption) is the output.

    Args:
        example: one dataset record.

    Returns:
        ``{'conversation': [{'input': '<image>', 'output': caption}]}``.
    """
    name = "llava_image_only_map_fn"
    messages = require_list(example, "conversations", name)
    seen_image = False
    for i, role, text, _ in message_items(
        messages, name, "conversations", "from", "value", SHAREGPT_ROLES
    ):
        if role == "user" and not seen_image:
            if DEFAULT_IMAGE_TOKEN not in text:
                raise ValueError(
                    f"{name}: conversations[{i}] (the first human message) has no "
                    f"{DEFAULT_IMAGE_TOKEN!r} token"
                )
            seen_image = True
        elif role == "assistant" and seen_image:
            return {"conversation": [{"input": DEFAULT_IMAGE_TOKEN, "output": text}]}
    raise ValueError(f"{name}: field 'conversations' has no human message with a reply")
