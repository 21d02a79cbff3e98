"""STAND-IN, not TGI (see text_generation_server/__init__.py): `utils/adapter.py`.

BASE_MODEL_ADAPTER_ID and build_layer_weight_lookup: (layer index, layer type) -> (weight name, LoRA wrapper
module), with the weight names TGI matches PEFT tensors against ("model.layers.{i}.self_attn.q_proj").
"""

from __future__ import annotations

BASE_MODEL_ADAPTER_ID = "__base_model__"


def get_attn_weights(i, layer) -> dict:
    qkv = layer.self_attn.query_key_value
    weights = {(i, f"{k}_proj"): (f"model.layers.{i}.self_attn.{k}_proj", qkv) for k in "qkv"}
    weights[(i, "qkv_proj")] = (f"model.layers.{i}.self_attn.qkv_proj", qkv)
    weights[(i, "o_proj")] = (f"model.layers.{i}.self_attn.o_proj", layer.self_attn.o_proj)
    return weights


def get_mlp_weights(i, layer) -> dict:
    weights = {}
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        return weights
    if hasattr(mlp, "gate_up_proj"):
        weights[(i, "gate_proj")] = (f"model.layers.{i}.mlp.gate_proj", mlp.gate_up_proj)
        weights[(i, "up_proj")] = (f"model.layers.{i}.mlp.up_proj", mlp.gate_up_proj)
    if hasattr(mlp, "down_proj"):
        weights[(i, "down_proj")] = (f"model.layers.{i}.mlp.down_proj", mlp.down_proj)
    return weights


def build_layer_weight_lookup(model) -> dict:
    inner = model.model
    lookup = {}
    for i, layer in enumerate(inner.layers):
        lookup.update(get_attn_weights(i, layer))
        lookup.update(get_mlp_weights(i, layer))
    return lookup
