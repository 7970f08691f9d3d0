"""Offline builders for the demo and the tests: a tiny BPE tokenizer and tiny HF models.

No model hub is needed: the tokenizer is trained on the bundled demo data in about a
second, and models are built from configs with random weights, then saved with
``save_pretrained`` so the real loading code (``from_pretrained``) reads them back.
"""

from __future__ import annotations

import json
import os
import os.path as osp
import shutil

DEMO_DIR = osp.dirname(osp.abspath(__file__))
DEMO_DATA = osp.join(DEMO_DIR, "data", "demo_alpaca.jsonl")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]


def _corpus(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                texts.extend(str(v) for v in record.values() if isinstance(v, str))
    return texts


def build_tiny_tokenizer(save_dir: str, vocab_size: int = 1024, corpus: list[str] | None = None):
    """Trains a byte-level BPE tokenizer and saves it as an HF tokenizer.

    Args:
        save_dir: where ``save_pretrained`` writes it.
        vocab_size: BPE vocabulary size, special tokens included.
        corpus: training texts; the bundled demo data when None.

    Returns:
        The loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = corpus if corpus is not None else _corpus([DEMO_DATA])
    # The system prompts and template markers too, so a prompt costs a few tokens rather than
    # one per character (the demo's samples would otherwise be mostly system prompt).
    from xtuner.utils import SYSTEM_TEMPLATE

    texts = texts + list(SYSTEM_TEMPLATE.values()) * 50
    texts = texts + ["<|im_start|>system\n<|im_start|>user\n<|im_start|>assistant\n"] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    os.makedirs(save_dir, exist_ok=True)
    fast.save_pretrained(save_dir)
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    """A Llama config small enough to train on a CPU in seconds."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llama(save_dir: str, vocab_size: int, seed: int = 0, **overrides):
    """Builds a random tiny Llama and saves it in HF format (safetensors, fp32).

    Written file by file rather than with ``save_pretrained``, which writes nothing on ranks
    other than 0 of a distributed job, where each rank may need its own copy.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, **overrides))
    os.makedirs(save_dir, exist_ok=True)
    model.config.save_pretrained(save_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, osp.join(save_dir, "model.safetensors"), metadata={"format": "pt"})
    return model


def prepare_demo(root: str, force: bool = False, **model_overrides) -> dict[str, str]:
    """Writes the demo tokenizer and model under ``root`` (once) and returns their paths.

    Several processes may ask at once (every rank of a torchrun job): each builds into a
    private folder and renames it into place, so a reader never sees a half-written model.
    """
    paths = {
        "tokenizer": osp.join(root, "tokenizer"),
        "model": osp.join(root, "model"),
        "data": DEMO_DATA,
    }
    if not force and osp.exists(osp.join(paths["model"], "config.json")):
        return paths
    staging = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = build_tiny_tokenizer(osp.join(staging, "tokenizer"))
    tokenizer.save_pretrained(osp.join(staging, "model"))
    build_tiny_llama(osp.join(staging, "model"), len(tokenizer), **model_overrides)
    if force:
        shutil.rmtree(root, ignore_errors=True)
    os.makedirs(osp.dirname(osp.abspath(root)), exist_ok=True)
    try:
        os.rename(staging, root)
    except OSError:  # another process got there first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def demo_dir(**model_overrides) -> str:
    """Where the demo assets for these model settings live (``$XTUNER_DEMO_DIR``)."""
    root = os.environ.get("XTUNER_DEMO_DIR") or osp.join(
        osp.expanduser("~"), ".cache", "xtuner", "demo"
    )
    tag = "_".join(f"{k}{v}" for k, v in sorted(model_overrides.items())) or "default"
    return osp.join(root, tag)


#: ``from_pretrained`` arguments that an ``llm`` dict may carry besides the model's shape.
LOAD_KWARGS = (
    "attn_implementation",
    "dtype",
    "torch_dtype",
    "trust_remote_code",
    "quantization_config",
    "low_cpu_mem_usage",
    "config",
)


def demo_llm(**kwargs):
    """The demo's tiny Llama, built offline on first use; for ``llm=dict(type=demo_llm)``.

    Configs are parsed lazily by mmengine (nothing imported runs while the file is read), so
    the bundled demo config names this function instead of computing a path.

    Args:
        **kwargs: model shape overrides (``hidden_size``, ``num_hidden_layers``, ...) and
            ``from_pretrained`` arguments (:data:`LOAD_KWARGS`).
    """
    from transformers import AutoModelForCausalLM

    load = {k: kwargs.pop(k) for k in LOAD_KWARGS if k in kwargs}
    if load.get("config") is None:
        load.pop("config", None)
    paths = prepare_demo(demo_dir(**kwargs), **kwargs)
    return AutoModelForCausalLM.from_pretrained(paths["model"], **load)


def demo_tokenizer(**model_overrides):
    """The demo's tokenizer (built with the model); for ``tokenizer=dict(type=demo_tokenizer)``."""
    from transformers import AutoTokenizer

    paths = prepare_demo(demo_dir(**model_overrides), **model_overrides)
    return AutoTokenizer.from_pretrained(paths["tokenizer"])
