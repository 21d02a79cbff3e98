"""Pure tensor conversions: Chameleon's per-module factors -> the per-layer-type lists TGI's LoraWeights take.

TGI (TGI_INTERNALS.md, section 4) wants, for one adapter and one layer type (q_proj, v_proj, ...), a list
over all L decoder layers of A^T [in, r'] and s B^T [r', out]: transposed, the scale folded into B (TGI's
kernels run with scale 1.0), and the rank zero-padded by `pad_rank` to r' (8·world_size when r is at or
below that, otherwise up to a multiple of 16). A layer the artifact does not target gets zeros, because
LoraWeights needs every layer. The transpose-and-scale step is `chameleon_torch.layer.lora_factors`, the one
chameleon_torch applies itself, so both plugins compute the same delta; padding only adds zero columns of A
and zero rows of B, so x A' B' = x A B.

No TGI import here: everything is plain torch, tested on CPU against chameleon_torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from chameleon_torch.layer import lora_factors

MIN_SGMV_RANK = 8  # pad_rank's floor, per shard
SGMV_BLOCK_SIZE = 16  # above the floor, ranks go up to a multiple of this

# The layer types TGI's loader knows (TGI_INTERNALS.md, section 3), in its order. No lm_head.
TGI_LAYER_TYPES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "c_proj",
    "c_fc",
)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?([A-Za-z0-9_]+)$")


def padded_rank(rank: int, world_size: int = 1) -> int:
    """The rank TGI's pad_rank produces for `rank` (TGI_INTERNALS.md, section 4)."""
    if rank < 1 or world_size < 1:
        raise ValueError(f"rank and world_size must be >= 1, got {rank} and {world_size}")
    floor = MIN_SGMV_RANK * world_size
    if rank <= floor:
        return floor
    return -(-rank // SGMV_BLOCK_SIZE) * SGMV_BLOCK_SIZE


def pad_rank(t: torch.Tensor, dim: int, world_size: int = 1) -> torch.Tensor:
    """Zero-pad dimension `dim` (the rank) of a 2-D factor up to `padded_rank`."""
    target = padded_rank(t.shape[dim], world_size)
    if target == t.shape[dim]:
        return t
    shape = list(t.shape)
    shape[dim] = target - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def tgi_factors(
    a: torch.Tensor, b: torch.Tensor, scaling: float, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], s) -> (A^T [in, r'], s B^T [r', out]), contiguous, as TGI's prepare_weights."""
    a_t, b_t = lora_factors(a, b, scaling)
    return (
        pad_rank(a_t, dim=1, world_size=world_size).contiguous(),
        pad_rank(b_t, dim=0, world_size=world_size).contiguous(),
    )


def split_target(name: str) -> tuple[int, str]:
    """ "model.layers.3.self_attn.q_proj" -> (3, "q_proj"); ValueError when TGI has no such layer type."""
    match = _LAYER.search(name)
    if match is None or match.group(2) not in TGI_LAYER_TYPES:
        raise ValueError(
            f"target {name!r}: TGI applies LoRA only to decoder-layer modules named "
            f"{', '.join(TGI_LAYER_TYPES)}"
        )
    return int(match.group(1)), match.group(2)


@dataclass(frozen=True)
class LayerTypeShape:
    """What one layer type needs: its per-layer input and output widths and which layers are targeted."""

    layer_type: str
    d_in: int
    d_out: int
    layers: frozenset[int]


def plan_layer_types(targets: Iterable[tuple[str, int, int]], num_layers: int) -> dict[str, LayerTypeShape]:
    """Group a manifest's (module, d_in, d_out) targets by TGI layer type; ValueError on what TGI refuses."""
    found: dict[str, tuple[int, int, set[int]]] = {}
    for name, d_in, d_out in targets:
        layer, layer_type = split_target(name)
        if not 0 <= layer < num_layers:
            raise ValueError(f"target {name!r}: layer {layer} outside 0..{num_layers - 1}")
        shape = found.setdefault(layer_type, (d_in, d_out, set()))
        if (shape[0], shape[1]) != (d_in, d_out):
            raise ValueError(
                f"target {name!r}: (d_in, d_out) = {(d_in, d_out)}, but other {layer_type} targets have "
                f"{(shape[0], shape[1])}; TGI stacks one shape per layer type"
            )
        shape[2].add(layer)
    return {
        lt: LayerTypeShape(lt, d_in, d_out, frozenset(layers)) for lt, (d_in, d_out, layers) in found.items()
    }


def layer_type_lists(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    plan: Mapping[str, LayerTypeShape],
    num_layers: int,
    scaling: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    world_size: int = 1,
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """One cluster's {module: (A [r, in], B [out, r])} -> {layer type: ([A^T] * L, [s B^T] * L)}.

    Tensors are moved to `device`/`dtype` before the scale is folded in (as chameleon_torch does), and
    layers the artifact does not target get zero factors of the same padded shape.
    """
    by_key: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in modules.items():
        layer, layer_type = split_target(name)
        by_key[(layer_type, layer)] = tgi_factors(
            a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), scaling, world_size
        )
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for layer_type, shape in plan.items():
        missing = sorted(shape.layers - {layer for lt, layer in by_key if lt == layer_type})
        if missing:
            raise ValueError(f"{layer_type}: no factors for targeted layers {missing}")
        weights_a, weights_b = [], []
        for layer in range(num_layers):
            pair = by_key.get((layer_type, layer))
            if pair is None:
                rank = next(a.shape[1] for (lt, _), (a, _) in by_key.items() if lt == layer_type)
                pair = zero_factors(shape.d_in, shape.d_out, rank, device=device, dtype=dtype)
            weights_a.append(pair[0])
            weights_b.append(pair[1])
        out[layer_type] = (weights_a, weights_b)
    return out


def zero_factors(
    d_in: int,
    d_out: int,
    rank: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T [in, r] and B^T [r, out] of zeros: a delta of exactly 0, in the shape of a real adapter."""
    return (
        torch.zeros(d_in, rank, device=device, dtype=dtype),
        torch.zeros(rank, d_out, device=device, dtype=dtype),
    )


def identity_lists(
    plan: Mapping[str, LayerTypeShape],
    num_layers: int,
    rank: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    world_size: int = 1,
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The zero "identity" adapter at the padded rank of the real ones (TGI_INTERNALS.md, risk 4)."""
    r = padded_rank(rank, world_size)
    out = {}
    for layer_type, shape in plan.items():
        pairs = [
            zero_factors(shape.d_in, shape.d_out, r, device=device, dtype=dtype) for _ in range(num_layers)
        ]
        out[layer_type] = ([a for a, _ in pairs], [b for _, b in pairs])
    return out
