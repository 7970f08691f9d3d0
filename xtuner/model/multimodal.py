"""The multimodal path shared by every vision-language model (LLaVA, InternVL).

A model of this kind turns a batch of text (with image placeholders) and images into the
language model's input embeddings; from there the loss path is the SFT one
(:meth:`SupervisedFinetune.loss_from_inputs`): labels shifted once on the merged sequence,
per-token weights, loss extras, the sequence-parallel split (after the merge) and the
pluggable loss with global normalisation.

What differs between families is only *where* image features go, described by a *splice*
(built from the text alone, so labels can be merged without running the vision encoder):

- LLaVA: one ``IMAGE_TOKEN_INDEX`` per image grows into the image's patches
  (:class:`xtuner.model.llava.ImageSplice`);
- InternVL: the text already holds one context token per feature, replaced in place
  (:class:`xtuner.model.internvl.ContextTokenSplice`).

A splice has ``batch_size``, ``images_per_row`` (images each row uses), ``place(values,
fill)`` (a per-token tensor in the merged layout), ``embed(input_ids, embedding, features)``,
``merged_ids(input_ids)`` (``IMAGE_TOKEN_INDEX`` on image positions), ``attention_mask()``
and ``position_ids()``. A model gives :meth:`MultimodalFinetune.image_splice`,
:meth:`MultimodalFinetune.encode_images` and :meth:`MultimodalFinetune.vision_parameters`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModel
from torch import Tensor, nn

from xtuner.utils.constants import IGNORE_INDEX

from .sft import SupervisedFinetune
from .utils import load_checkpoint_state

#: batch fields that describe the unmerged text layout and are rebuilt (or dropped) by the merge.
LAYOUT_FIELDS = ("input_ids", "attention_mask", "position_ids", "cumulative_len", "max_seqlen")


class Splice(Protocol):
    """Where text tokens and image features go in the merged sequence (see the module)."""

    batch_size: int
    images_per_row: Tensor

    def place(self, values: Tensor, fill: float | int) -> Tensor: ...

    def embed(self, input_ids: Tensor, embedding: nn.Module, features: Tensor | None) -> Tensor: ...

    def merged_ids(self, input_ids: Tensor) -> Tensor: ...

    def attention_mask(self) -> Tensor: ...

    def position_ids(self) -> Tensor: ...


def images_per_sample(pixel_values: Any, batch_size: int) -> list[Tensor]:
    """The images of each sample, ``[n_b, C, H, W]`` each.

    Accepted layouts: ``[B, C, H, W]`` (one image per sample, as XTuner 0.x collates),
    ``[B, n, C, H, W]``, or a list of ``B`` tensors ``[C, H, W]`` / ``[n_b, C, H, W]``.
    """
    if pixel_values is None:
        return [None] * batch_size
    if isinstance(pixel_values, Tensor):
        if pixel_values.dim() == 4 and pixel_values.shape[0] == batch_size:
            return list(pixel_values.unsqueeze(1))
        if pixel_values.dim() == 5 and pixel_values.shape[0] == batch_size:
            return list(pixel_values)
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} for a batch of {batch_size} "
            "samples: expected [B, C, H, W], [B, n, C, H, W] or a list of B tensors"
        )
    if len(pixel_values) != batch_size:
        raise ValueError(
            f"pixel_values is a list of {len(pixel_values)} entries for {batch_size} samples"
        )
    return [p if p is None or p.dim() == 4 else p.unsqueeze(0) for p in pixel_values]


class MultimodalFinetune(SupervisedFinetune):
    """A language model fed with image features: the merge and the loss of every family.

    Subclasses build the parts and give :meth:`image_splice`, :meth:`encode_images` and
    :meth:`vision_parameters`; everything from the batch to the loss terms is here.
    """

    #: what a sample's images are called in error messages ("image", "image tile").
    image_unit = "image"

    # the family's parts ----------------------------------------------------------------------
    def image_splice(self, data: dict) -> Splice:
        """The splice of a batch (from its text and padding mask alone)."""
        raise NotImplementedError

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Features ``[N, P, D_llm]`` of images ``[N, C, H, W]``, ready for the LLM."""
        raise NotImplementedError

    def vision_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters between the pixels and the image features."""
        raise NotImplementedError

    # the merge -------------------------------------------------------------------------------
    def _image_features(self, data: dict, splice: Splice) -> tuple[Tensor | None, Tensor | None]:
        """Features of the images that have tokens, in token order; and a zero-weight anchor.

        Sample ``b`` uses its first ``k_b`` images, ``k_b`` being the number its tokens stand
        for (text-only samples may carry a placeholder image, which is skipped). When no sample
        of the batch uses an image, one image still runs through the vision side with weight
        zero (or, with no image in the batch at all, the vision side's trainable parameters
        join with weight zero), so every trainable parameter takes part in backward on every
        rank (DDP, ZeRO).
        """
        counts = splice.images_per_row.tolist()
        per_sample = images_per_sample(data.get("pixel_values"), splice.batch_size)
        used = []
        for b, (k, images) in enumerate(zip(counts, per_sample)):
            have = 0 if images is None else images.shape[0]
            if k > have:
                raise ValueError(
                    f"sample {b} of the batch has {k} {self.image_unit} token(s) but {have} "
                    f"{self.image_unit}(s): every image in the text needs its pixels in "
                    "pixel_values"
                )
            if k:
                used.append(images[:k])
        if used:
            return self.encode_images(torch.cat(used)), None
        if not torch.is_grad_enabled():
            return None, None
        spare = next((images for images in per_sample if images is not None), None)
        if spare is not None:
            return None, self.encode_images(spare[:1]).sum() * 0
        # No image at all (text-only samples without a placeholder image): the vision side's
        # trainable parameters join backward directly, with a zero gradient.
        params = [p for p in self.vision_parameters() if p.requires_grad]
        if not params:
            return None, None
        return None, sum(p.reshape(-1)[:1].sum() for p in params) * 0

    def prepare_inputs(self, data: dict) -> tuple[dict[str, Tensor | None], dict]:
        """Merges images into the text.

        Returns:
            ``(inputs, batch)``: the language model's inputs (``inputs_embeds``,
            ``position_ids``, ``attention_mask``) and the batch with every per-token field
            (``labels``, ``loss_weight``, ...) moved to the merged layout: ``input_ids`` has
            ``IMAGE_TOKEN_INDEX`` on each image position, labels are ``IGNORE_INDEX`` there.
        """
        splice = self.image_splice(data)
        features, anchor = self._image_features(data, splice)
        embeds = splice.embed(data["input_ids"], self.causal_lm().get_input_embeddings(), features)
        if anchor is not None:
            embeds = embeds + anchor.to(embeds.dtype)
        batch = merge_batch(data, splice)
        inputs = {
            "inputs_embeds": embeds,
            "position_ids": batch["position_ids"],
            "attention_mask": batch["attention_mask"],
        }
        return inputs, batch

    # forward -------------------------------------------------------------------------------
    def _llm_forward(self, data: dict):
        inputs, _ = self.prepare_inputs(data)
        return self.llm(**inputs)

    def compute_loss(self, data: dict) -> dict[str, Tensor]:
        """Merge the images, then the SFT loss path on the merged sequence."""
        if "labels" not in data:
            raise KeyError("the batch has no 'labels': the dataset must produce them")
        inputs, batch = self.prepare_inputs(data)
        # Rows are padded on the right only: causal attention already keeps real tokens
        # from seeing the padding, so no mask is needed (and none is split under sp).
        inputs["attention_mask"] = None
        return self.loss_from_inputs(inputs, batch)

    def loss_denominators(self, data: dict) -> dict[str, Tensor]:
        """Token-weight sums of the merged batch (no image is encoded)."""
        batch = merge_batch(data, self.image_splice(data))
        _, weights = self._targets(batch, batch["position_ids"])
        return {key: w.sum().double() for key, w in weights.items()}

    # stages --------------------------------------------------------------------------------
    def load_pretrained(self, path: str) -> None:
        """Loads the weights an earlier stage saved (projector, adapters, unfrozen parts)."""
        state = load_checkpoint_state(path)
        # Keys are compared without PEFT's wrapping, so that a stage without LoRA feeds one
        # with it (and back): ``llm.base_model.model.x.base_layer.weight`` is ``llm.x.weight``.
        own = {_unwrapped_key(k): k for k in BaseModel.state_dict(self)}
        matched = {own[_unwrapped_key(k)]: v for k, v in state.items() if _unwrapped_key(k) in own}
        if not matched:
            raise ValueError(
                f"pretrained_pth={path!r}: none of its {len(state)} weights belongs to this "
                f"model (first keys: {list(state)[:3]}); is it a checkpoint of an earlier "
                f"{type(self).__name__} stage?"
            )
        self.load_state_dict(matched, strict=False)
        unused = len(state) - len(matched)
        print_log(
            f"loaded {len(matched)} weights from {path}"
            + (f" ({unused} not in this model, ignored)" if unused else ""),
            logger="current",
        )


def _unwrapped_key(key: str) -> str:
    """A state-dict key as it is without PEFT's wrapper modules."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def merge_batch(data: dict, splice: Splice) -> dict:
    """The batch in the merged layout: every ``[B, L, ...]`` field placed by ``splice``
    (labels ``IGNORE_INDEX`` and other fields 0 on image positions and padding)."""
    input_ids = data["input_ids"]
    batch = {k: v for k, v in data.items() if k not in LAYOUT_FIELDS}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.shape[:2] == input_ids.shape:
            batch[key] = splice.place(value, IGNORE_INDEX if key == "labels" else 0)
    batch["input_ids"] = splice.merged_ids(input_ids)
    batch["attention_mask"] = splice.attention_mask()
    batch["position_ids"] = splice.position_ids()
    return batch
