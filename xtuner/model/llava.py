"""LLaVAModel: vision encoder + projector + language model, trained with the SFT loss path.

A batch holds text ``input_ids`` where every ``IMAGE_TOKEN_INDEX`` (-200) stands for one image,
and ``pixel_values`` with the images of each sample. The model encodes the images (hidden
state at ``visual_select_layer``, CLS dropped), projects them to the language model's width
and splices each image's ``P`` patch features into the text in place of its token; labels
(and every other per-token field, e.g. ``loss_weight``) are spliced alike, ``IGNORE_INDEX``
on image patches, so image positions are never targets. From there the loss path is the
one every vision-language model shares (:mod:`xtuner.model.multimodal`).
"""

from __future__ import annotations

import copy
import os
import os.path as osp
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.model import BaseModel
from torch import Tensor, nn

from xtuner.registry import BUILDER
from xtuner.utils.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

from .modules.projector import ProjectorConfig, ProjectorModel
from .multimodal import MultimodalFinetune
from .sft import _bf16_ok
from .utils import LoadWoInit, build_nested, find_all_linear_names

SAVE_FORMATS = ("xtuner", "huggingface", "official")
#: The original LLaVA repositories' class and ``model_type`` for each language-model class
#: (haotian-liu/LLaVA: Llama, Mistral; LLaVA-NeXT: Qwen2).
OFFICIAL_LLAVA_CLASSES = {
    "LlamaForCausalLM": ("LlavaLlamaForCausalLM", "llava_llama"),
    "MistralForCausalLM": ("LlavaMistralForCausalLM", "llava_mistral"),
    "Qwen2ForCausalLM": ("LlavaQwenForCausalLM", "llava_qwen"),
}


class ImageSplice:
    """Where every text token and every image patch goes in the merged sequence.

    Built from the text alone (``input_ids`` with ``IMAGE_TOKEN_INDEX`` placeholders, an
    optional padding mask) and the number of patches per image, so that labels can be merged
    without running the vision encoder (the training loop's token counting needs them).
    Valid tokens are packed to the left of each merged row; rows are padded on the right.

    Args:
        input_ids: ``[B, L]`` token ids.
        attention_mask: ``[B, L]`` padding mask (1: token) or None (all tokens).
        num_patches: features per image after the CLS token is dropped.
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor | None, num_patches: int):
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        is_image = (input_ids == IMAGE_TOKEN_INDEX) & valid
        images_before = is_image.long().cumsum(1) - is_image.long()
        dest = valid.long().cumsum(1) - 1 + (num_patches - 1) * images_before
        text = valid & ~is_image
        self.batch_size = input_ids.shape[0]
        self.num_patches = num_patches
        #: images (image tokens) of each row.
        self.images_per_row = is_image.sum(1)
        #: merged length of each row.
        self.lengths = valid.sum(1) + (num_patches - 1) * self.images_per_row
        self.width = int(self.lengths.max()) if self.batch_size else 0
        self.text_src = text.nonzero(as_tuple=True)
        self.text_dst = (self.text_src[0], dest[text])
        image_rows = is_image.nonzero(as_tuple=True)[0]
        patches = torch.arange(num_patches, device=input_ids.device)
        self.image_dst = (
            image_rows.repeat_interleave(num_patches),
            (dest[is_image][:, None] + patches).reshape(-1),
        )

    def place(self, values: Tensor, fill: float | int) -> Tensor:
        """Moves a per-token tensor ``[B, L, ...]`` to the merged layout ``[B, W, ...]``.

        Image patches and padding get ``fill``.
        """
        out = values.new_full((self.batch_size, self.width, *values.shape[2:]), fill)
        return out.index_put(self.text_dst, values[self.text_src])

    def embed(self, input_ids: Tensor, embedding: nn.Module, features: Tensor | None) -> Tensor:
        """Merged input embeddings ``[B, W, D]``: text embeddings and image features.

        Args:
            input_ids: the ``[B, L]`` ids this splice was built from.
            embedding: the language model's input embedding.
            features: ``[N, P, D]`` features of the images in token order (row by row, left
                to right), or None when there is no image token.
        """
        text = embedding(input_ids[self.text_src])
        out = text.new_zeros(self.batch_size, self.width, text.shape[-1])
        out = out.index_put(self.text_dst, text)
        if features is not None and features.shape[0]:
            out = out.index_put(self.image_dst, features.reshape(-1, out.shape[-1]).to(out.dtype))
        return out

    def merged_ids(self, input_ids: Tensor, pad_id: int = 0) -> Tensor:
        """``[B, W]`` ids of the merged sequence: ``IMAGE_TOKEN_INDEX`` on every patch."""
        return self.place(input_ids, pad_id).index_put(
            self.image_dst, torch.tensor(IMAGE_TOKEN_INDEX, device=input_ids.device)
        )

    def attention_mask(self) -> Tensor:
        positions = torch.arange(self.width, device=self.lengths.device)
        return (positions[None] < self.lengths[:, None]).long()

    def position_ids(self) -> Tensor:
        positions = torch.arange(self.width, device=self.lengths.device)
        return positions[None].expand(self.batch_size, -1)


class LLaVAModel(MultimodalFinetune):
    """LLaVA: a vision encoder, a projector and a causal language model.

    Args:
        llm: the language model or its config dict (as for :class:`SupervisedFinetune`;
            ``quantization_config`` gives QLoRA).
        visual_encoder: the vision model (e.g. ``CLIPVisionModel``) or its config dict.
        freeze_llm: keep the language model's own weights fixed.
        freeze_visual_encoder: keep the vision encoder's own weights fixed.
        visual_select_layer: which hidden state of the vision encoder is used.
        pretrained_pth: a checkpoint of an earlier stage (a ``.pth`` file or a DeepSpeed
            checkpoint folder); its projector (and adapters) are loaded.
        projector_depth: Linear layers of the projector.
        llm_lora: a ``LoraConfig`` (or config dict) for the language model.
        visual_encoder_lora: a ``LoraConfig`` (or config dict) for the vision encoder.
        use_activation_checkpointing: recompute activations in backward.
        max_position_embeddings: extend the context with linear RoPE scaling.
        loss: the loss config (see :func:`xtuner.model.losses.build_loss`); None is
            cross-entropy equal to the HF model's own loss on the merged sequence.
    """

    def __init__(
        self,
        llm: Any,
        visual_encoder: Any,
        freeze_llm: bool = False,
        freeze_visual_encoder: bool = False,
        visual_select_layer: int = -2,
        pretrained_pth: str | None = None,
        projector_depth: int = 2,
        llm_lora: Any = None,
        visual_encoder_lora: Any = None,
        use_activation_checkpointing: bool = True,
        max_position_embeddings: int | None = None,
        loss: Any = None,
    ):
        # The LLM (with its LoRA) and the loss are built as for SFT; checkpointing is switched
        # on below, once the vision side exists.
        super().__init__(
            llm,
            lora=llm_lora,
            use_activation_checkpointing=False,
            max_position_embeddings=max_position_embeddings,
            loss=loss,
        )
        self.use_llm_lora = self.use_lora
        self.freeze_llm = freeze_llm
        self.freeze_visual_encoder = freeze_visual_encoder
        self.visual_select_layer = visual_select_layer
        self.visual_encoder = self._build_visual_encoder(visual_encoder)
        vision_config = self.visual_encoder.config
        projector = ProjectorModel(
            ProjectorConfig(
                visual_hidden_size=vision_config.hidden_size,
                llm_hidden_size=self.base_llm.config.hidden_size,
                depth=projector_depth,
            )
        )
        self.projector = projector.to(next(self.visual_encoder.parameters()).dtype)
        if freeze_llm and not self.use_llm_lora:
            self.llm.requires_grad_(False)
        if freeze_visual_encoder:
            self.visual_encoder.requires_grad_(False)
        self.use_visual_encoder_lora = visual_encoder_lora is not None
        if self.use_visual_encoder_lora:
            self._prepare_visual_encoder_lora(visual_encoder_lora)
        self._freeze_unreachable_vision_params()
        self.use_activation_checkpointing = use_activation_checkpointing
        if use_activation_checkpointing:
            self.gradient_checkpointing_enable()
        if pretrained_pth is not None:
            self.load_pretrained(pretrained_pth)

    # building ------------------------------------------------------------------------------
    @staticmethod
    def _build_visual_encoder(cfg: Any) -> nn.Module:
        if isinstance(cfg, nn.Module):
            return cfg
        if not isinstance(cfg, (dict, ConfigDict)):
            raise TypeError(
                f"visual_encoder must be a model or a config dict, got {type(cfg).__name__}"
            )
        cfg = dict(cfg)
        if "torch_dtype" in cfg:  # transformers 5 renamed it
            cfg["dtype"] = cfg.pop("torch_dtype")
        with LoadWoInit():
            return build_nested(cfg)

    def _prepare_visual_encoder_lora(self, lora: Any) -> None:
        from peft import get_peft_model

        if isinstance(lora, (dict, ConfigDict)):
            lora = BUILDER.build(lora)
        if getattr(lora, "target_modules", None) is None:
            lora.target_modules = find_all_linear_names(self.visual_encoder)
        self.visual_encoder = get_peft_model(self.visual_encoder, lora)

    def _freeze_unreachable_vision_params(self) -> list[str]:
        """Freezes the vision encoder's parameters that cannot reach the image features.

        The features are the hidden states after layer ``visual_select_layer`` (by default
        the second to last), so the layers after it, and the pooled output's norm and head,
        take no part in the loss. Left trainable (their LoRA adapters, or the whole encoder
        when it is trained), they would never get a gradient: DDP stops at the second
        iteration ("parameters that were not used in producing loss") and the optimizer
        carries dead state. Applies to encoders with HF's ``encoder.layers`` layout (CLIP,
        SigLIP, ...); others are left as they are.

        Returns:
            The names of the parameters frozen.
        """
        base = self.base_visual_encoder
        found = next(
            (
                (name, module)
                for name, module in base.named_modules()
                if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList)
            ),
            None,
        )
        if found is None:
            return []
        prefix, layers = found
        # hidden_states holds the embeddings, then the output of each of the n layers.
        first_unused = self.visual_select_layer % (len(layers) + 1)
        root = prefix[: -len("encoder.layers")]
        dead = [f"{prefix}.{i}." for i in range(first_unused, len(layers))]
        dead += [f"{root}post_layernorm.", f"{root}head."]
        frozen = [
            name
            for name, p in base.named_parameters()
            if p.requires_grad and name.startswith(tuple(dead))
        ]
        for name, p in base.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        if frozen:
            print_log(
                f"froze {len(frozen)} vision-encoder parameters after visual_select_layer="
                f"{self.visual_select_layer} (they cannot reach the image features)",
                logger="current",
            )
        return frozen

    def gradient_checkpointing_enable(self) -> None:
        super().gradient_checkpointing_enable()
        kwargs = {"use_reentrant": False}
        self.base_visual_encoder.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs
        )

    def gradient_checkpointing_disable(self) -> None:
        super().gradient_checkpointing_disable()
        self.base_visual_encoder.activation_checkpointing_disable()

    # parts -----------------------------------------------------------------------------------
    @property
    def base_visual_encoder(self) -> nn.Module:
        """The HF vision model under any peft wrapper."""
        encoder = self.visual_encoder
        return encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder

    @property
    def num_image_tokens(self) -> int:
        """Features per image in the merged sequence (patches; the CLS token is dropped)."""
        config = self.base_visual_encoder.config
        image_size, patch_size = (
            getattr(config, "image_size", None),
            getattr(config, "patch_size", None),
        )
        if not image_size or not patch_size:
            raise ValueError(
                f"{type(config).__name__} has no image_size/patch_size: cannot tell how many "
                "features an image gives"
            )
        return (image_size // patch_size) ** 2

    # multimodal merge -----------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Projected features ``[N, P, D_llm]`` of images ``[N, C, H, W]``."""
        dtype = next(self.visual_encoder.parameters()).dtype
        outputs = self.visual_encoder(pixel_values.to(dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.visual_select_layer][:, 1:]
        if features.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"images of size {tuple(pixel_values.shape[-2:])} give {features.shape[1]} "
                f"patches, but the vision config says {self.num_image_tokens}: resize the "
                "images to the encoder's image_size (the image processor's crop size)"
            )
        return self.projector(features)

    def image_splice(self, data: dict) -> ImageSplice:
        return ImageSplice(data["input_ids"], data.get("attention_mask"), self.num_image_tokens)

    def vision_parameters(self) -> list[nn.Parameter]:
        return [*self.visual_encoder.parameters(), *self.projector.parameters()]

    # checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only what training changes, under the full key names: the projector, the adapters
        (LoRA), the whole LLM / vision encoder when they are trained in full, the loss."""
        state = BaseModel.state_dict(self, *args, **kwargs)
        whole = ["projector.", "loss."]
        if not self.use_llm_lora and not self.freeze_llm:
            whole.append("llm.")
        if not self.use_visual_encoder_lora and not self.freeze_visual_encoder:
            whole.append("visual_encoder.")
        return self._trainable_entries(state, kwargs.get("prefix", ""), tuple(whole))

    def to_hf(
        self,
        cfg: Config | None,
        save_dir: str,
        fp32: bool = False,
        save_pretrained_kwargs: dict | None = None,
        save_format: str = "xtuner",
        **kwargs,
    ) -> None:
        """Saves the model.

        Args:
            cfg: the training config (``tokenizer`` and ``image_processor`` are read from it).
            save_dir: output folder.
            fp32: keep fp32 weights (else bf16, or fp16 where bf16 is unsupported).
            save_pretrained_kwargs: passed to every ``save_pretrained``.
            save_format: ``'xtuner'``: the trained parts in separate folders (``llm_adapter``
                or the LLM itself in ``save_dir``, ``visual_encoder_adapter`` or
                ``visual_encoder``, ``projector``); ``'huggingface'``: one transformers
                ``LlavaForConditionalGeneration`` (LoRA merged) with its processor;
                ``'official'``: the original LLaVA repository's checkpoint (see
                :meth:`official_llava_state`).
        """
        kwargs = dict(save_pretrained_kwargs or {})
        if save_format == "xtuner":
            self._to_xtuner_llava(cfg, save_dir, fp32, kwargs)
        elif save_format == "huggingface":
            self._to_huggingface_llava(cfg, save_dir, fp32, kwargs)
        elif save_format == "official":
            self._to_official_llava(cfg, save_dir, fp32, kwargs)
        else:
            raise ValueError(
                f"save_format={save_format!r} is not supported; use one of {SAVE_FORMATS}"
            )

    def _to_xtuner_llava(self, cfg, save_dir: str, fp32: bool, kwargs: dict) -> None:
        if self.use_llm_lora:
            super().to_hf(cfg, osp.join(save_dir, "llm_adapter"), fp32, kwargs)
        elif not self.freeze_llm:
            super().to_hf(cfg, save_dir, fp32, kwargs)
        dtype = None if fp32 else _half_dtype()
        if self.use_visual_encoder_lora:
            self.visual_encoder.save_pretrained(osp.join(save_dir, "visual_encoder_adapter"))
        elif not self.freeze_visual_encoder:
            path = osp.join(save_dir, "visual_encoder")
            _save_copy(self.visual_encoder, path, dtype, kwargs)
            processor = _built(cfg, "image_processor")
            if processor is not None:
                processor.save_pretrained(path)
        _save_copy(self.projector, osp.join(save_dir, "projector"), dtype, kwargs)
        print_log(f"saved the LLaVA parts (xtuner format) to {save_dir}", "current")

    def _check_not_quantized(self) -> None:
        if getattr(self.base_llm, "is_loaded_in_4bit", False) or getattr(
            self.base_llm, "is_loaded_in_8bit", False
        ):
            raise ValueError(
                "cannot merge LoRA into a quantized LLM: convert from a config without "
                "quantization_config (xtuner convert pth_to_hf does that)"
            )

    def build_hf_llava(self, tokenizer: Any):
        """This model as a transformers ``LlavaForConditionalGeneration`` (LoRA merged).

        Args:
            tokenizer: the tokenizer; its ``'<image>'`` id becomes ``image_token_index``
                (the token is added when missing, growing the embeddings if needed).
        """
        from transformers import AddedToken, LlavaConfig, LlavaForConditionalGeneration

        if self.projector.config.depth != 2:
            raise ValueError(
                f"the huggingface format needs projector_depth=2 (Linear, GELU, Linear), this "
                f"model has {self.projector.config.depth}; use save_format='xtuner'"
            )
        self._check_not_quantized()
        if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True)], True)
        llm = _merged(self.llm)
        vision = _merged(self.visual_encoder)
        if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        config = LlavaConfig(
            vision_config=vision.config.to_dict(),
            text_config=llm.config.to_dict(),
            image_token_index=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
            image_seq_length=self.num_image_tokens,
            projector_hidden_act=self.projector.config.hidden_act,
            vision_feature_layer=self.visual_select_layer,
            vision_feature_select_strategy="default",
            multimodal_projector_bias=self.projector.config.bias,
            tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
        )
        state = {f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()}
        prefix = llm.base_model_prefix + "."
        for key, value in llm.state_dict().items():
            if key.startswith(prefix):
                key = "model.language_model." + key[len(prefix) :]
            state[key] = value
        names = {"model.0.": "linear_1.", "model.2.": "linear_2."}
        for key, value in self.projector.state_dict().items():
            state["model.multi_modal_projector." + names[key[:8]] + key[8:]] = value
        with LoadWoInit():
            model = LlavaForConditionalGeneration(config)
        model.load_state_dict(state, strict=True)
        return model.to(next(self.base_llm.parameters()).dtype)

    def _to_huggingface_llava(self, cfg, save_dir: str, fp32: bool, kwargs: dict) -> None:
        from transformers import LlavaProcessor

        tokenizer = _built(cfg, "tokenizer")
        if tokenizer is None:
            raise ValueError("save_format='huggingface' needs the config's tokenizer")
        model = self.build_hf_llava(tokenizer)
        if not fp32:
            model = model.to(_half_dtype())
        model.save_pretrained(save_dir, **kwargs)
        processor = _built(cfg, "image_processor")
        if processor is None:
            tokenizer.save_pretrained(save_dir)
        else:
            LlavaProcessor(
                image_processor=processor,
                tokenizer=tokenizer,
                patch_size=self.base_visual_encoder.config.patch_size,
                vision_feature_select_strategy="default",
                num_additional_image_tokens=1,
            ).save_pretrained(save_dir)
        print_log(f"saved LlavaForConditionalGeneration to {save_dir}", "current")

    def official_llava_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """This model in the original LLaVA repository's layout: ``(config, weights)``.

        The layout of ``LlavaLlamaForCausalLM`` (haotian-liu/LLaVA; Mistral alike, Qwen2 as
        LLaVA-NeXT's ``LlavaQwenForCausalLM``): the language model's own keys (LoRA merged),
        the projector under ``model.mm_projector.{0,2,...}`` (``mlp{depth}x_gelu``) and, when
        the vision encoder was trained (in full or with LoRA, merged), its weights under
        ``model.vision_tower.vision_tower.``; otherwise LLaVA loads it from
        ``mm_vision_tower``. The config is the language model's with LLaVA's ``mm_*`` keys.
        """
        self._check_not_quantized()
        projector = self.projector.config
        if not projector.bias or projector.hidden_act != "gelu":
            raise ValueError(
                "the official format needs LLaVA's projector (Linear layers with biases, GELU "
                f"between them); this one has bias={projector.bias}, hidden_act="
                f"{projector.hidden_act!r}: use save_format='xtuner'"
            )
        llm = _merged(self.llm)
        classes = OFFICIAL_LLAVA_CLASSES.get(type(llm).__name__)
        if classes is None:
            raise ValueError(
                f"the official LLaVA format has no class for a {type(llm).__name__} language "
                f"model (it has {sorted(OFFICIAL_LLAVA_CLASSES)}); use save_format='huggingface' "
                "or 'xtuner'"
            )
        vision = _merged(self.visual_encoder)
        trained_vision = self.use_visual_encoder_lora or not self.freeze_visual_encoder
        state = dict(llm.state_dict())
        if getattr(llm.config, "tie_word_embeddings", False):
            # As save_pretrained stores it: a tied head once, under the embedding's name.
            for key in getattr(llm, "_tied_weights_keys", None) or ():
                state.pop(key, None)
        if trained_vision:
            state.update(
                (f"model.vision_tower.vision_tower.{k}", v) for k, v in vision.state_dict().items()
            )
        state.update(
            (f"model.mm_projector.{k[6:]}", v) for k, v in self.projector.state_dict().items()
        )
        config = llm.config.to_dict()
        config.update(
            architectures=[classes[0]],
            model_type=classes[1],
            use_cache=True,
            image_aspect_ratio="pad",  # xtuner pads images to a square as LLaVA does
            mm_hidden_size=vision.config.hidden_size,
            mm_projector_type=f"mlp{projector.depth}x_gelu",
            mm_use_im_patch_token=False,
            mm_use_im_start_end=False,
            mm_vision_select_feature="patch",  # the CLS feature is dropped
            mm_vision_select_layer=self.visual_select_layer,
            mm_vision_tower=vision.config.name_or_path,
            unfreeze_mm_vision_tower=trained_vision,
            use_mm_proj=True,
        )
        return config, state

    def _to_official_llava(self, cfg, save_dir: str, fp32: bool, kwargs: dict) -> None:
        import json

        from huggingface_hub import save_torch_state_dict

        config, state = self.official_llava_state()
        dtype = torch.float32 if fp32 else _half_dtype()
        state = {k: v.detach().to(dtype) for k, v in state.items()}
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        os.makedirs(save_dir, exist_ok=True)
        # huggingface_hub's writer shards by size and stores tied weights once, as
        # save_pretrained does.
        save_torch_state_dict(
            state,
            save_dir,
            max_shard_size=kwargs.get("max_shard_size", "5GB"),
            safe_serialization=kwargs.get("safe_serialization", True),
        )
        with open(osp.join(save_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for key in ("tokenizer", "image_processor"):
            part = _built(cfg, key)
            if part is not None:
                part.save_pretrained(save_dir)
        print_log(
            f"saved {config['architectures'][0]} (official LLaVA layout) to {save_dir}", "current"
        )


def _merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with any LoRA merged in (the model itself when it has none)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _half_dtype() -> torch.dtype:
    return torch.bfloat16 if _bf16_ok() else torch.float16


def _save_copy(module: nn.Module, path: str, dtype: torch.dtype | None, kwargs: dict) -> None:
    """``save_pretrained`` of ``module`` in ``dtype`` without changing the training copy."""
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module = copy.deepcopy(module).to(dtype)
    os.makedirs(path, exist_ok=True)
    module.save_pretrained(path, **kwargs)


def _built(cfg: Config | None, key: str) -> Any:
    value = cfg.get(key) if cfg is not None else None
    if isinstance(value, (dict, ConfigDict)):
        value = BUILDER.build(value)
    return value
