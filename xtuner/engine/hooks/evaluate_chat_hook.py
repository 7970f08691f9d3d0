"""Generates answers to fixed prompts before, during and after training."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from xtuner.registry import BUILDER
from xtuner.utils.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from xtuner.utils.templates import get_template


class StopWordStoppingCriteria(StoppingCriteria):
    """Stops when the decoded text of the new tokens ends with a stop word."""

    def __init__(self, tokenizer, stop_word: str, prompt_len: int):
        self.tokenizer = tokenizer
        self.stop_word = stop_word
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :])
        return text.rstrip().endswith(self.stop_word)


def generation_config(tokenizer, max_new_tokens: int, **kwargs) -> GenerationConfig:
    """Greedy decoding (unless ``kwargs`` say otherwise) that ends at the tokenizer's EOS."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    kwargs.setdefault("do_sample", False)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        **kwargs,
    )


def generate_reply(
    llm, tokenizer, inputs: dict, config: GenerationConfig, stop_words: list[str], streamer=None
) -> list[int]:
    """The new token ids ``llm`` generates for ``inputs``, ending at a stop word or EOS.

    Args:
        llm: a causal language model (HF ``generate``).
        tokenizer: its tokenizer (decodes the new tokens for the stop-word check).
        inputs: ``input_ids`` (the prompt) or ``inputs_embeds``, with ``attention_mask``
            (all ones when missing).
        config: the generation settings (see :func:`generation_config`).
        stop_words: generation ends once the new text ends with one of them (it is kept).
        streamer: an HF streamer (e.g. ``TextStreamer``) that prints tokens as they come.

    Returns:
        The generated ids, the prompt excluded.
    """
    inputs = dict(inputs)
    key = "input_ids" if "input_ids" in inputs else "inputs_embeds"
    inputs.setdefault("attention_mask", torch.ones(inputs[key].shape[:2], dtype=torch.long))
    inputs["attention_mask"] = inputs["attention_mask"].to(inputs[key].device)
    # Generation from embeddings returns the new tokens only; from ids, the prompt too.
    prompt_len = inputs["input_ids"].shape[1] if key == "input_ids" else 0
    criteria = StoppingCriteriaList(
        StopWordStoppingCriteria(tokenizer, word, prompt_len) for word in stop_words
    )
    out = llm.generate(
        **inputs, generation_config=config, stopping_criteria=criteria, streamer=streamer
    )
    return out[0, prompt_len:].tolist()


def load_image(path: str, image_processor) -> torch.Tensor:
    """An image file as the model's ``pixel_values`` of one image (padded to a square with the
    processor's mean colour, as XTuner 0.x does)."""
    from PIL import Image

    from xtuner.dataset.llava import expand2square

    mean = tuple(int(x * 255) for x in image_processor.image_mean)
    with Image.open(path) as image:
        image = expand2square(image.convert("RGB"), mean)
    return image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def image_prompt_inputs(model, tokenizer, prompt: str, pixel_values: torch.Tensor) -> dict:
    """``inputs_embeds`` and ``attention_mask`` of a prompt with ``<image>`` replaced by the
    image features of a multimodal model (``LLaVAModel.prepare_inputs``)."""
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += tokenizer.encode(chunk, add_special_tokens=i == 0)
    device = pixel_values.device
    data = {"input_ids": torch.tensor([ids], device=device), "pixel_values": pixel_values}
    inputs, _ = model.prepare_inputs(data)
    return {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"]}


@contextmanager
def keep_4bit_weights_trainable(model: torch.nn.Module):
    """Generation without repacking bitsandbytes 4-bit weights for the CPU inference kernel.

    bitsandbytes >= 0.48 repacks a ``Linear4bit`` weight for a faster CPU kernel the first
    time it runs in eval mode without grad; that layout has no backward, so gradients of
    later training steps through those layers would be wrong. The repack is switched off
    during generation, and any weight already repacked is converted back afterwards.
    """
    saved = []
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            saved.append((module, module.support_avx512bf16_for_cpu))
            module.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for module, flag in saved:
            module.support_avx512bf16_for_cpu = flag
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    weight.data, state
                )


@HOOKS.register_module()
class EvaluateChatHook(Hook):
    """Logs the model's answers to ``evaluation_inputs`` (same arguments as XTuner 0.x).

    With ``evaluation_images`` (one local image file for every input, or one per input) and a
    multimodal model (``LLaVAModel``), each prompt gets ``<image>`` in front (unless it has
    one) and the image is processed with ``image_processor`` (padded to a square with its
    mean colour, as XTuner 0.x does). An image that cannot be read (e.g. a URL on an offline
    machine) is reported once and the inputs are asked without it.
    """

    priority = "LOW"

    def __init__(
        self,
        tokenizer,
        evaluation_inputs,
        evaluation_images=None,
        image_processor=None,
        system: str = "",
        prompt_template=None,
        every_n_iters: int | None = None,
        max_new_tokens: int = 600,
        stop_word: str | None = None,
        stop_words: list[str] | None = None,
        generation_kwargs: dict | None = None,
    ):
        if isinstance(evaluation_inputs, str):
            evaluation_inputs = [evaluation_inputs]
        self.evaluation_inputs = list(evaluation_inputs)
        if isinstance(evaluation_images, str):
            evaluation_images = [evaluation_images]
        self.evaluation_images = list(evaluation_images or [])
        if len(self.evaluation_images) not in (0, 1, len(self.evaluation_inputs)):
            raise ValueError(
                f"EvaluateChatHook: {len(self.evaluation_images)} evaluation_images for "
                f"{len(self.evaluation_inputs)} evaluation_inputs; give one, or one per input"
            )
        if isinstance(image_processor, dict):
            image_processor = BUILDER.build(image_processor)
        self.image_processor = image_processor
        self._pixel_values: list[torch.Tensor] | None = None
        self.tokenizer = BUILDER.build(tokenizer) if isinstance(tokenizer, dict) else tokenizer
        self.every_n_iters = every_n_iters
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.template = prompt_template = (
            None if prompt_template is None else get_template(prompt_template)
        )
        self.stop_words = list(stop_words or [])
        if stop_word is not None:
            self.stop_words.append(stop_word)
        if prompt_template is not None:
            self.stop_words += list(prompt_template.get("STOP_WORDS", []))
        self.generation_kwargs = dict(generation_kwargs or {})
        #: the last answers generated, one per evaluation input (read by the demo and tests)
        self.last_outputs: list[str] = []

    def build_prompt(self, text: str) -> str:
        if self.template is None:
            return text
        prompt = self.template["INSTRUCTION"].format(input=text, round=1)
        if self.system:
            prompt = self.template["SYSTEM"].format(system=self.system) + prompt
        return prompt

    def _load_images(self) -> list[torch.Tensor]:
        """The processed evaluation images, one per input (empty when unusable)."""
        if self._pixel_values is not None:
            return self._pixel_values
        self._pixel_values = []
        if not self.evaluation_images or self.image_processor is None:
            return self._pixel_values
        loaded = []
        for path in self.evaluation_images:
            try:
                loaded.append(load_image(path, self.image_processor))
            except (OSError, ValueError) as e:
                print_log(
                    f"EvaluateChatHook: cannot read evaluation image {path!r} ({e}); the "
                    "inputs are asked without images",
                    "current",
                    level=30,
                )
                return self._pixel_values
        self._pixel_values = loaded * (len(self.evaluation_inputs) if len(loaded) == 1 else 1)
        return self._pixel_values

    @torch.no_grad()
    def generate(self, model) -> list[str]:
        llm = model.llm
        device = next(llm.parameters()).device
        was_training = llm.training
        use_cache = llm.config.use_cache
        llm.eval()
        llm.config.use_cache = True
        config = generation_config(self.tokenizer, self.max_new_tokens, **self.generation_kwargs)
        images = self._load_images() if hasattr(model, "prepare_inputs") else []
        outputs = []
        try:
            with keep_4bit_weights_trainable(llm):
                for i, text in enumerate(self.evaluation_inputs):
                    if images:
                        if DEFAULT_IMAGE_TOKEN not in text:
                            text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
                        pixel_values = images[i][None].to(device)
                        inputs = image_prompt_inputs(
                            model, self.tokenizer, self.build_prompt(text), pixel_values
                        )
                    else:
                        ids = self.tokenizer(self.build_prompt(text), return_tensors="pt").input_ids
                        inputs = {"input_ids": ids.to(device)}
                    new_ids = generate_reply(llm, self.tokenizer, inputs, config, self.stop_words)
                    outputs.append(self.tokenizer.decode(new_ids, skip_special_tokens=False))
        finally:
            llm.config.use_cache = use_cache
            llm.train(was_training)
        return outputs

    def _log(self, runner, when: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.last_outputs = self.generate(model)
        for text, answer in zip(self.evaluation_inputs, self.last_outputs):
            print_log(f"[chat {when}] {text!r} -> {answer!r}", "current")

    def before_train(self, runner) -> None:
        self._log(runner, "before training")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.every_n_iters is None or (batch_idx + 1) % self.every_n_iters:
            return
        self._log(runner, f"after iter {batch_idx + 1}")

    def after_train(self, runner) -> None:
        self._log(runner, "after training")
