"""Fixtures of the data pipeline tests: a private processed-data cache and JSON Lines writers."""

from __future__ import annotations

import json
import os.path as osp

import pytest


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch) -> str:
    """Each test gets its own processed-data cache directory."""
    path = str(tmp_path / "xtuner_cache")
    monkeypatch.setenv("XTUNER_DATASET_CACHE", path)
    return path


@pytest.fixture
def write_jsonl(tmp_path):
    """Writes records (dicts, or raw strings as broken lines) to a .jsonl file; returns the path."""

    def write(records, name: str = "data.jsonl") -> str:
        path = osp.join(str(tmp_path), name)
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(
                    record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
                )
                f.write("\n")
        return path

    return write


@pytest.fixture
def mm_warnings():
    """The warnings logged through mmengine's current logger during the test (their text)."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    # mmengine's registry warns when a build runs outside a registry scope (which scope is
    # current depends on the tests that ran before): not a message of the data code.
    handler.emit = lambda record: (
        None
        if record.getMessage().startswith("Failed to search registry")
        else messages.append(record.getMessage())
    )
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
