"""``xtuner convert split SRC DST``: rewrite an HF model's weights as smaller shards.

Big checkpoints (one multi-GB ``pytorch_model.bin`` or a few huge safetensors files) are
rewritten as safetensors shards of at most ``--max-shard-size`` with the usual
``model.safetensors.index.json``, so loaders can read them piece by piece. Tensors are read one
at a time (safetensors lazily, ``.bin`` memory-mapped), so the whole model is never held in
memory. Every other file of SRC (config, tokenizer, generation config ...) is copied.
``from_pretrained(DST)`` gives the same model as ``from_pretrained(SRC)``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import shutil

from xtuner.tools.utils import UserError, run_tool

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(src: str) -> list[str]:
    """The weight files of an HF model folder (safetensors preferred over ``.bin``)."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(glob.glob(osp.join(src, pattern)))
        if files:
            return files
    raise UserError(
        f"{src} holds no model weights (*.safetensors or pytorch_model*.bin); give an HF "
        "model folder"
    )


class _Reader:
    """Reads tensors one at a time from safetensors or (memory-mapped) ``.bin`` files."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            self._file = safe_open(path, framework="pt")
            self.keys = list(self._file.keys())
        else:
            import torch

            self._file = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            self.keys = list(self._file)

    def nbytes(self, key: str) -> int:
        if isinstance(self._file, dict):
            tensor = self._file[key]
            return tensor.numel() * tensor.element_size()
        piece = self._file.get_slice(key)
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
        count = 1
        for dim in piece.get_shape():
            count *= dim
        return count * size.get(piece.get_dtype(), 1)

    def tensor(self, key: str):
        if isinstance(self._file, dict):
            return self._file[key].clone()  # tied weights share storage; safetensors refuses
        return self._file.get_tensor(key)


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Groups keys in order into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for key, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def split(src: str, dst: str, max_shard_size: str) -> list[str]:
    """Writes the sharded copy of ``src`` to ``dst``; returns the shard file names."""
    from huggingface_hub.serialization._base import parse_size_to_int
    from safetensors.torch import save_file

    if not osp.isdir(src) or not osp.isfile(osp.join(src, "config.json")):
        raise UserError(f"{src} is not an HF model folder (no config.json)")
    if osp.abspath(src) == osp.abspath(dst):
        raise UserError("SRC and DST are the same folder; give a new folder for the shards")
    try:
        max_bytes = parse_size_to_int(max_shard_size)
    except ValueError as exc:
        raise UserError(f"--max-shard-size {max_shard_size!r}: {exc}") from exc
    files = weight_files(src)
    readers = [_Reader(path) for path in files]
    owner = {key: reader for reader in readers for key in reader.keys}
    sizes = [(key, reader.nbytes(key)) for reader in readers for key in reader.keys]
    shards = plan_shards(sizes, max_bytes)
    os.makedirs(dst, exist_ok=True)
    names = [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else ""
        for i in range(len(shards))
    ]
    names = [name or "model.safetensors" for name in names]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_file(
            {key: owner[key].tensor(key) for key in keys}, osp.join(dst, name), {"format": "pt"}
        )
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        with open(osp.join(dst, INDEX_FILES[0]), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    skip = {osp.basename(p) for p in files} | set(INDEX_FILES)
    for name in os.listdir(src):
        path = osp.join(src, name)
        if name not in skip and osp.isfile(path):
            shutil.copy2(path, osp.join(dst, name))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner convert split", description=__doc__)
    parser.add_argument("src", help="an HF model folder")
    parser.add_argument("dst", help="the new folder for the sharded copy")
    parser.add_argument("--max-shard-size", default="2GB", help="e.g. 500MB, 2GB")

    def body() -> int:
        args = parser.parse_args(argv)
        names = split(args.src, args.dst, args.max_shard_size)
        print(f"wrote {len(names)} shard(s) to {args.dst}")
        return 0

    return run_tool(body, "xtuner convert split")
