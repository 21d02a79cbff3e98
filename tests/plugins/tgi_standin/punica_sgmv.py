"""STAND-IN, not TGI: a pure-torch re-creation of the `punica_sgmv` kernel module's API.

From plugins/chameleon_tgi/TGI_INTERNALS.md. TGI 3.3.x loads `kernels-community/punica-sgmv` through
`utils/kernels.load_kernel`, which first tries a local module named `punica_sgmv` (TGI_INTERNALS.md,
section 5, design 3). This file is that local module for CPU tests: the rank rules (`pad_rank`,
`orient_for_rank`, `use_cutlass_shrink`, the constants) as TGI_INTERNALS.md states them, and SGMV/BGMV as
loops with the documented semantics and weight orientations (section 4: A [L, in, r] for r < 16,
[L, r, in] for 16..128; B [L, r, out]; decode uses the transposed stacks). Real kernels dereference raw
`data_ptr()` values; here `remember()` (called by the stand-in's BatchLoraWeights.load) keeps a
pointer -> tensor table so the loops can do the same lookups, including TGI's decode indexing of the
per-rank pointer subset by the global segment number (risk 4).
"""

from __future__ import annotations

import torch

MIN_SGMV_RANK = 8
MIN_RANK_CUSTOM = 16
MAX_RANK_CUSTOM = 128
SGMV_BLOCK_SIZE = 16
BGMV_MAX_RANK = 128

_TENSORS: dict[int, torch.Tensor] = {}


def remember(t: torch.Tensor) -> int:
    """Stand-in only: record `t` under its data pointer so the loops below can dereference it."""
    _TENSORS[t.data_ptr()] = t
    return t.data_ptr()


def _deref(ptr: int) -> torch.Tensor:
    if ptr not in _TENSORS:
        raise RuntimeError(f"stand-in kernel: pointer {ptr:#x} does not point at a known adapter stack")
    return _TENSORS[ptr]


def pad_rank(t: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """Zero-pad the rank dim: to 8·world_size when at or below it, else to the next multiple of 16."""
    current = t.size(dim)
    floor = MIN_SGMV_RANK * world_size
    target = (
        floor if current <= floor else ((current + SGMV_BLOCK_SIZE - 1) // SGMV_BLOCK_SIZE) * SGMV_BLOCK_SIZE
    )
    if target == current:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = target - current
    return torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype, device=t.device)], dim=dim)


def use_cutlass_shrink(lora_rank: int) -> bool:
    return lora_rank < MIN_RANK_CUSTOM


def orient_for_rank(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.transpose(0, 1) if MIN_RANK_CUSTOM <= rank <= MAX_RANK_CUSTOM else t


def get_tmp_tensors(
    nsegments: int, lora_rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    tmp = torch.empty(0, dtype=torch.uint8, device=device)  # scratch space the loops do not need
    return tmp, tmp


def _shrink_weight(stack: torch.Tensor, layer_idx: int, rank: int) -> torch.Tensor:
    """A of one layer as [in, r], whichever way the stack is oriented for this rank."""
    w = stack[layer_idx]
    return w if use_cutlass_shrink(rank) else w.transpose(0, 1)


def lora_a_sgmv_cutlass(x, tmp, wa_ptr, s_start, s_end, layer_idx: int, lora_rank: int) -> torch.Tensor:
    v = torch.zeros((x.size(0), lora_rank), dtype=x.dtype, device=x.device)
    for ptr, start, end in zip(wa_ptr.tolist(), s_start.tolist(), s_end.tolist(), strict=True):
        v[start:end] = x[start:end] @ _shrink_weight(_deref(ptr), layer_idx, lora_rank)
    return v


def lora_b_sgmv_cutlass(y, v, tmp, wb_ptr, s_start, s_end, layer_idx: int) -> None:
    for ptr, start, end in zip(wb_ptr.tolist(), s_start.tolist(), s_end.tolist(), strict=True):
        y[start:end] += v[start:end] @ _deref(ptr)[layer_idx]  # B stack [L, r, out]


def add_lora_a_bgmv(v, x, wa_t_ptr, indices, layer_idx: int) -> None:
    """v[i] += x[i] @ A_t[indices[i]][layer].T; A_t stacks are [L, r, in]; index -1 skips the row."""
    for row, index in enumerate(indices.tolist()):
        if index >= 0:
            v[row] += x[row] @ _deref(int(wa_t_ptr[index]))[layer_idx].transpose(0, 1)


def add_lora_b_bgmv(y, v, wb_t_ptr, indices, layer_idx: int) -> None:
    """y[i] += v[i] @ B_t[indices[i]][layer].T; B_t stacks are [L, out, r]."""
    for row, index in enumerate(indices.tolist()):
        if index >= 0:
            y[row] += v[row] @ _deref(int(wb_t_ptr[index]))[layer_idx].transpose(0, 1)
