"""STAND-IN, not TGI (see text_generation_server/__init__.py): `text_generation_server.models`.

get_model builds the tiny flash Llama from a transformers checkpoint directory; get_model_with_lora_adapters
is, as in TGI, the one place that returns the Model (static LORA_ADAPTERS are not re-created here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from text_generation_server.models.custom_modeling.flash_llama_modeling import FlashLlamaForCausalLM
from text_generation_server.models.flash_causal_lm import FlashCausalLM, ProcessGroup, Tokenizer

__all__ = ["FlashCausalLM", "get_model", "get_model_with_lora_adapters"]


def get_model(
    model_id, lora_adapter_ids, revision, sharded, quantize, speculate, dtype, kv_cache_dtype,
    trust_remote_code, max_input_tokens,
) -> FlashCausalLM:  # fmt: skip
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype or "float32"
    ]
    sd = {k: v.to(torch_dtype) for k, v in load_file(str(Path(model_id) / "model.safetensors")).items()}
    group = ProcessGroup()
    model = FlashLlamaForCausalLM(config, sd, group)
    return FlashCausalLM(model_id, model, config, Tokenizer(), torch_dtype, torch.device("cpu"), group)


def get_model_with_lora_adapters(
    model_id, lora_adapters, revision, sharded, quantize, speculate, dtype, kv_cache_dtype, trust_remote_code,
    max_input_tokens, adapter_to_index,
) -> FlashCausalLM:  # fmt: skip
    if lora_adapters:
        raise NotImplementedError("stand-in: static LORA_ADAPTERS are not re-created")
    return get_model(
        model_id, [], revision, sharded, quantize, speculate, dtype, kv_cache_dtype, trust_remote_code,
        max_input_tokens,
    )  # fmt: skip
