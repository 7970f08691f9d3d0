"""process_hf_dataset end to end: configs, packing, weights, bad data, cache, processes."""

from __future__ import annotations

import json
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict, load_dataset
from transformers import AutoTokenizer

import xtuner.dataset.huggingface as hf
from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.utils import PROMPT_TEMPLATE
from xtuner.utils.constants import IGNORE_INDEX

HERE = osp.dirname(osp.abspath(__file__))
TEMPLATE = dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.default)


def alpaca_records(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Reverse word {i}.", "input": f"w{i}", "output": f"{i}w"}
        for i in range(start, start + n)
    ]


def conversation_records(n: int) -> list[dict]:
    return [{"conversation": [{"input": f"q{i}", "output": f"a{i} b{i}"}]} for i in range(n)]


def json_cfg(path: str) -> dict:
    return dict(type=load_dataset, path="json", data_files=path, split="train")


def flat(dataset, column="input_ids") -> list:
    return [t for row in dataset[column] for t in row]


@pytest.fixture
def tokenizer_cfg(demo_assets) -> dict:
    return dict(
        type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=demo_assets["tokenizer"]
    )


def test_configs_build_and_packing_keeps_every_token(write_jsonl, tokenizer_cfg):
    path = write_jsonl(alpaca_records(300))
    common = dict(
        dataset=json_cfg(path),
        tokenizer=tokenizer_cfg,
        max_length=256,
        dataset_map_fn="alpaca_map_fn",
        template_map_fn=TEMPLATE,
        map_num_proc=1,
    )
    plain = process_hf_dataset(**common, pack_to_max_length=False, remove_unused_columns=True)
    assert plain.column_names == ["input_ids", "labels", "length"]
    assert len(plain) == 300 and plain["length"][:] == [len(r) for r in plain["input_ids"]]
    packed = process_hf_dataset(**common, shuffle_before_pack=False)
    assert packed.column_names == ["input_ids", "labels", "cumulative_len", "length"]
    assert flat(packed) == flat(plain) and flat(packed, "labels") == flat(plain, "labels")
    assert set(packed["length"][:-1]) == {256}
    boundaries = []
    for r, cum in enumerate(packed["cumulative_len"]):
        boundaries += [r * 256 + c for c in cum[1:-1]]
    doc_ends = set()
    total = 0
    for length in plain["length"]:
        total += length
        doc_ends.add(total)
    assert set(boundaries) <= doc_ends and len(doc_ends - set(boundaries)) <= len(packed)
    shuffled = process_hf_dataset(**common)
    assert sorted(flat(shuffled)) == sorted(flat(plain)) and flat(shuffled) != flat(plain)


def test_map_fn_by_name_dotted_path_or_callable(write_jsonl, tokenizer):
    path = write_jsonl(alpaca_records(20))
    outs = [
        process_hf_dataset(
            json_cfg(path),
            tokenizer=tokenizer,
            max_length=512,
            dataset_map_fn=fn,
            template_map_fn=TEMPLATE,
            pack_to_max_length=False,
        )["input_ids"][:]
        for fn in ("alpaca_map_fn", "xtuner.dataset.map_fns.alpaca_map_fn")
    ]
    assert outs[0] == outs[1]
    with pytest.raises(TypeError, match="list-dataset-format"):
        process_hf_dataset(
            json_cfg(path), tokenizer=tokenizer, max_length=64, dataset_map_fn="nope"
        )


def test_dataset_dict_split_subset_and_option_errors(tokenizer):
    data = DatasetDict(
        train=Dataset.from_list(conversation_records(50)),
        test=Dataset.from_list(conversation_records(5)),
    )
    kwargs = dict(tokenizer=tokenizer, max_length=64, template_map_fn=TEMPLATE)
    test = process_hf_dataset(data, split="test", pack_to_max_length=False, **kwargs)
    assert len(test) == 5
    both = process_hf_dataset(data, split=None, pack_to_max_length=False, **kwargs)
    assert len(both) == 55
    subset = process_hf_dataset(data, max_dataset_length=7, pack_to_max_length=False, **kwargs)
    assert len(subset) == 7
    with pytest.raises(ValueError, match="use_varlen_attn"):
        process_hf_dataset(data, use_varlen_attn=True, pack_to_max_length=False, **kwargs)
    with pytest.raises(ValueError, match="split"):
        process_hf_dataset(data, split="test", **kwargs)


def test_bad_records_are_dropped_with_one_counted_warning(write_jsonl, tokenizer, monkeypatch):
    bad = [
        {"conversation": []},
        {"conversation": [{"input": "no output"}]},
        {"conversation": [{"input": "a", "output": 5}]},
        {"conversation": [{"input": "a", "output": "b", "output_with_loss": False}]},
        {"conversation": [{"input": "c", "output": "d", "output_with_loss": False}]},
        {"other": "no conversation at all"},
    ]
    path = write_jsonl(conversation_records(10)[:5] + bad + conversation_records(10)[5:])
    logs = []
    monkeypatch.setattr(hf, "print_log", lambda msg, *a, **k: logs.append((msg, a, k)))
    out = process_hf_dataset(
        json_cfg(path), tokenizer=tokenizer, max_length=64, template_map_fn=TEMPLATE
    )
    assert sum(out["length"]) == sum(
        len(r)
        for r in process_hf_dataset(
            Dataset.from_list(conversation_records(10)),
            tokenizer=tokenizer,
            max_length=64,
            template_map_fn=TEMPLATE,
            pack_to_max_length=False,
        )["input_ids"]
    )
    warnings = [msg for msg, a, _ in logs if msg.startswith("dropped")]
    assert len(warnings) == 1
    message = warnings[0]
    assert message.startswith("dropped 6 of 16 records: ")
    for part in ("2 with no trainable tokens", "1 empty", "2 missing fields", "1 with non-string"):
        assert part in message


def test_every_record_dropped_is_an_error(tokenizer):
    data = Dataset.from_list(alpaca_records(5))
    with pytest.raises(ValueError, match="every record was dropped .*record 0"):
        process_hf_dataset(data, tokenizer=tokenizer, max_length=64, template_map_fn=TEMPLATE)


def test_unparsable_json_line_names_file_and_line(write_jsonl, tokenizer):
    path = write_jsonl([*conversation_records(3), '{"conversation": [', *conversation_records(2)])
    with pytest.raises(ValueError, match=f"{path}:4: invalid JSON"):
        process_hf_dataset(json_cfg(path), tokenizer=tokenizer, max_length=64)


def test_per_turn_weights_survive_packing_and_collate(write_jsonl, tokenizer):
    records = conversation_records(30)
    for i, record in enumerate(records):
        if i % 3 == 0:
            record["conversation"][0]["loss_weight"] = 0.25 * (i % 7)
    path = write_jsonl(records)
    kwargs = dict(tokenizer=tokenizer, max_length=48, template_map_fn=TEMPLATE)
    plain = process_hf_dataset(json_cfg(path), pack_to_max_length=False, **kwargs)
    packed = process_hf_dataset(json_cfg(path), use_varlen_attn=True, **kwargs)
    assert "loss_weight" in plain.column_names and "loss_weight" in packed.column_names
    expected = {}
    for i, row in enumerate(plain):
        weight = 0.25 * (i % 7) if i % 3 == 0 else 1.0
        assert row["loss_weight"] == [weight] * row["length"]
        for label in row["labels"]:
            if label != IGNORE_INDEX:
                expected[weight] = expected.get(weight, 0) + 1
    batch = default_collate_fn([packed[i] for i in range(len(packed))], use_varlen_attn=True)
    data = batch["data"]
    assert data["loss_weight"].shape == data["labels"].shape
    got = {}
    for label, weight in zip(data["labels"].flatten(), data["loss_weight"].flatten()):
        if label != IGNORE_INDEX:
            got[round(float(weight), 4)] = got.get(round(float(weight), 4), 0) + 1
    assert got == {round(k, 4): v for k, v in expected.items()}
    assert float(data["loss_weight"][~data["attention_mask"]].abs().sum()) == 0.0


def test_kept_columns_with_weights_only_in_late_records(tokenizer):
    records = conversation_records(1100)
    for record in records[1050:]:
        record["conversation"][0]["loss_weight"] = 2.0
    out = process_hf_dataset(
        Dataset.from_list(records),
        tokenizer=tokenizer,
        max_length=64,
        template_map_fn=TEMPLATE,
        pack_to_max_length=False,
    )
    assert {"conversation", "input_ids", "labels", "loss_weight", "length"} <= set(out.column_names)
    assert out[0]["loss_weight"] == [1.0] * out[0]["length"]
    assert out[1099]["loss_weight"] == [2.0] * out[1099]["length"]
    assert out[0]["conversation"][0]["input"].startswith("<|User|>:q0")


def test_pretokenized_data_is_filtered_and_packed():
    data = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
            "labels": [[-100, 2, 3], [-100, -100], [-100, 7, 8, 9]],
            "note": ["a", "b", "c"],
        }
    )
    out = process_hf_dataset(
        data, do_dataset_tokenization=False, max_length=4, shuffle_before_pack=False
    )
    assert out["input_ids"][:] == [[1, 2, 3, 6], [7, 8, 9]]
    assert out["cumulative_len"][:] == [[0, 3, 4], [0, 3]]


def test_cache_is_reused_and_keyed_by_options(write_jsonl, tokenizer, monkeypatch, dataset_cache):
    path = write_jsonl(conversation_records(40))
    kwargs = dict(tokenizer=tokenizer, template_map_fn=TEMPLATE)
    first = process_hf_dataset(json_cfg(path), max_length=32, **kwargs)
    assert len(os.listdir(dataset_cache)) == 1

    def fail(*args, **kwargs):
        raise AssertionError("processed again")

    monkeypatch.setattr(hf, "_process", fail)
    again = process_hf_dataset(json_cfg(path), max_length=32, **kwargs)
    assert again["input_ids"][:] == first["input_ids"][:]
    with pytest.raises(AssertionError, match="processed again"):
        process_hf_dataset(json_cfg(path), max_length=33, **kwargs)
    monkeypatch.setenv("XTUNER_DATASET_CACHE", "none")
    with pytest.raises(AssertionError, match="processed again"):
        process_hf_dataset(json_cfg(path), max_length=32, **kwargs)


def test_two_worker_processes_give_the_same_result(tokenizer):
    assert hf._num_proc(32, 100) == 1
    assert hf._num_proc(32, 10**7) == hf.available_cpus()
    if hf.available_cpus() < 2:
        pytest.skip("needs 2 CPUs")
    data = Dataset.from_list(conversation_records(4200))
    kwargs = dict(tokenizer=tokenizer, max_length=64, template_map_fn=TEMPLATE)
    one = process_hf_dataset(data, map_num_proc=1, **kwargs)
    two = process_hf_dataset(data, map_num_proc=2, **kwargs)
    assert one["input_ids"][:] == two["input_ids"][:]
    assert one["cumulative_len"][:] == two["cumulative_len"][:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiproc
@pytest.mark.slow
def test_distributed_first_rank_processes_and_others_load(write_jsonl, demo_assets, tmp_path):
    path = write_jsonl(conversation_records(64))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = osp.join(HERE, "dist_process_hf.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", WORLD_SIZE="2")
    env["MASTER_PORT"] = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, script, path, demo_assets["tokenizer"], str(out_dir)],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["processed"] == [True, False]
    assert results[1]["processed"] == [False, False]
    assert results[0]["digest"] == results[1]["digest"]


def test_editing_a_map_function_invalidates_the_cache(tmp_path, tokenizer, monkeypatch):
    module = tmp_path / "my_qa_map.py"
    source = (
        "def qa_map_fn(example):\n"
        "    return {'conversation': [{'input': example['q'], 'output': example['a'] + %r}]}\n"
    )
    module.write_text(source % "")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import my_qa_map

    data = Dataset.from_list([{"q": "question", "a": "answer"}])
    kwargs = dict(tokenizer=tokenizer, max_length=64, pack_to_max_length=False)
    before = process_hf_dataset(data, dataset_map_fn="my_qa_map.qa_map_fn", **kwargs)
    module.write_text(source % " more")
    importlib.reload(my_qa_map)
    after = process_hf_dataset(data, dataset_map_fn="my_qa_map.qa_map_fn", **kwargs)
    assert len(after[0]["input_ids"]) > len(before[0]["input_ids"])
