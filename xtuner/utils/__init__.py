"""Constants and chat templates that configs import from ``xtuner.utils``."""

from .constants import (
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_PAD_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from .templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE, get_template

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_PAD_TOKEN_INDEX",
    "IMAGE_TOKEN_INDEX",
    "DEFAULT_IMAGE_TOKEN",
    "PROMPT_TEMPLATE",
    "SYSTEM_TEMPLATE",
    "get_template",
]
