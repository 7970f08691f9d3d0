"""InternVL_V1_5: InternVL models (1.5, 2, 2.5, 3) on transformers' own InternVL classes.

The checkpoint is a local folder in transformers' layout (the ``-hf`` releases, e.g.
``OpenGVLab/InternVL3-1B-hf``: ``InternVLForConditionalGeneration``, no remote code). Its
vision tower encodes each image tile, pixel shuffle folds every 2x2 block of patch features
into one, the projector maps them to the language model's width, and they replace the
image-context tokens of the text in place: the data set writes each image as
``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``
(:class:`xtuner.dataset.InternVL_V1_5_Dataset`). The merge and the loss path are the ones
every vision-language model shares (:mod:`xtuner.model.multimodal`): pluggable loss, global
normalisation and sequence parallel exactly as for LLaVA.

A remote-code checkpoint (OpenGVLab's original folders: ``InternVLChatModel`` with its
``vision_model``, ``mlp1`` and ``language_model``) is used instead when its code is in the
folder and ``trust_remote_code=True`` (:data:`PARTS` names the parts of each layout).
"""

from __future__ import annotations

import json
import os
import os.path as osp
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.model import BaseModel
from torch import Tensor, nn

from xtuner.parallel.zero import is_partitioned
from xtuner.registry import BUILDER
from xtuner.utils.constants import IMAGE_TOKEN_INDEX

from .llava import _built, _half_dtype, _merged
from .multimodal import MultimodalFinetune
from .utils import LoadWoInit, find_all_linear_names

#: the adapter names of the two LoRA sides (one PEFT model holds both).
LLM_ADAPTER, VISION_ADAPTER = "default", "visual_encoder"


class ContextTokenSplice:
    """The InternVL layout: image features replace the image-context tokens in place.

    Args:
        input_ids: ``[B, L]`` token ids, ``tokens_per_image`` context tokens per image tile.
        attention_mask: ``[B, L]`` padding mask (1: token) or None (all tokens).
        image_token_id: the id of ``<IMG_CONTEXT>``.
        tokens_per_image: features one tile gives.

    Raises:
        ValueError: a row's context tokens are not a whole number of tiles (a sample cut
            inside an image).
    """

    def __init__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_token_id: int,
        tokens_per_image: int,
    ):
        self.valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        self.is_image = (input_ids == image_token_id) & self.valid
        counts = self.is_image.sum(1)
        bad = (counts % tokens_per_image).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"sample {bad[0]} of the batch has {int(counts[bad[0]])} image-context tokens, "
                f"not a multiple of the {tokens_per_image} features of one image tile: was it "
                "cut inside an image? (InternVL_V1_5_Dataset never does; check the data)"
            )
        self.batch_size = input_ids.shape[0]
        #: image tiles each row uses.
        self.images_per_row = counts // tokens_per_image
        self.image_dst = self.is_image.nonzero(as_tuple=True)

    def place(self, values: Tensor, fill: float | int) -> Tensor:
        """The tensor itself, ``fill`` on image positions and padding."""
        keep = (self.valid & ~self.is_image).reshape(*self.valid.shape, *[1] * (values.dim() - 2))
        return values.masked_fill(~keep, fill)

    def embed(self, input_ids: Tensor, embedding: nn.Module, features: Tensor | None) -> Tensor:
        out = embedding(input_ids)
        if features is not None and features.shape[0]:
            out = out.index_put(self.image_dst, features.reshape(-1, out.shape[-1]).to(out.dtype))
        return out

    def merged_ids(self, input_ids: Tensor) -> Tensor:
        return input_ids.masked_fill(self.is_image, IMAGE_TOKEN_INDEX)

    def attention_mask(self) -> Tensor:
        return self.valid.long()

    def position_ids(self) -> Tensor:
        positions = torch.arange(self.valid.shape[1], device=self.valid.device)
        return positions[None].expand(self.batch_size, -1)


def read_model_config(model_path: str) -> dict:
    """The ``config.json`` of a local checkpoint folder, with a clear error when absent."""
    path = osp.join(str(model_path), "config.json")
    if not osp.isfile(path):
        raise FileNotFoundError(
            f"model_path={model_path!r} has no config.json: give the local folder of an "
            "InternVL checkpoint (e.g. a download of OpenGVLab/InternVL3-1B-hf)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def uses_remote_code(model_path: str, trust_remote_code: bool) -> bool:
    """Whether the checkpoint runs its own code (``InternVLChatModel``) or is an -hf one.

    A remote-code checkpoint (``auto_map`` in its config, e.g. OpenGVLab/InternVL2_5-1B) is
    used when its code files are in the folder and ``trust_remote_code`` is asked for;
    otherwise the error says what to do.
    """
    config = read_model_config(model_path)
    model_type = config.get("model_type")
    if model_type == "internvl":
        return False
    auto_map = config.get("auto_map") or {}
    where = f"model_path={model_path!r} (model_type={model_type!r})"
    if not auto_map:
        raise ValueError(
            f"{where} is not an InternVL checkpoint: InternVL_V1_5 needs a model of "
            "transformers' InternVL layout (config model_type 'internvl') or InternVL's own "
            "remote code (auto_map to InternVLChatModel)"
        )
    files = sorted({ref.split("--")[-1].split(".")[0] + ".py" for ref in auto_map.values()})
    missing = [f for f in files if not osp.isfile(osp.join(str(model_path), f))]
    if missing:
        raise FileNotFoundError(
            f"{where} is a remote-code checkpoint whose code is not in the folder (missing "
            f"{missing}); download the whole repository, or use its -hf version (e.g. "
            "OpenGVLab/InternVL3-1B-hf), which needs no remote code"
        )
    if not trust_remote_code:
        raise ValueError(
            f"{where} is a remote-code checkpoint ({files}): pass trust_remote_code=True to "
            "run its code, or use its -hf version, which needs no remote code"
        )
    return True


#: module paths of the parts in each layout: transformers' -hf one and the remote code's
#: (``InternVLChatModel``, whose language model carries its own head).
PARTS = {
    False: dict(
        language="model.language_model",
        head="lm_head",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
    ),
    True: dict(
        language="language_model",
        head="language_model.lm_head",
        vision="vision_model",
        projector="mlp1",
    ),
}


def quantization_config(quantization_llm: bool, quantization_vit: bool, remote: bool) -> Any:
    """QLoRA's 4-bit config for the chosen sides (the projector and head stay unquantised)."""
    if not quantization_llm and not quantization_vit:
        return None
    from transformers import BitsAndBytesConfig

    # transformers matches these from the start of a module's full name.
    parts = PARTS[remote]
    skip = [parts["projector"], parts["head"]]
    if not quantization_llm:
        skip.append(parts["language"])
    if not quantization_vit:
        skip.append(parts["vision"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=_half_dtype(),
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        llm_int8_skip_modules=skip,
    )


def _lora_config(lora: Any, model: nn.Module, prefix: str) -> Any:
    """A ``LoraConfig`` whose targets lie under ``prefix`` (a module path) only.

    ``target_modules=None`` targets every Linear under it; a list of names is restricted to
    it (vision and language layers share names such as ``q_proj``); a string is a regex the
    user wrote for the whole model and is kept.
    """
    import re

    if isinstance(lora, (dict, ConfigDict)):
        lora = BUILDER.build(lora)
    if not hasattr(model, "prepare_inputs_for_generation"):
        # A remote model without generation (InternVLChatModel on transformers 5) cannot be
        # wrapped as PEFT's CAUSAL_LM task (which reads it); the plain PeftModel is the same
        # for training.
        lora.task_type = None
    names = lora.target_modules
    if isinstance(names, str):
        return lora
    if names is None:
        names = find_all_linear_names(model.get_submodule(prefix))
    names = "|".join(re.escape(n) for n in sorted(names))
    lora.target_modules = rf"{re.escape(prefix)}\.(.*\.)?({names})"
    return lora


class InternVL_V1_5(MultimodalFinetune):  # noqa: N801 (the XTuner 0.x name)
    """InternVL: vision tower, pixel shuffle + projector, and a causal language model.

    Args:
        model_path: local folder of the checkpoint (transformers' InternVL layout, or a
            remote-code one with ``trust_remote_code``).
        freeze_llm: keep the language model's own weights (and head) fixed.
        freeze_visual_encoder: keep the vision tower's own weights fixed.
        llm_lora: a ``LoraConfig`` (or config dict) for the language model.
        visual_encoder_lora: a ``LoraConfig`` (or config dict) for the vision tower.
        quantization_vit: load the vision tower in 4 bits (needs ``visual_encoder_lora``).
        quantization_llm: load the language model in 4 bits (needs ``llm_lora``).
        pretrained_pth: a checkpoint of an earlier stage (``.pth`` file or DeepSpeed
            folder): its projector, adapters and other trained weights are loaded.
        trust_remote_code: allow a remote-code checkpoint (see :func:`uses_remote_code`).
        dtype: weights' dtype (``'auto'``: the checkpoint's).
        attn_implementation: the attention kernel (default: transformers' choice).
        use_activation_checkpointing: recompute activations in backward.
        loss: the loss config (see :func:`xtuner.model.losses.build_loss`); None is
            cross-entropy equal to the HF model's own loss.

    The projector is always trained (as in XTuner 0.x).
    """

    image_unit = "image tile"

    def __init__(
        self,
        model_path: str,
        freeze_llm: bool = False,
        freeze_visual_encoder: bool = False,
        llm_lora: Any = None,
        visual_encoder_lora: Any = None,
        quantization_vit: bool = False,
        quantization_llm: bool = False,
        pretrained_pth: str | None = None,
        trust_remote_code: bool = False,
        dtype: Any = "auto",
        attn_implementation: str | None = None,
        use_activation_checkpointing: bool = True,
        loss: Any = None,
    ):
        if quantization_llm and llm_lora is None:
            raise ValueError(
                "quantization_llm=True needs llm_lora: a 4-bit LLM trains through its adapter only"
            )
        if quantization_vit and visual_encoder_lora is None:
            raise ValueError(
                "quantization_vit=True needs visual_encoder_lora: a 4-bit vision "
                "tower trains through its adapter only"
            )
        #: whether the checkpoint runs its own code (InternVLChatModel), not the -hf classes.
        self.remote_code = uses_remote_code(model_path, trust_remote_code)
        self.parts = PARTS[self.remote_code]
        model = self._load(
            model_path,
            self.remote_code,
            dtype,
            attn_implementation,
            quantization_config(quantization_llm, quantization_vit, self.remote_code),
        )
        model = self._with_lora(model, llm_lora, visual_encoder_lora, self.parts)
        super().__init__(model, use_activation_checkpointing=False, loss=loss)
        self.model_path = str(model_path)
        self.freeze_llm = freeze_llm
        self.freeze_visual_encoder = freeze_visual_encoder
        self.use_llm_lora = llm_lora is not None
        self.use_visual_encoder_lora = visual_encoder_lora is not None
        self.use_lora = self.use_llm_lora or self.use_visual_encoder_lora
        self.quantization_llm = quantization_llm
        self.quantization_vit = quantization_vit
        self._set_trainable()
        self.use_activation_checkpointing = use_activation_checkpointing
        if use_activation_checkpointing:
            self.gradient_checkpointing_enable()
        if pretrained_pth is not None:
            self.load_pretrained(pretrained_pth)

    # building --------------------------------------------------------------------------------
    @staticmethod
    def _load(model_path, remote_code, dtype, attn_implementation, quantization):
        from transformers import AutoModel, AutoTokenizer, InternVLForConditionalGeneration

        kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        if not remote_code:
            with LoadWoInit():
                return InternVLForConditionalGeneration.from_pretrained(str(model_path), **kwargs)
        from xtuner.dataset.internvl_dataset import IMG_CONTEXT_TOKEN

        with LoadWoInit():
            model = AutoModel.from_pretrained(str(model_path), trust_remote_code=True, **kwargs)
        # The remote model learns its image-context token from the tokenizer (as its chat()
        # does), the one InternVL_V1_5_Dataset writes.
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=True)
        model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if model.img_context_token_id in (None, tokenizer.unk_token_id):
            raise ValueError(
                f"model_path={model_path!r}: its tokenizer has no {IMG_CONTEXT_TOKEN} token; "
                "use the checkpoint's own tokenizer files"
            )
        return model

    @staticmethod
    def _with_lora(model: nn.Module, llm_lora: Any, vision_lora: Any, parts: dict) -> nn.Module:
        """One PEFT model with an adapter per side asked for, both active."""
        if llm_lora is None and vision_lora is None:
            return model
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        sides = []
        if llm_lora is not None:
            sides.append((LLM_ADAPTER, _lora_config(llm_lora, model, parts["language"])))
        if vision_lora is not None:
            sides.append((VISION_ADAPTER, _lora_config(vision_lora, model, parts["vision"])))
        (first, config), rest = sides[0], sides[1:]
        model = get_peft_model(model, config, adapter_name=first)
        for name, config in rest:
            model.add_adapter(name, config)
        model.base_model.set_adapter([name for name, _ in sides])
        return model

    def _set_trainable(self) -> None:
        """Each side trains in full, through its adapter, or not at all; the projector trains."""
        language = [self._part("language"), self._part("head")]
        for modules, frozen, lora in (
            (language, self.freeze_llm, self.use_llm_lora),
            ([self._part("vision")], self.freeze_visual_encoder, self.use_visual_encoder_lora),
        ):
            if lora:
                continue  # PEFT left its adapters trainable and the base weights frozen
            for module in modules:
                module.requires_grad_(not frozen)
        self._part("projector").requires_grad_(True)

    # parts -------------------------------------------------------------------------------------
    def _part(self, name: str) -> nn.Module:
        """A part (``language``, ``head``, ``vision``, ``projector``) of either layout."""
        return self.base_llm.get_submodule(self.parts[name])

    def causal_lm(self) -> nn.Module:
        # The remote model's forward wants pixels: its language model maps embeddings to logits.
        return self._part("language") if self.remote_code else self.base_llm

    @property
    def tokens_per_image(self) -> int:
        """Features one image tile gives (patches, pixel-shuffled)."""
        if self.remote_code:
            return int(self.base_llm.num_image_token)
        config = self.base_llm.config
        vision = config.vision_config
        side = _pair(vision.image_size)[0] // _pair(vision.patch_size)[0]
        return int(side * side * config.downsample_ratio**2)

    def image_splice(self, data: dict) -> ContextTokenSplice:
        return ContextTokenSplice(
            data["input_ids"],
            data.get("attention_mask"),
            self.base_llm.img_context_token_id
            if self.remote_code
            else self.base_llm.config.image_token_id,
            self.tokens_per_image,
        )

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        if self.remote_code:
            # vision tower at select_layer, pixel shuffle by downsample_ratio, mlp1
            features = self.base_llm.extract_feature(pixel_values)
        else:
            features = self._hf_image_features(pixel_values)
        if features.shape[1] != self.tokens_per_image:
            raise ValueError(
                f"image tiles of size {tuple(pixel_values.shape[-2:])} give "
                f"{features.shape[1]} features, but the model's config says "
                f"{self.tokens_per_image}: tiles must have the vision tower's image_size"
            )
        return features

    def _hf_image_features(self, pixel_values: Tensor) -> Tensor:
        config = self.base_llm.config
        return self.base_llm.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output

    def vision_parameters(self) -> list[nn.Parameter]:
        return [*self._part("vision").parameters(), *self._part("projector").parameters()]

    def _attention_model(self) -> nn.Module:
        # Sequence parallel splits the text only: the vision tower keeps its own attention.
        return self._part("language")

    # checkpoints -----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only what training changes (trainable weights: projector, adapters, unfrozen
        sides; the loss's own state), under the full key names."""
        state = BaseModel.state_dict(self, *args, **kwargs)
        return self._trainable_entries(state, kwargs.get("prefix", ""), whole=("loss.",))

    def to_hf(
        self,
        cfg: Config | None,
        save_dir: str,
        fp32: bool = False,
        save_pretrained_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        """Saves one ``InternVLForConditionalGeneration`` (LoRA merged) with its tokenizer and
        processor: it reloads with ``from_pretrained`` and gives the trained model's logits.

        Args:
            cfg: the training config (its ``tokenizer``, else the checkpoint's).
            save_dir: output folder.
            fp32: keep fp32 weights (else bf16, or fp16 where bf16 is unsupported).
            save_pretrained_kwargs: passed to ``save_pretrained``.
        """
        if self.remote_code:
            raise NotImplementedError(
                f"exporting a remote-code InternVL ({self.model_path}) to an HF checkpoint: "
                "train from the checkpoint's -hf version (e.g. OpenGVLab/InternVL3-1B-hf) to "
                "export, or keep the training checkpoint (iter_N.pth) and load it with "
                "pretrained_pth"
            )
        if any(is_partitioned(p) for p in self.parameters()):
            raise NotImplementedError(
                "saving an InternVL model partitioned by ZeRO-3: convert the training "
                "checkpoint instead (xtuner convert pth_to_hf CONFIG iter_N.pth SAVE_DIR)"
            )
        if not is_main_process():
            return
        if self.quantization_llm or self.quantization_vit:
            raise ValueError(
                "cannot merge LoRA into a quantized model: convert from a config with "
                "quantization_llm=False and quantization_vit=False (xtuner convert pth_to_hf "
                "with --cfg-options model.quantization_llm=False model.quantization_vit=False)"
            )
        model = _merged(self.llm)
        if not fp32:
            model = model.to(_half_dtype())
        model.config.use_cache = True
        os.makedirs(save_dir, exist_ok=True)
        model.save_pretrained(save_dir, **dict(save_pretrained_kwargs or {}))
        self._save_processor(cfg, save_dir)
        print_log(f"saved InternVLForConditionalGeneration to {save_dir}", "current")

    def _save_processor(self, cfg: Config | None, save_dir: str) -> None:
        """The checkpoint's processor (or its parts: tokenizer, image processor) next to the
        weights; the config's tokenizer when it has one."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        tokenizer = _built(cfg, "tokenizer") or AutoTokenizer.from_pretrained(self.model_path)
        try:
            processor = AutoProcessor.from_pretrained(self.model_path)
        except (OSError, ValueError, TypeError, AttributeError):
            processor = None  # no processor files, or one whose parts cannot load here
        if hasattr(processor, "tokenizer"):
            processor.tokenizer = tokenizer
            processor.save_pretrained(save_dir)
            return
        tokenizer.save_pretrained(save_dir)
        try:
            AutoImageProcessor.from_pretrained(self.model_path).save_pretrained(save_dir)
        except (OSError, ValueError):
            print_log(f"{self.model_path} has no image processor to save with the model", "current")


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
