"""The per-row multi-LoRA math, attached to target modules as forward hooks.

For a batch with K cluster adapters, each target module holds them stacked:
A_cat = [A_1^T | ... | A_K^T] (d_in x K r) and B_cat = [s B_1^T; ...; s B_K^T] (K r x d_out).
A row in cluster c must only see its own slice, so the batch carries a row mask M (B x K r, ones on
the row's slice, zeros elsewhere, all zeros for a row without adapter), and

    y = W x + ((x A_cat) * M) B_cat  =  W x + s B_c (A_c x)

Two dense matmuls per module and step, no gather, no Python loop over rows or clusters; the extra
work over one static LoRA is K r instead of r columns, which stays small for K <= 8.

A mixture in the compact form (adapter_service/core/compact.py) needs no K at all: every cluster shares A,
and B_c is the bases' B with its columns scaled by the cluster's weights, so the bank holds one (A, B)
and M carries each row's column weights instead of ones: r columns whatever the number of clusters.
Hooks leave the wrapped module untouched, so detaching restores the model bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("chameleon_torch")


@dataclass
class BatchBank:
    """What every hooked module needs for one batch: its stacked factors and the shared row mask."""

    row_mask: torch.Tensor | None  # [B, K r]; None when every row uses the same single adapter
    rows: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A_cat [d_in, K r], B_cat [K r, d_out])

    def mask_for(self, rows: int) -> torch.Tensor | None:
        """generate() may expand the batch (num_return_sequences, beams): repeat each row's mask."""
        if self.row_mask is None or rows == self.rows:
            return self.row_mask
        if rows % self.rows:
            raise RuntimeError(f"batch of {rows} rows cannot be mapped onto the {self.rows} adapted requests")
        self.row_mask = self.row_mask.repeat_interleave(rows // self.rows, dim=0)
        self.rows = rows
        return self.row_mask


def lora_factors(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Chameleon's (A [r, d_in], B [d_out, r], s) -> (A^T [d_in, r], s B^T [r, d_out]), as views/one product.

    The orientation `add_multi_lora` stacks, and the one TGI's LoraWeights take (chameleon_tgi pads the
    rank on top): one definition, so both plugins fold the scale the same way.
    """
    return a.t(), b.t() * scaling


def add_multi_lora(
    output: torch.Tensor,
    x: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    row_mask: torch.Tensor | None,
) -> torch.Tensor:
    """output + ((x A_cat) * M) B_cat for x of shape [B, ..., d_in]; the add is fused into addmm."""
    xa = torch.matmul(x, a_cat)
    if row_mask is not None:
        xa.mul_(row_mask.view(row_mask.shape[0], *([1] * (x.dim() - 2)), row_mask.shape[1]))
    d_out = output.shape[-1]
    return torch.addmm(output.reshape(-1, d_out), xa.reshape(-1, xa.shape[-1]), b_cat).view(output.shape)


class MultiLoRAHook:
    """Forward hook adding the batch's per-row adapter delta to one module's output."""

    def __init__(self, name: str, owner: HookedModel) -> None:
        self.name = name
        self.owner = owner

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        bank = self.owner.bank
        if bank is None:
            return None  # not inside adapt(): the base module's output, untouched
        a_cat, b_cat = bank.factors[self.name]
        x = args[0]
        return add_multi_lora(output, x, a_cat, b_cat, bank.mask_for(x.shape[0]))


class HookedModel:
    """Owns the hooks on a model's target modules and the bank they read."""

    def __init__(self, model: nn.Module, module_names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.bank: BatchBank | None = None
        self._handles = [
            modules[name].register_forward_hook(MultiLoRAHook(name, self)) for name in module_names
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.bank = None
