"""DeepSeek-V2 as XTuner 0.x configs import it (``...deepseek_v2 import DeepseekV2ForCausalLM``)."""

from transformers import DeepseekV2Config

from .modeling_deepseek import DeepseekV2ForCausalLM, load_balancing_loss_func

__all__ = ["DeepseekV2Config", "DeepseekV2ForCausalLM", "load_balancing_loss_func"]
