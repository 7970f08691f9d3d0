"""Dataset map functions: one record -> ``{'conversation': [turn, ...]}``.

A turn is a dict with ``input`` and ``output`` strings and optionally ``system``,
``output_with_loss`` (default True), ``loss_weight`` and ``need_eos_token``. A record that
lacks a required field raises ``ValueError`` naming the field and the map function.
Importing this package registers every function in ``xtuner.registry.MAP_FUNC``.
"""

from .alpaca import alpaca_map_fn, alpaca_zh_map_fn
from .chat import oasst1_map_fn, openai_map_fn, wizardlm_map_fn
from .llava import llava_image_only_map_fn, llava_map_fn
from .msagent import msagent_react_map_fn
from .single_turn import (
    arxiv_map_fn,
    code_alpaca_map_fn,
    colors_map_fn,
    crime_kg_assitant_map_fn,
    default_map_fn,
    law_reference_map_fn,
    medical_map_fn,
    openorca_map_fn,
    pretrain_map_fn,
    sql_map_fn,
    stack_exchange_map_fn,
    tiny_codes_map_fn,
)

__all__ = [
    "alpaca_map_fn",
    "alpaca_zh_map_fn",
    "arxiv_map_fn",
    "code_alpaca_map_fn",
    "colors_map_fn",
    "crime_kg_assitant_map_fn",
    "default_map_fn",
    "law_reference_map_fn",
    "llava_image_only_map_fn",
    "llava_map_fn",
    "medical_map_fn",
    "msagent_react_map_fn",
    "oasst1_map_fn",
    "openai_map_fn",
    "openorca_map_fn",
    "pretrain_map_fn",
    "sql_map_fn",
    "stack_exchange_map_fn",
    "tiny_codes_map_fn",
    "wizardlm_map_fn",
]
