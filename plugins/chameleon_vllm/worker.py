"""What runs inside vLLM's worker process: statistics, the in-memory adapter store, loading from it.

The engine-core side (engine.py) calls these functions through vLLM's own `collective_rpc`, which
runs a callable with the worker as its first argument; they never run in the engine process. Adapters
reach the worker as numpy arrays in that call and wait in `STORE`; when a request with one of our
`LoRARequest`s is scheduled, vLLM's `WorkerLoRAManager._load_adapter` (wrapped by `load_from_store`)
builds its `LoRAModel` from the store instead of a directory. From there on it is vLLM's adapter:
its LRU cache, its slots, its punica kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from adapter_service.models.spec import embedding_sha256
from adapter_service.models.statistics import prompts_mean_input_embedding

SCHEME = "chameleon://"  # lora_path of the adapters this plugin hands to vLLM

# key -> {module name: (A [r, d_in], scaled B [d_out, r])}, float32. The engine side decides what is
# added and dropped, so the two sides always agree on what is here.
STORE: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def _runner(worker: Any) -> Any:
    return worker.model_runner


def _embedding_weight(model: Any) -> torch.Tensor:
    """The token embedding table (vocabulary padded to vLLM's multiple; callers slice it)."""
    inner = getattr(model, "model", None)
    for holder in (inner, getattr(inner, "model", None)):
        embedding = getattr(holder, "embed_tokens", None)
        if embedding is None:
            continue
        layer = getattr(embedding, "base_layer", embedding)  # an embedding wrapped for LoRA
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    raise ValueError(f"{type(model).__name__}: no model.embed_tokens with a weight")


def describe(
    worker: Any, targets: list[tuple[str, int, int]], hash_weights: bool, weight_norms: bool = False
) -> dict[str, Any]:
    """The served model as the artifact check needs it, and what is wrong with `targets` (as text).

    `weight_norms`: also each target's ||W||_F^2 (`weights_sq`, None where unreadable), for the audit."""
    runner = _runner(worker)
    config = runner.model_config.hf_config.get_text_config()
    vocab = int(config.vocab_size)
    weight = _embedding_weight(runner.model)
    facts = {
        "architecture": (getattr(runner.model_config.hf_config, "architectures", None) or [None])[0],
        "hidden_size": int(config.hidden_size),
        "vocab_size": vocab,
        "num_layers": int(config.num_hidden_layers),
        "embedding_dim": int(weight.shape[1]),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "weights_sha256": embedding_sha256(weight[:vocab]) if hash_weights else "",
        "target_problems": [],
        "weights_sq": {},
    }
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    if manager is None:
        facts["target_problems"].append("LoRA is not enabled in this engine")
        return facts
    needed = set()
    for name, d_in, d_out in targets:
        found = _lora_layer(manager, name)
        if found is None:
            facts["target_problems"].append(_missing_target(manager, name))
            continue
        vllm_name, layer, index = found
        needed.add(vllm_name)
        base = getattr(layer, "base_layer", layer)
        sizes = getattr(base, "output_sizes", None)
        d_out_have = (
            sizes[index] if index is not None and sizes is not None else getattr(base, "output_size", None)
        )
        have = (getattr(base, "input_size", None), d_out_have)
        if weight_norms:
            facts["weights_sq"][name] = _weight_sq(base, sizes, index)
        if None not in have and have != (d_in, d_out):
            facts["target_problems"].append(
                f"target {name!r}: vLLM's layer has (d_in, d_out) = {have}, artifact expects {(d_in, d_out)}"
            )
    facts["needed_modules"] = sorted(needed)  # vLLM's names of the layers the artifact adapts
    facts["wrapped_modules"] = len(manager.modules)  # the layers vLLM computes a LoRA term for
    return facts


def _weight_sq(base: Any, sizes: list[int] | None, index: int | None) -> float | None:
    """||W||_F^2 of a target's rows of vLLM's (possibly packed) weight; None when unreadable or sharded."""
    weight = getattr(base, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel()):
        weight = None
    if weight is None or not weight.is_floating_point():
        weight = _weight_from_outputs(base)
        if weight is None:
            return None
    if index is not None and sizes is not None:
        if weight.shape[0] != sum(sizes):  # a shard under tensor parallelism
            return None
        start = sum(sizes[:index])
        weight = weight[start : start + sizes[index]]
    return float(weight.detach().float().square().sum())


@torch.no_grad()
def _weight_from_outputs(base: Any, chunk: int = 1024) -> torch.Tensor | None:
    """W [d_out, d_in] read back as the layer's outputs on the identity matrix: vLLM's CPU build repacks
    linear weights for oneDNN and leaves `weight` empty, and quantized weights are not W itself."""
    method, d_in = getattr(base, "quant_method", None), getattr(base, "input_size", None)
    dtype = getattr(base, "params_dtype", None) or torch.float32
    if method is None or not d_in:
        return None
    device = next((p.device for p in base.parameters() if p.numel()), torch.device("cpu"))
    try:
        columns = []
        for start in range(0, d_in, chunk):
            eye = torch.eye(d_in, dtype=dtype, device=device)[start : start + chunk]
            columns.append(method.apply(base, eye, bias=None).float())  # rows of W^T
        return torch.cat(columns).t()
    except Exception:  # an unusual layer: the audit goes without this norm
        return None


def _lora_layer(manager: Any, name: str) -> tuple[str, Any, int | None] | None:
    """vLLM's LoRA layer for the Hugging Face module `name`: (its name, the layer, the slice index in
    a packed layer such as qkv_proj, or None)."""
    if name in manager.modules:
        return name, manager.modules[name], None
    prefix, _, leaf = name.rpartition(".")
    for packed, members in manager.packed_modules_mapping.items():
        if leaf in members and f"{prefix}.{packed}" in manager.modules:
            return f"{prefix}.{packed}", manager.modules[f"{prefix}.{packed}"], members.index(leaf)
    return None


def _missing_target(manager: Any, name: str) -> str:
    adaptable = sorted(
        {m for p in manager.supported_lora_modules for m in manager.packed_modules_mapping.get(p, [p])}
    )
    return (
        f"target {name!r}: vLLM applies LoRA to no module of that name (this model adapts "
        f"{', '.join(adaptable)}; if --lora-target-modules is set, it must include this one)"
    )


def statistics(worker: Any, prompts: list[list[int]]) -> np.ndarray:
    """Each prompt's mean input embedding ([N, D] float32) with the shared statistic function."""
    weight = _embedding_weight(_runner(worker).model)
    return prompts_mean_input_embedding(weight, prompts).cpu().numpy()


def update_store(
    worker: Any, put: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], drop: dict[str, int]
) -> int:
    """Add adapters to the store; drop others (key -> lora_int_id) from it and from vLLM's LoRA cache.

    Dropped adapters are ones no request uses any more, so none of them sits in an active slot."""
    manager = _runner(worker).lora_manager
    loaded = manager.list_adapters()
    for key, lora_id in drop.items():
        STORE.pop(key, None)
        if lora_id in loaded:
            manager.remove_adapter(lora_id)
    for key, modules in put.items():  # arrays unpickled from vLLM's message queue are read-only
        STORE[key] = {name: (np.array(a), np.array(b)) for name, (a, b) in modules.items()}
    return len(STORE)


def lora_tensors(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """PEFT's tensor names, which vLLM's LoRAModel parses (and packs q/k/v, gate/up itself)."""
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(a)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(b)
    return tensors


def wrap_load_adapter(original: Any) -> Any:
    """vLLM loads every adapter through `WorkerLoRAManager._load_adapter(lora_request)`; ours come from
    STORE, every other (a static LoRA a client named) from its path, as before."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    @functools.wraps(original)
    def _load_adapter(self: Any, lora_request: Any) -> Any:
        path = lora_request.lora_path
        if not path.startswith(SCHEME):
            return original(self, lora_request)
        modules = STORE[path.removeprefix(SCHEME)]
        rank = next(iter(modules.values()))[0].shape[0]
        peft_helper = PEFTHelper.from_dict(
            {
                "r": rank,
                "lora_alpha": rank,  # the artifact's scaling is folded into B: alpha / r = 1
                "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
            }
        )
        peft_helper.validate_legal(self.lora_config)
        model = self._adapter_manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        return LoRAModel.from_lora_tensors(
            lora_request.lora_int_id,
            lora_tensors(modules),
            peft_helper,
            device="cpu",
            dtype=self.lora_config.lora_dtype,
            model_vocab_size=self.vocab_size,
            weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )

    return _load_adapter


def mask_missing_adapter(original: Any) -> Any:
    """vLLM's torch-op shrink gathers `weights[indices]`, and a row without an adapter has index -1,
    which Python indexing turns into the last slot: such a row got the last slot's adapter. Zeroing
    its shrink output makes its LoRA term exactly zero (the expand then adds B @ 0), as on GPU."""

    @functools.wraps(original)
    def bgmv_shrink(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        scaling: float = 1.0,
    ) -> None:
        original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        missing = lora_indices_tensor < 0
        if bool(missing.any()):
            output_tensor[: missing.shape[0]][missing] = 0

    bgmv_shrink._chameleon_masked = True
    return bgmv_shrink
