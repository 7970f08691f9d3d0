"""Precomputing the reference model's log-probabilities once, before DPO training."""

from __future__ import annotations

import hashlib
import os
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from xtuner.model.losses.base import sample_ids_from_positions
from xtuner.model.losses.preference import answer_index

#: bump when what a cached value means changes.
_VERSION = "1"


def sequence_digests(data: dict) -> list[bytes]:
    """A digest of each answer's whole sequence (prompt and answer tokens, labels), in the
    order of :func:`~xtuner.model.losses.preference.answer_index`.

    Packing and batching change from run to run; a sequence's tokens do not, so the
    reference value of a sequence is found whatever batch it lands in.
    """
    from xtuner.model.sft import shift_labels

    ids, labels = data["input_ids"].cpu(), data["labels"].cpu()
    positions = data.get("position_ids")
    positions = torch.arange(ids.shape[1]).expand_as(ids) if positions is None else positions.cpu()
    runs, n_runs = answer_index(shift_labels(labels, positions))
    docs = sample_ids_from_positions(positions.expand_as(ids))
    mask = data.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    digests = []
    for k in range(n_runs):
        row, col = (runs == k).nonzero()[0].tolist()
        where = keep[row] & (docs[row] == docs[row, col])
        token_bytes = ids[row][where].to(torch.int64).numpy().tobytes()
        label_bytes = labels[row][where].to(torch.int64).numpy().tobytes()
        digests.append(hashlib.blake2b(token_bytes + b"|" + label_bytes, digest_size=16).digest())
    return digests


@HOOKS.register_module()
class PrecomputeRefLogpsHook(Hook):
    """Fills :attr:`xtuner.model.dpo.DPO.ref_cache` in one pass over the training data.

    Before training, every batch of the training dataloader goes through the reference
    model once (``no_grad``); the values are saved to ``cache_file`` (by default under the
    processed-data cache, :func:`xtuner.dataset.huggingface.cache_root`, keyed by the
    reference and the data) and reloaded by later runs. Then the reference model is
    released unless the policy is a LoRA model (whose reference costs nothing). Use it with
    ``model=dict(type=DPO, ..., precompute_ref_log_probs=True)``.

    Args:
        cache_file: where to keep the values; None for the default place; ``''`` keeps
            them in memory only.
        release_reference: drop the reference model after the pass.
    """

    priority = "VERY_HIGH"

    def __init__(self, cache_file: str | None = None, release_reference: bool = True):
        self.cache_file = cache_file
        self.release_reference = release_reference

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not getattr(model, "precompute_ref_log_probs", False):
            raise ValueError(
                "PrecomputeRefLogpsHook: the model does not precompute reference "
                "log-probabilities; set model=dict(type=DPO, ..., precompute_ref_log_probs=True)"
            )
        if not model.needs_reference:
            return
        dataloader = runner.train_loop.dataloader
        path = self._path(model, dataloader)
        if path and osp.exists(path):
            model.ref_cache.update(torch.load(path, weights_only=True))
        missing = 0
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for batch in dataloader:
            data = batch.get("data", batch)
            data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}
            if model._cached_reference(data) is None:
                model.cache_reference(data)
                missing += 1
        model.train(was_training)
        missing = _share_across_ranks(model.ref_cache, missing)
        print_log(
            f"PrecomputeRefLogpsHook: reference log-probabilities of {len(model.ref_cache)} "
            f"sequences ({missing} batches computed, the rest from {path or 'memory'})",
            logger="current",
        )
        if path and missing and _rank() == 0:
            os.makedirs(osp.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            torch.save(dict(model.ref_cache), tmp)
            os.replace(tmp, path)
        if self.release_reference and model.ref_llm is not None:
            model.release_reference()

    def _path(self, model, dataloader) -> str | None:
        if self.cache_file is not None:
            return self.cache_file or None
        from xtuner.dataset.huggingface import cache_root

        root = cache_root()
        if root is None:
            return None
        ref = model.ref_llm if model.ref_llm is not None else model.llm
        name = str(getattr(ref.config, "_name_or_path", "") or type(ref).__name__)
        dataset = getattr(dataloader, "dataset", None)
        fingerprint = str(getattr(dataset, "fingerprint", len(dataset) if dataset else 0))
        key = hashlib.sha1(f"{_VERSION}|{name}|{fingerprint}".encode()).hexdigest()[:16]
        return osp.join(root, "reference_logps", f"{key}.pt")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _share_across_ranks(cache: dict, missing: int) -> int:
    """Every rank's values go to every rank: later epochs shard the data differently."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return missing
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dict(cache), missing))
    for part, _ in gathered:
        cache.update(part)
    return sum(count for _, count in gathered)
