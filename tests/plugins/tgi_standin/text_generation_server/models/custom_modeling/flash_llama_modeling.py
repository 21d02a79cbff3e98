"""STAND-IN, not TGI (see text_generation_server/__init__.py): `flash_llama_modeling.py`, a tiny Llama.

Same module tree as TGI's where the plugin and the loader look: `FlashLlamaForCausalLM.embed_tokens` (a
TensorParallelEmbedding, whose weight carries one extra zero row), `.model.layers[i].self_attn.
query_key_value` (a TensorParallelMultiAdapterLinear over fused q/k/v with `layer_names` and `sizes`),
`.self_attn.o_proj` and `.mlp.down_proj` (TensorParallelAdapterRowLinear), `.mlp.gate_up_proj`; base
layers expose `.linear.weight`. Tokens of all requests are flattened ([tokens, hidden]) as in TGI, so the
LoRA layers see one row per token. Attention keeps a plain per-request K/V list (TGI pages it). The math
is Llama's (RMSNorm, rotary, GQA, SiLU MLP), so outputs can be compared with transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import torch
from torch import nn

from text_generation_server.layers.lora import (
    TensorParallelAdapterRowLinear,
    TensorParallelMultiAdapterLinear,
)


class FastLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TensorParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.cat([weight, weight.new_zeros(1, weight.shape[1])]), requires_grad=False
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class FlashLlamaAttention(nn.Module):
    def __init__(self, config, sd: dict, prefix: str, layer_id: int, process_group) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        sizes = [
            self.head_size * self.num_heads,
            self.head_size * self.num_kv_heads,
            self.head_size * self.num_kv_heads,
        ]
        fused = torch.cat([sd[f"{prefix}.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        self.query_key_value = TensorParallelMultiAdapterLinear.load(
            FastLinear(fused), layer_id, ["q_proj", "k_proj", "v_proj"], sizes, process_group
        )
        self.o_proj = TensorParallelAdapterRowLinear.load(
            FastLinear(sd[f"{prefix}.o_proj.weight"]), layer_id, "o_proj", process_group
        )
        self.sizes = sizes
        theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
        self.inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_size, 2, dtype=torch.int64).float() / self.head_size)
        )

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None, :].to(x.dtype), emb.sin()[:, None, :].to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(self, hidden, position_ids, seqlens, kv_layer, adapter_data) -> torch.Tensor:
        qkv = self.query_key_value(hidden, adapter_data)
        q, k, v = qkv.split(self.sizes, dim=1)
        q = self._rotary(q.view(-1, self.num_heads, self.head_size), position_ids)
        k = self._rotary(k.view(-1, self.num_kv_heads, self.head_size), position_ids)
        v = v.view(-1, self.num_kv_heads, self.head_size)
        outputs, start = [], 0
        for i, length in enumerate(seqlens):
            past_k, past_v = kv_layer[i]
            keys = torch.cat([past_k, k[start : start + length]])
            values = torch.cat([past_v, v[start : start + length]])
            kv_layer[i] = (keys, values)
            outputs.append(self._attend(q[start : start + length], keys, values))
            start += length
        return self.o_proj(torch.cat(outputs), adapter_data)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        past = keys.shape[0] - q.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, keys) * self.head_size**-0.5
        allowed = torch.arange(keys.shape[0])[None, :] <= (past + torch.arange(q.shape[0]))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("hqk,khd->qhd", probs, values).reshape(q.shape[0], -1)


class LlamaMLP(nn.Module):
    def __init__(self, config, sd: dict, prefix: str, layer_id: int, process_group) -> None:
        super().__init__()
        size = config.intermediate_size
        fused = torch.cat([sd[f"{prefix}.gate_proj.weight"], sd[f"{prefix}.up_proj.weight"]])
        self.gate_up_proj = TensorParallelMultiAdapterLinear.load(
            FastLinear(fused), layer_id, ["gate_proj", "up_proj"], [size, size], process_group
        )
        self.down_proj = TensorParallelAdapterRowLinear.load(
            FastLinear(sd[f"{prefix}.down_proj.weight"]), layer_id, "down_proj", process_group
        )
        self.size = size

    def forward(self, hidden, adapter_data) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden, adapter_data).view(-1, 2, self.size)
        return self.down_proj(nn.functional.silu(gate_up[:, 0]) * gate_up[:, 1], adapter_data)


class FlashLlamaLayer(nn.Module):
    def __init__(self, config, sd: dict, layer_id: int, process_group) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(sd[f"{prefix}.input_layernorm.weight"], eps)
        self.self_attn = FlashLlamaAttention(config, sd, f"{prefix}.self_attn", layer_id, process_group)
        self.post_attention_layernorm = RMSNorm(sd[f"{prefix}.post_attention_layernorm.weight"], eps)
        self.mlp = LlamaMLP(config, sd, f"{prefix}.mlp", layer_id, process_group)

    def forward(self, hidden, position_ids, seqlens, kv_layer, adapter_data) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            self.input_layernorm(hidden), position_ids, seqlens, kv_layer, adapter_data
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden), adapter_data)


class FlashLlamaModel(nn.Module):
    def __init__(self, config, sd: dict, process_group) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            FlashLlamaLayer(config, sd, i, process_group) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(sd["model.norm.weight"], config.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, seqlens, kv_cache, adapter_data) -> torch.Tensor:
        hidden = inputs_embeds
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, position_ids, seqlens, kv_cache[i], adapter_data)
        return self.norm(hidden)


class FlashLlamaForCausalLM(nn.Module):
    def __init__(self, config, sd: dict, process_group) -> None:
        super().__init__()
        self.embed_tokens = TensorParallelEmbedding(sd["model.embed_tokens.weight"])
        self.model = FlashLlamaModel(config, sd, process_group)
        head = sd["model.embed_tokens.weight"] if config.tie_word_embeddings else sd["lm_head.weight"]
        self.lm_head = FastLinear(head)

    def forward(self, input_ids, position_ids, seqlens, kv_cache, lm_head_indices=None, adapter_data=None):
        hidden = self.model(self.embed_tokens(input_ids), position_ids, seqlens, kv_cache, adapter_data)
        if lm_head_indices is not None:
            hidden = hidden[lm_head_indices]
        return self.lm_head(hidden), None
