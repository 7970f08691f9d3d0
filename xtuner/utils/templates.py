"""Chat prompt templates (``PROMPT_TEMPLATE``) and ready-made system prompts (``SYSTEM_TEMPLATE``).

Every prompt template is a dict with these fields (see ``docs/en/templates.md``):

- ``SYSTEM``: format string with ``{system}``; put before a turn's instruction when the turn
  has a system prompt.
- ``INSTRUCTION``: format string with ``{input}`` (the user's text) and optionally ``{round}``
  (1-based turn number); ends where the assistant's reply starts.
- ``SUFFIX`` (optional): appended to every assistant reply, e.g. an end-of-turn marker.
- ``SUFFIX_AS_EOS`` (optional, default False): the suffix ends the turn, so no EOS token is
  added after the reply.
- ``SEP`` (optional, default ''): text after each reply (and its EOS), before the next turn.
- ``STOP_WORDS`` (optional): strings that end generation in chat and evaluation.

The strings follow each model family's published chat format. BOS tokens are not written
here: the encoder adds one at the start of every sample.
"""

import difflib
from collections.abc import Mapping

from mmengine.config import ConfigDict

__all__ = ["PROMPT_TEMPLATE", "SYSTEM_TEMPLATE"]

# Shared by every family that speaks ChatML (Qwen, InternLM2, MiniCPM3).
_CHATML = dict(
    SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
    INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    SEP="\n",
)

# Llama 2 chat / Code Llama instruct. The published format puts the <<SYS>> block inside the
# first [INST]; a template can only prefix a turn, so the system block gets its own [INST].
_LLAMA2 = dict(
    SYSTEM="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n [/INST]",
    INSTRUCTION="[INST] {input} [/INST]",
    STOP_WORDS=["</s>"],
)

# Mistral / Mixtral instruct: no system role in the format, so it gets an [INST] of its own.
_MISTRAL = dict(
    SYSTEM="[INST] {system} [/INST]",
    INSTRUCTION="[INST] {input} [/INST]",
    STOP_WORDS=["</s>"],
)

# Vicuna v1.1 style (also WizardLM 1.x): replies end with EOS and the next USER follows directly.
_VICUNA = dict(
    SYSTEM="{system} ",
    INSTRUCTION="USER: {input} ASSISTANT:",
    STOP_WORDS=["</s>"],
)

# DeepSeek-Coder instruct: Alpaca-like headers, replies closed by <|EOT|>.
_DEEPSEEK_CODER = dict(
    SYSTEM="{system}\n",
    INSTRUCTION="### Instruction:\n{input}\n### Response:\n",
    SUFFIX="\n<|EOT|>",
    SUFFIX_AS_EOS=True,
    SEP="\n",
    STOP_WORDS=["<|EOT|>"],
)

# DeepSeek LLM chat format (DeepSeek-MoE, DeepSeek-V2): "User: ...\n\nAssistant:" + reply + EOS.
_DEEPSEEK_CHAT = dict(
    SYSTEM="{system}\n\n",
    INSTRUCTION="User: {input}\n\nAssistant:",
    STOP_WORDS=["<｜end▁of▁sentence｜>"],
)

PROMPT_TEMPLATE = ConfigDict(
    # XTuner's own format for base models with no chat format of their own.
    default=dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}\n<|Bot|>:",
        SEP="\n",
    ),
    zephyr=dict(
        SYSTEM="<|system|>\n{system}</s>\n",
        INSTRUCTION="<|user|>\n{input}</s>\n<|assistant|>\n",
        SEP="\n",
        STOP_WORDS=["</s>"],
    ),
    # InternLM (v1) chat: <eoa> is the end-of-answer token.
    internlm_chat=dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}<eoh>\n<|Bot|>:",
        SUFFIX="<eoa>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<eoa>"],
    ),
    internlm2_chat=dict(**_CHATML, STOP_WORDS=["<|im_end|>"]),
    # MOSS-003: the reply is closed by <eom>, MOSS's end-of-message token.
    moss_sft=dict(
        SYSTEM="{system}\n",
        INSTRUCTION="<|Human|>: {input}<eoh>\n<|MOSS|>:",
        SUFFIX="<eom>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<eoc>", "<eom>"],
    ),
    llama2_chat=dict(_LLAMA2),
    code_llama_chat=dict(_LLAMA2),
    # ChatGLM2 numbers its rounds from 1.
    chatglm2=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="[Round {round}]\n\n问：{input}\n\n答：",
        SEP="\n\n",
    ),
    # ChatGLM3: role tokens followed by a metadata line (empty here); the next role token ends
    # the reply.
    chatglm3=dict(
        SYSTEM="<|system|>\n{system}",
        INSTRUCTION="<|user|>\n{input}<|assistant|>\n",
        STOP_WORDS=["<|user|>", "<|observation|>"],
    ),
    qwen_chat=dict(**_CHATML, STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    # Baichuan-13B-Chat: <reserved_102> / <reserved_103> are its user / assistant tokens.
    baichuan_chat=dict(
        SYSTEM="{system}",
        INSTRUCTION="<reserved_102>{input}<reserved_103>",
        STOP_WORDS=["</s>"],
    ),
    # Baichuan2-Chat: the same layout with <reserved_106> / <reserved_107>.
    baichuan2_chat=dict(
        SYSTEM="{system}",
        INSTRUCTION="<reserved_106>{input}<reserved_107>",
        STOP_WORDS=["</s>"],
    ),
    wizardlm=dict(_VICUNA),
    # WizardCoder: the Alpaca instruction / response layout.
    wizardcoder=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="### Instruction:\n{input}\n\n### Response:",
        SEP="\n\n",
        STOP_WORDS=["</s>"],
    ),
    vicuna=dict(_VICUNA),
    deepseek_coder=dict(_DEEPSEEK_CODER),
    deepseekcoder=dict(_DEEPSEEK_CODER),
    deepseek_moe=dict(_DEEPSEEK_CHAT),
    deepseek_v2=dict(_DEEPSEEK_CHAT),
    mistral=dict(_MISTRAL),
    mixtral=dict(_MISTRAL),
    # MiniCPM (2B): <用户> / <AI> role markers and no system role.
    minicpm=dict(
        SYSTEM="{system}\n",
        INSTRUCTION="<用户>{input}<AI>",
        STOP_WORDS=["</s>"],
    ),
    minicpm3=dict(**_CHATML, STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    # Gemma: the published format has user / model turns only and ends a turn with
    # <end_of_turn> (no EOS); a system prompt gets a turn of its own.
    gemma=dict(
        SYSTEM="<start_of_turn>system\n{system}<end_of_turn>\n",
        INSTRUCTION="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
        SUFFIX="<end_of_turn>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<end_of_turn>"],
    ),
    # Cohere Command-R.
    cohere_chat=dict(
        SYSTEM="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        INSTRUCTION=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        ),
        SUFFIX="<|END_OF_TURN_TOKEN|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|END_OF_TURN_TOKEN|>"],
    ),
    llama3_chat=dict(
        SYSTEM="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        INSTRUCTION=(
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        SUFFIX="<|eot_id|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|eot_id|>"],
    ),
    # DeepSeek-R1 and its distilled Qwen / Llama models: the system text stands alone at the
    # start; a reply (its <think> block included) ends with EOS.
    deepseek_r1=dict(
        SYSTEM="{system}",
        INSTRUCTION="<｜User｜>{input}<｜Assistant｜>",
        STOP_WORDS=["<｜end▁of▁sentence｜>"],
    ),
    phi3_chat=dict(
        SYSTEM="<|system|>\n{system}<|end|>\n",
        INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        SUFFIX="<|end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|end|>"],
    ),
)

SYSTEM_TEMPLATE = ConfigDict(
    moss_sft=(
        "You are MOSS, a conversational AI assistant developed by Fudan University.\n"
        "- MOSS understands and answers in the language the user writes in, such as English "
        "or Chinese.\n"
        "- MOSS is helpful, honest and harmless: it declines requests that are dangerous, "
        "illegal or unethical, and says so when it does not know something.\n"
        "- MOSS gives accurate, well-organised answers and avoids repeating itself."
    ),
    alpaca=(
        "Here is an instruction describing a task, possibly with an input that gives more "
        "context. Write a response that carries out the request well."
    ),
    arxiv_gentile=(
        "You are an experienced academic writer. Read the abstract of a research paper and "
        "propose a concise, informative title for the paper."
    ),
    colorist=(
        "You are a professional colour designer. Given a description of a colour, reply with "
        "the hexadecimal code (such as #1E90FF) of a colour that matches it."
    ),
    coder=(
        "You are a skilled software engineer. Write correct, readable code that solves the "
        "given task, and explain it briefly where that helps."
    ),
    lawyer=(
        "你是一名经验丰富的执业律师。请依据中华人民共和国现行法律法规，准确、清晰地解答用户的"
        "法律问题，并在必要时指出相关的法律条文。"
    ),
    medical=(
        "你是一名专业、严谨的医生。请根据患者描述的症状和问题给出医学解释与建议，"
        "并在情况需要时提醒患者及时前往医院就诊。"
    ),
    sql=(
        "You are an SQL expert. Given the schema of some tables (as CREATE TABLE statements) "
        "and a question about their data, write one SQL query that answers the question."
    ),
)


def get_template(template: Mapping | str) -> Mapping:
    """A prompt template given as a dict or by its ``PROMPT_TEMPLATE`` name.

    A module loaded with ``custom_imports`` can add its own template
    (``PROMPT_TEMPLATE["my_chat"] = dict(SYSTEM=..., INSTRUCTION=...)``), which configs then
    name as ``PROMPT_TEMPLATE.my_chat`` or ``'my_chat'``.

    Raises:
        KeyError: an unknown name; the message lists the nearest known names.
    """
    if not isinstance(template, str):
        return template
    if template in PROMPT_TEMPLATE:
        return PROMPT_TEMPLATE[template]
    close = difflib.get_close_matches(template, list(PROMPT_TEMPLATE), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise KeyError(
        f"unknown prompt template {template!r}.{hint} Known: {', '.join(sorted(PROMPT_TEMPLATE))}"
        ". A template of your own is added with PROMPT_TEMPLATE['name'] = dict(...) in a module "
        "the config loads with custom_imports."
    )
