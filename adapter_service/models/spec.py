"""What a hyper-network is made for: the base model's fingerprint and its target modules.

Works on any transformers causal LM, including one built on the meta device from a config alone,
so artifacts can be made for a model whose weights are not on this machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adapter_service.core.artifact import Fingerprint


@dataclass(frozen=True)
class TargetModule:
    name: str
    d_in: int
    d_out: int


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (GPT-2's, weight stored [d_in, d_out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


def find_targets(model: nn.Module, patterns: Sequence[str]) -> list[TargetModule]:
    """Modules matching any pattern: a name's last part ("q_proj") or a glob on the full name.

    Raises ValueError naming the patterns that matched nothing, so a typo is never silent.
    """
    if not patterns:
        raise ValueError("targets: expected at least one module name pattern, e.g. q_proj,v_proj")
    found: list[TargetModule] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None:
            continue
        hits = [p for p in patterns if name.rsplit(".", 1)[-1] == p or fnmatch.fnmatchcase(name, p)]
        if hits:
            used.update(hits)
            found.append(TargetModule(name, *shape))
    missing = [p for p in patterns if p not in used]
    if missing:
        raise ValueError(
            f"targets: {missing} matched no nn.Linear or Conv1D module; expected a module name such as "
            f"{_examples(model)}"
        )
    return found


def group_targets(targets: Iterable[TargetModule]) -> dict[str, list[TargetModule]]:
    """Group by module type and shape (one hyper-network head per group), in model order."""
    by_key: dict[tuple[str, int, int], list[TargetModule]] = {}
    for t in targets:
        by_key.setdefault((t.name.rsplit(".", 1)[-1], t.d_in, t.d_out), []).append(t)
    names = [key[0] for key in by_key]
    groups = {}
    for (short, d_in, d_out), members in by_key.items():
        name = short if names.count(short) == 1 else f"{short}_{d_in}x{d_out}"
        groups[name] = members
    return groups


def fingerprint(model: nn.Module, hash_weights: bool = True) -> Fingerprint:
    """Identify the base model; hashes the input embeddings when real weights are present (and asked)."""
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    embedding = model.get_input_embeddings().weight
    hashed = not embedding.is_meta and hash_weights
    return Fingerprint(
        architecture=architectures[0],
        hidden_size=int(_first_attr(config, "hidden_size", "n_embd", "d_model")),
        vocab_size=int(config.vocab_size),
        num_layers=int(_first_attr(config, "num_hidden_layers", "n_layer", "num_layers")),
        weights_sha256=embedding_sha256(embedding) if hashed else "",
        weights_sha256_by_dtype=embedding_sha256_by_dtype(embedding) if hashed else {},
    )


def embedding_sha256(weight: torch.Tensor) -> str:
    """sha256 of the embedding table as contiguous little-endian float32."""
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


_LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def embedding_sha256_by_dtype(weight: torch.Tensor) -> dict[str, str]:
    """The table's hash as a model loaded in bf16 or fp16 from these weights holds it (rounded, then
    upcast): what lets a server running in half precision match an artifact made in float32."""
    if weight.dtype not in (torch.float32, torch.float64):
        return {}  # already rounded: lower dtypes cannot be derived exactly from it
    return {name: embedding_sha256(weight.detach().to(dtype)) for name, dtype in _LOW_PRECISION.items()}


def weights_problem(weight: torch.Tensor, want: Fingerprint) -> str | None:
    """None when the embedding table `weight` (rows beyond the vocabulary already cut) is the one the
    fingerprint was made from, in its own dtype or rounded to a lower one; else why not."""
    if not want.weights_sha256:
        return None
    actual = embedding_sha256(weight)
    dtype = str(weight.dtype).removeprefix("torch.")
    if want.accepts_weights(actual, dtype):
        return None
    hint = (
        "this artifact predates half-precision fingerprints: re-export it, or turn the weights check off"
        if dtype in _LOW_PRECISION and dtype not in want.weights_sha256_by_dtype
        else "different weights"
    )
    return (
        f"base_model.weights_sha256: the {dtype} embeddings hash to {actual}, the artifact expects "
        f"{want.weights_sha256} (float32)"
        + "".join(f" or {h} ({d})" for d, h in sorted(want.weights_sha256_by_dtype.items()))
        + f": {hint}"
    )


def _first_attr(config: object, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"model config has none of {names}")


def _examples(model: nn.Module) -> list[str]:
    shorts = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if linear_shape(module) is not None and short not in shorts:
            shorts.append(short)
    return shorts[:12]


# Default targets ----------------------------------------------------------------------------------

# The study's recipe (docs/research/adaptation.md): q_proj and v_proj of decoder layers 0-3 of SmolLM2's 30.
DEFAULT_LAYER_SHARE = (4, 30)
# Attention projections by the short names transformers gives them: separate query and value
# projections (the study's recipe) where the model has them, else its fused query-key-value projection
# (GPT-2 and StarCoder `c_attn`, NeoX, Bloom and Falcon `query_key_value`, Phi-3 `qkv_proj`, MPT and
# DBRX `Wqkv`, Baichuan `W_pack`, InternLM2 `wqkv`).
QUERY_VALUE_NAMES = (("q_proj", "v_proj"), ("query", "value"))
FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "wqkv")


def default_layer_count(num_layers: int) -> int:
    """How many early decoder layers the default adapts: the study's share, 4 of 30, rounded up.

    A share rather than a fixed 4: the study found early layers pay most because their inputs do not
    yet carry the document's domain, which is a matter of relative depth. 30 layers give exactly the
    study's 0-3; 24 or 28 give 4; 32 give 5; 12 (GPT-2) give 2; a tiny 2-layer model gives 1.
    """
    share, of = DEFAULT_LAYER_SHARE
    return max(1, -(-num_layers * share // of))


def default_targets(model: nn.Module) -> list[str]:
    """Module names (or globs) to adapt when none are given: the attention query and value projections
    (or the fused qkv projection) of the model's early decoder layers, in the model's own naming.

    The decoder layers are the ModuleList of blocks holding attention projections (`model.layers`,
    `transformer.h`, `gpt_neox.layers`, ...). The first `default_layer_count(len(layers))` layers with
    attention are taken (a hybrid model's attention-free blocks are skipped). Layers 0..n-1 of one
    shape come back as globs, e.g. SmolLM2 (30 layers) gives exactly the study's
    `model.layers.[0-3].self_attn.q_proj` and `model.layers.[0-3].self_attn.v_proj`; otherwise
    every module is named. Raises ValueError saying what to pass as --targets when it cannot tell.
    """
    layers_name, layers = _decoder_layers(model)
    with_attention = [(index, _attention_projections(block)) for index, block in enumerate(layers)]
    with_attention = [(index, found) for index, found in with_attention if found]
    chosen = with_attention[: default_layer_count(len(layers))]
    indices = [index for index, _ in chosen]
    shapes = {tuple(found) for _, found in chosen}
    if len(shapes) == 1 and indices == list(range(len(indices))) and len(indices) <= 10:
        layer = "0" if len(indices) == 1 else f"[0-{len(indices) - 1}]"
        return [f"{layers_name}.{layer}.{path}" for path in chosen[0][1]]
    return [f"{layers_name}.{index}.{path}" for index, found in chosen for path in found]


def _attention_projections(block: nn.Module) -> list[str]:
    """Paths inside one decoder block of its query and value projections, or of its fused qkv one.

    Where a name occurs twice (a decoder block with cross-attention too), the first, the
    self-attention in every transformers model, is taken."""
    linear = [
        (name, name.rsplit(".", 1)[-1])
        for name, module in block.named_modules()
        if name and linear_shape(module) is not None
    ]

    def first(short: str) -> str | None:
        return next((name for name, s in linear if s == short), None)

    for query, value in QUERY_VALUE_NAMES:
        pair = [first(query), first(value)]
        if all(pair):
            return pair
    for fused in FUSED_QKV_NAMES:
        found = first(fused)
        if found:
            return [found]
    return []


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the outermost list whose blocks hold attention projections,
    preferring, where there are several (a vision tower's), the one as long as the config's layers."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and any(_attention_projections(block) for block in module)
    ]
    candidates = [
        (name, module)
        for name, module in candidates
        if not any(name.startswith(f"{other}.") for other, _ in candidates if other)
    ]
    if len(candidates) > 1:
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            expected = int(_first_attr(text_config, "num_hidden_layers", "n_layer", "num_layers"))
        except ValueError:
            expected = None
        matching = [(name, module) for name, module in candidates if len(module) == expected]
        if len(matching) == 1:
            candidates = matching
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        where = ", ".join(f"{name} ({len(module)} blocks)" for name, module in candidates)
        reason = f"several lists of decoder blocks ({where})"
    else:
        known = [*(f"{q}/{v}" for q, v in QUERY_VALUE_NAMES), *FUSED_QKV_NAMES]
        reason = f"no list of decoder blocks with attention projections named {', '.join(known)}"
    raise ValueError(_no_default_targets(model, reason))


def _no_default_targets(model: nn.Module, reason: str) -> str:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    shorts = _examples(model)
    example = ",".join(shorts[:2]) if shorts else "NAME"
    return (
        f"targets: cannot choose default targets for {architectures[0]}: {reason}. Pass --targets with "
        f"the module names or globs to adapt, e.g. --targets {example}; its nn.Linear/Conv1D modules are "
        f"{shorts}"
    )
