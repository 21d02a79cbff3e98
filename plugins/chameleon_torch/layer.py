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

The drift guard (RowGuard) checks each row at prefill, where every hook has both terms anyway: the base
output W x and the delta s B_c (A_c x). A row whose delta is non-finite, or larger than `max_ratio`
times the base output (Frobenius norms over the row's prompt tokens), gets no delta from then on, in
prefill and every decode step. Flags stay on the device (no host sync per module); the plugin reads
them once per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("chameleon_torch")


GUARD_REASONS = ("non_finite", "delta_ratio")


class RowGuard:
    """Per-row drift guard of one batch (see the module docstring); all state on the model's device."""

    def __init__(
        self,
        rows: int,
        device: torch.device,
        max_ratio: float | None,
        prompt_mask: torch.Tensor | None = None,  # [B, T], nonzero on prompt tokens (attention_mask)
    ) -> None:
        self.max_ratio = max_ratio
        self.keep = torch.ones(rows, dtype=torch.bool, device=device)  # rows still adapted
        self.non_finite = torch.zeros(rows, dtype=torch.bool, device=device)
        self.over = torch.zeros(rows, dtype=torch.bool, device=device)
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(device=device, dtype=torch.bool)
        self.expansion = 1  # rows per request once generate() expanded the batch
        self.checked: set[str] = set()
        self.tripped: bool | None = False  # whether any row is flagged; None: unknown (read at decode)

    def expand(self, n: int) -> None:
        for name in ("keep", "non_finite", "over", "prompt_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.repeat_interleave(n, dim=0))
        self.expansion *= n

    def apply(
        self,
        name: str,
        output: torch.Tensor,
        x: torch.Tensor,
        a_cat: torch.Tensor,
        b_cat: torch.Tensor,
        row_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """output + delta for kept rows. Checks the rows on a module's first call of the batch and on
        every multi-token input (prefill); decode steps take the fused path unless a row was flagged."""
        if name not in self.checked or (x.dim() >= 3 and x.shape[-2] > 1):
            self.checked.add(name)
            delta = lora_delta(x, a_cat, b_cat, row_mask)
            self._judge(output, delta)
            self.tripped = None
        else:
            if self.tripped is None:
                self.tripped = bool((~self.keep).any())  # one host sync per batch, at its first decode
            if not self.tripped:
                return add_multi_lora(output, x, a_cat, b_cat, row_mask)
            delta = lora_delta(x, a_cat, b_cat, row_mask)
        keep = self.keep.view(-1, *([1] * (delta.dim() - 1)))
        return output + torch.where(keep, delta, 0.0)  # where, not a product: inf * 0 is NaN

    def _judge(self, output: torch.Tensor, delta: torch.Tensor) -> None:
        finite = torch.isfinite(delta).all(dim=-1)  # [B, T] (or [B])
        d2 = delta.float().square().sum(dim=-1)
        y2 = output.float().square().sum(dim=-1)
        if finite.dim() == 1:
            finite, d2, y2 = finite[:, None], d2[:, None], y2[:, None]
        prompt = self.prompt_mask
        if prompt is None or prompt.shape != finite.shape[:2]:
            prompt = torch.ones_like(finite)
        finite, d2, y2 = finite.flatten(1), d2.flatten(1), y2.flatten(1)
        prompt = prompt.flatten(1)
        bad = (~finite & prompt).any(dim=1)
        flagged = bad
        if self.max_ratio is not None:
            d2 = torch.where(prompt, d2, 0.0).sum(dim=1)
            y2 = torch.where(prompt, y2, 0.0).sum(dim=1)
            over = d2 > (self.max_ratio**2) * y2
            self.over |= over & ~bad & self.keep
            flagged = bad | over
        self.non_finite |= bad & self.keep
        self.keep &= ~flagged

    def flagged(self) -> dict[int, str]:
        """Request row -> reason, for the rows flagged in this batch (one host sync)."""
        rows: dict[int, str] = {}
        non_finite, over = self.non_finite.tolist(), self.over.tolist()
        for i, (nf, ov) in enumerate(zip(non_finite, over, strict=True)):
            if nf or ov:
                row = i // self.expansion
                if rows.get(row) != "non_finite":
                    rows[row] = "non_finite" if nf else "delta_ratio"
        return rows


@dataclass
class BatchBank:
    """What every hooked module needs for one batch: its stacked factors and the shared row mask."""

    row_mask: torch.Tensor | None  # [B, K r]; None when every row uses the same single adapter
    rows: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A_cat [d_in, K r], B_cat [K r, d_out])
    guard: RowGuard | None = None

    def mask_for(self, rows: int) -> torch.Tensor | None:
        """generate() may expand the batch (num_return_sequences, beams): repeat each row's mask."""
        if rows == self.rows:
            return self.row_mask
        if rows % self.rows:
            raise RuntimeError(f"batch of {rows} rows cannot be mapped onto the {self.rows} adapted requests")
        if self.row_mask is not None:
            self.row_mask = self.row_mask.repeat_interleave(rows // self.rows, dim=0)
        if self.guard is not None:
            self.guard.expand(rows // self.rows)
        self.rows = rows
        return self.row_mask


def lora_factors(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Chameleon's (A [r, d_in], B [d_out, r], s) -> (A^T [d_in, r], s B^T [r, d_out]), as views/one product.

    The orientation `add_multi_lora` stacks, and the one TGI's LoraWeights take (chameleon_tgi pads the
    rank on top): one definition, so both plugins fold the scale the same way.
    """
    return a.t(), b.t() * scaling


def lora_delta(
    x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, row_mask: torch.Tensor | None
) -> torch.Tensor:
    """((x A_cat) * M) B_cat on its own, for the guard (which compares it with the base output)."""
    return torch.matmul(_masked_xa(x, a_cat, row_mask), b_cat)


def _masked_xa(x: torch.Tensor, a_cat: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """(x A_cat) * M: each row's product with every stacked A, the columns of other clusters zeroed."""
    xa = torch.matmul(x, a_cat)
    if row_mask is not None:
        xa.mul_(row_mask.view(row_mask.shape[0], *([1] * (x.dim() - 2)), row_mask.shape[1]))
    return xa


def add_multi_lora(
    output: torch.Tensor,
    x: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    row_mask: torch.Tensor | None,
) -> torch.Tensor:
    """output + ((x A_cat) * M) B_cat for x of shape [B, ..., d_in]; the add is fused into addmm."""
    xa = _masked_xa(x, a_cat, row_mask)
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
        row_mask = bank.mask_for(x.shape[0])
        if bank.guard is not None:
            return bank.guard.apply(self.name, output, x, a_cat, b_cat, row_mask)
        return add_multi_lora(output, x, a_cat, b_cat, row_mask)


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
