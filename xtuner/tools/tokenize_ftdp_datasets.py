"""``xtuner tokenize_ftdp_datasets --processed-dir IN --tokenized-dir OUT --tokenizer-path TOK``:
tokenise ftdp (InternLM's processed chat data) into the intern-repo tokenized format.

Input: every ``*.jsonl`` file under ``IN`` whose path contains a ``processed`` folder, each line a
list of messages ``{"role", "content", "name"?, "type"?, "loss"?}``; the first folder below
``IN`` names the data set. Roles are ``system``, ``user``, ``assistant`` and ``environment``,
plus ``tool`` and ``thought``, which are folded into the assistant message they belong to.

Each line becomes one sample in InternLM2's ChatML layout (the ``chatml_llamav13_32k`` format
of XTuner 0.x)::

    BOS <|im_start|>ROLE[ name=NAME]\\n CONTENT <|im_end|>\\n ...

- the ``<|im_start|>...\\n`` opener of every message is context (no loss);
- an assistant message's content and its ``<|im_end|>\\n`` are trained on, unless the message
  says ``"loss": false`` or its ``type`` is ``prefix``; other roles are context;
- a ``tool`` message is written ``<|action_start|>NAME\\n CONTENT <|action_end|>\\n`` (names
  ``interpreter`` and ``plugin`` become ``<|interpreter|>``/``<|plugin|>``), a ``thought`` as
  its bare content; both are appended to the assistant message before them (or start one);
- the sample is cut to 32768 tokens.

Output: ``OUT/chatml_llamav13_32k/train/cn/DATASET/FILE.bin`` (JSON lines ``{"tokens": [...]}``,
negative ids = no loss) with ``FILE.bin.meta`` (byte offset and length of each line), which
``load_intern_repo_tokenized_dataset(folder=OUT/chatml_llamav13_32k/train)`` reads back; every
100th sample is also written under ``valid/``, kept only when that gives more than 500 samples.
Files already tokenised are skipped. The tokenizer gets the special tokens the layout needs
(``<|im_start|>``, ``<|im_end|>``, ``<|action_start|>``, ``<|action_end|>``, ``<|interpreter|>``,
``<|plugin|>``) when it lacks them, and is then saved to ``--tokenizer-w-special-tokens-save-dir``
(train with that tokenizer). A line that is not a list of valid messages stops the run with
its file and line.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
from typing import Any

from xtuner.tools.utils import UserError, run_tool

PROG = "xtuner tokenize_ftdp_datasets"
FORMAT = "chatml_llamav13_32k"
MAX_LEN = 32 * 1024
SPECIAL_TOKENS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
NAMES = {"interpreter": "<|interpreter|>", "plugin": "<|plugin|>"}
MAIN_ROLES = ("system", "user", "assistant", "environment")
# Which message types of a role are trained on (``type`` defaults to ``current``).
TRAINED = {"assistant": {"icl", "current"}}
TYPES = ("meta", "icl", "current", "prefix")
END = "<|im_end|>\n"
VALID_EVERY, VALID_MIN = 100, 500


def _opener(role: str, name: str | None) -> str:
    if name is None:
        return f"<|im_start|>{role}\n"
    # Only the roles a tool can speak for map the tool names to their tokens.
    shown = name if role == "user" else NAMES.get(name, name)
    return f"<|im_start|>{role} name={shown}\n"


def _fold_sub_roles(messages: list[dict]) -> list[dict]:
    """Messages of the four main roles; ``tool``/``thought`` text joins its assistant turn."""
    out: list[dict] = []
    for message in messages:
        role = message["role"]
        if role in MAIN_ROLES:
            out.append(dict(message))
            continue
        if role == "tool":
            name = message.get("name")
            opener = "" if name is None else f"<|action_start|>{NAMES.get(name, name)}\n"
            text = f"{opener}{message['content']}<|action_end|>\n"
        else:  # thought
            text = message["content"]
        if out and out[-1]["role"] == "assistant":
            out[-1]["content"] += text
        else:
            out.append({"role": "assistant", "content": text})
    return out


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("a line must be a non-empty JSON list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be an object with a string 'content'")
        if m.get("role") not in (*MAIN_ROLES, "tool", "thought"):
            raise ValueError(
                f"message {i} has role {m.get('role')!r}; use one of "
                f"{[*MAIN_ROLES, 'tool', 'thought']}"
            )
        if m.get("type", "current") not in TYPES:
            raise ValueError(f"message {i} has type {m.get('type')!r}; use one of {list(TYPES)}")


def encode_ftdp_messages(messages: list[dict], tokenizer, max_len: int = MAX_LEN) -> list[int]:
    """Signed token ids of one ftdp conversation (negative: no loss), see the module docstring.

    Raises:
        ValueError: the messages are malformed (what and which message).
    """
    _check_messages(messages)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    end = tokenizer.encode(END, add_special_tokens=False)
    for message in _fold_sub_roles(messages):
        role = message["role"]
        opener = _opener(role, message.get("name"))
        begin = tokenizer.encode(opener, add_special_tokens=False)
        # The content is tokenised inside its opener and closer, as it appears in the text.
        whole = tokenizer.encode(opener + message["content"] + END, add_special_tokens=False)
        content = whole[len(begin) : len(whole) - len(end)]
        trained = message.get("loss", True) and message.get("type", "current") in TRAINED.get(
            role, ()
        )
        ids += [-t for t in begin]
        ids += content if trained else [-t for t in content]
        ids += end if role == "assistant" else [-t for t in end]
    return ids[:max_len]


def _write_bin(path: str, samples: list[list[int]]) -> None:
    import numpy as np

    os.makedirs(osp.dirname(path), exist_ok=True)
    meta, offset = [], 0
    with open(path, "wb") as f:
        for tokens in samples:
            line = (json.dumps({"tokens": tokens}) + "\n").encode()
            f.write(line)
            meta.append((offset, len(tokens)))
            offset += len(line)
    with open(f"{path}.meta", "wb") as f:
        np.save(f, np.asarray(meta, dtype=np.int64).reshape(-1, 2))


def tokenize_file(path: str, tokenizer) -> list[list[int]]:
    """The samples of one ftdp file; a bad line raises a ``UserError`` naming it."""
    from xtuner.dataset.utils import read_json_records

    samples = []
    for lineno, messages, error in read_json_records(path, json_lines=True):
        try:
            if error is not None:
                raise ValueError(error)
            samples.append(encode_ftdp_messages(messages, tokenizer))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{lineno}: {e}; fix or remove the line") from e
    return samples


def add_special_tokens(tokenizer) -> bool:
    """Adds the layout's special tokens the tokenizer lacks; True when it added any."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return bool(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processed-dir", required=True, help="the ftdp folder to read")
    parser.add_argument("--tokenized-dir", required=True, help="where the tokenized data goes")
    parser.add_argument("--tokenizer-path", required=True, help="an HF tokenizer folder")
    parser.add_argument(
        "--tokenizer-w-special-tokens-save-dir",
        default=None,
        help="where the tokenizer is saved when special tokens had to be added",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from transformers import AutoTokenizer

        if not osp.isdir(args.processed_dir):
            raise UserError(f"--processed-dir {args.processed_dir}: no such folder")
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer_path, trust_remote_code=True, padding_side="right"
        )
        if add_special_tokens(tokenizer):
            if not args.tokenizer_w_special_tokens_save_dir:
                raise UserError(
                    f"the tokenizer at {args.tokenizer_path} lacks {list(SPECIAL_TOKENS)}: give "
                    "--tokenizer-w-special-tokens-save-dir DIR to save it with them (and "
                    "train with that tokenizer, with the model's embeddings resized)"
                )
            tokenizer.save_pretrained(args.tokenizer_w_special_tokens_save_dir)
            saved = args.tokenizer_w_special_tokens_save_dir
            print(f"saved the tokenizer with the special tokens to {saved}")
        out = osp.join(args.tokenized_dir, FORMAT)
        totals = {"train": [0, 0], "valid": [0, 0]}
        found = 0
        for root, dirs, files in os.walk(args.processed_dir, followlinks=True):
            dirs.sort()
            for name in sorted(files):
                path = osp.join(root, name)
                rel = osp.relpath(path, args.processed_dir)
                if not name.endswith(".jsonl") or "processed" not in rel.split(os.sep)[:-1]:
                    continue
                found += 1
                dataset, stem = rel.split(os.sep)[0], osp.splitext(name)[0]
                train_path = osp.join(out, "train", "cn", dataset, f"{stem}.bin")
                if osp.isfile(train_path):
                    print(f"{train_path} exists, skipped")
                    continue
                samples = tokenize_file(path, tokenizer)
                _write_bin(train_path, samples)
                # A validation split smaller than this would not cover every rank.
                valid = samples[VALID_EVERY - 1 :: VALID_EVERY]
                valid = valid if len(valid) > VALID_MIN else []
                if valid:
                    _write_bin(osp.join(out, "valid", "cn", dataset, f"{stem}.bin"), valid)
                for split, part in (("train", samples), ("valid", valid)):
                    totals[split][0] += len(part)
                    totals[split][1] += sum(map(len, part))
                print(f"{rel}: {len(samples)} samples -> {train_path}")
        for split, (n, tokens) in totals.items():
            print(f"{split}: {n} samples, {tokens} tokens")
        if not found:
            raise UserError(
                f"no *.jsonl file under a 'processed' folder of {args.processed_dir}; the "
                "layout is DATASET/processed/.../FILE.jsonl"
            )
        return 0

    return run_tool(body, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
