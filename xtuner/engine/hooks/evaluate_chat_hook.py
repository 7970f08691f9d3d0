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


class StopWordStoppingCriteria(StoppingCriteria):
    """Stops when the decoded text of the new tokens ends with a stop word."""

    def __init__(self, tokenizer, stop_word: str, prompt_len: int):
        self.tokenizer = tokenizer
        self.stop_word = stop_word
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :])
        return text.rstrip().endswith(self.stop_word)


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
    """Logs the model's answers to ``evaluation_inputs`` (same arguments as XTuner 0.x)."""

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
        self.evaluation_images = evaluation_images
        self.image_processor = image_processor
        self.tokenizer = BUILDER.build(tokenizer) if isinstance(tokenizer, dict) else tokenizer
        self.every_n_iters = every_n_iters
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.template = prompt_template
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

    @torch.no_grad()
    def generate(self, model) -> list[str]:
        llm = model.llm
        device = next(llm.parameters()).device
        was_training = llm.training
        use_cache = llm.config.use_cache
        llm.eval()
        llm.config.use_cache = True
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad_id,
            **self.generation_kwargs,
        )
        outputs = []
        try:
            with keep_4bit_weights_trainable(llm):
                for text in self.evaluation_inputs:
                    prompt = self.build_prompt(text)
                    ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                    criteria = StoppingCriteriaList(
                        StopWordStoppingCriteria(self.tokenizer, w, ids.shape[1])
                        for w in self.stop_words
                    )
                    out = llm.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        generation_config=config,
                        stopping_criteria=criteria,
                    )
                    outputs.append(
                        self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
                    )
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
