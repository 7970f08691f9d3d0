"""Freezes one rank in the middle of writing a checkpoint file, for a test to ``kill -9`` it
(tests/tools/test_train_launch.py). Loaded by a config's ``custom_imports``.

With ``XTUNER_TEST_PAUSE_IN=<part of a path>`` and ``XTUNER_TEST_PAUSE_RANK=<rank>`` set, that
rank's first write of a file whose path contains the text (mmengine writes a checkpoint's
bytes with ``LocalBackend.put``, DeepSpeed each of its files with ``torch.save``) writes the
first half of the bytes, flushes them to disk, writes its process id and the file's path to
the file ``XTUNER_TEST_PAUSE_MARKER`` and sleeps: the process is provably inside the write
when the test kills it. Without the variables nothing changes.
"""

from __future__ import annotations

import io
import os
import time

import torch
from mmengine.fileio.backends import LocalBackend

_TRIGGER = os.environ.get("XTUNER_TEST_PAUSE_IN")
_ACTIVE = bool(_TRIGGER) and os.environ.get("RANK", "0") == os.environ.get(
    "XTUNER_TEST_PAUSE_RANK", "0"
)


def _wanted(path) -> bool:
    return _ACTIVE and isinstance(path, (str, os.PathLike)) and _TRIGGER in os.fspath(path)


def _write_half_and_sleep(data: bytes, path) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    marker = os.environ["XTUNER_TEST_PAUSE_MARKER"]
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n{os.fspath(path)}\n{len(data) // 2} of {len(data)} bytes\n")
    os.replace(marker + ".tmp", marker)  # the test never reads half a marker
    time.sleep(3600)


_put = LocalBackend.put
_save = torch.save


def _paused_put(self, obj: bytes, filepath) -> None:
    if _wanted(filepath):
        _write_half_and_sleep(obj, filepath)
    else:
        _put(self, obj, filepath)


def _paused_save(obj, f, *args, **kwargs):
    if not _wanted(f):
        return _save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    _write_half_and_sleep(buffer.getvalue(), f)


LocalBackend.put = _paused_put
torch.save = _paused_save
