"""A tiny remote-code ChatGLM checkpoint, as THUDM's ChatGLM2/3 and GLM-4 folders ship it.

The code written into the folder keeps the interface the fork relies on and the two traits
that make ChatGLM different from transformers' own families (XTuner 0.x has 49 ChatGLM
configs): the head is ``transformer.output_layer`` (``get_output_embeddings()`` is None:
there is no ``lm_head``), and ChatGLM2/3's backbone returns **sequence-first** hidden states
``[S, B, H]`` (its ``Embedding`` transposes; the causal LM transposes the logits back).
``batch_first=True`` in the config gives GLM-4's layout (no transposes) with the same
``model_type``. The causal LM's own loss is ChatGLM's: float32 cross-entropy over the shifted
labels, mean over the targets. Attention is causal over the whole row and ignores where
packed documents start (so ``use_varlen_attn=True`` must be refused), and the layers support
gradient checkpointing the way the remote code does (``self.gradient_checkpointing``).
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from tests.model.remote_code import write_remote_code

CONFIG_CODE = """
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    # transformers 5's generation reads num_hidden_layers (the EvaluateChatHook generates).
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(self, num_layers=2, padded_vocab_size=64, hidden_size=32, ffn_hidden_size=48,
                 kv_channels=8, num_attention_heads=4, seq_length=256, layernorm_epsilon=1e-5,
                 add_qkv_bias=True, batch_first=False, initializer_range=0.3, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.add_qkv_bias = add_qkv_bias
        self.batch_first = batch_first
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
"""

MODEL_CODE = """
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.dim = config.num_attention_heads, config.kv_channels
        width = self.heads * self.dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * width, bias=config.add_qkv_bias)
        self.dense = nn.Linear(width, config.hidden_size, bias=False)
        self.batch_first = config.batch_first

    def forward(self, hidden, rope, mask):
        if not self.batch_first:  # [s, b, h] -> [b, s, h]
            hidden = hidden.transpose(0, 1)
        b, s, _ = hidden.shape
        q, k, v = self.query_key_value(hidden).view(b, s, 3, self.heads, self.dim).unbind(2)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.dense(out.transpose(1, 2).reshape(b, s, -1))
        return out if self.batch_first else out.transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, rope, mask):
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), rope, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, hidden, rope, mask):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = torch.utils.checkpoint.checkpoint(
                    layer, hidden, rope, mask, use_reentrant=False
                )
            else:
                hidden = layer(hidden, rope, mask)
        return self.final_layernorm(hidden)


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.batch_first = config.batch_first

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        # ChatGLM2/3 run [s, b, h] from here on; GLM-4 stays [b, s, h].
        return embeddings if self.batch_first else embeddings.transpose(0, 1).contiguous()


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids, position_ids=None, attention_mask=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        b, s = input_ids.shape
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        dim = self.config.kv_channels
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=input_ids.device) / dim))
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # [b, s, 1, d]
        rope = (angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype))
        mask = None
        if attention_mask is not None and not attention_mask.all():
            causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]
        hidden = self.encoder(inputs_embeds, rope, mask)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, position_ids=None, attention_mask=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                return_last_logit=False, **kwargs):
        out = self.transformer(input_ids=input_ids, position_ids=position_ids,
                               attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        hidden = out.last_hidden_state
        logits = self.transformer.output_layer(hidden)
        if not self.config.batch_first:
            logits = logits.transpose(0, 1).contiguous()
        loss = None
        if labels is not None:
            logits = logits.to(torch.float32)
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss(ignore_index=-100)(
                shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)
            )
            logits = logits.to(hidden.dtype)
            loss = loss.to(hidden.dtype)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
"""


def build_chatglm(folder: str, tokenizer_path: str, batch_first: bool = False) -> str:
    """A random tiny remote-code ChatGLM checkpoint (code, config.json, weights, tokenizer):
    ChatGLM2/3's sequence-first layout, or GLM-4's with ``batch_first=True``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        # ChatGLM pads its vocabulary past the tokenizer's (65024 for 64794 tokens).
        "padded_vocab_size": -(-len(tokenizer) // 64) * 64 + 64,
        "batch_first": batch_first,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    code = {"configuration_chatglm.py": CONFIG_CODE, "modeling_chatglm.py": MODEL_CODE}
    write_remote_code(folder, code, config)
    torch.manual_seed(0)
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
