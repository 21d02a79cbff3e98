"""LRU cache of received cluster adapters, bounded in bytes, keyed by the service's stable keys.

Adapters are stored ready to use (A^T and scaled B^T on the model's device and dtype), so a hit
costs nothing but the concatenation into the batch's bank.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachedAdapter:
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A^T [d_in, r], s B^T [r, d_out])
    nbytes: int
    # A mixture cluster in the compact form: its basis weights [bases] (modules empty); the bases are
    # cached as an adapter of their own, under the response's bases_key.
    weights: torch.Tensor | None = None


class AdapterCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedAdapter] = OrderedDict()
        self.nbytes = 0

    def get(self, key: str) -> CachedAdapter | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(
        self,
        key: str,
        modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor | None = None,
    ) -> CachedAdapter:
        """Store (or refresh) an adapter; evicts least recently used ones beyond the byte budget.

        An adapter larger than the whole budget is returned but not kept."""
        nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
        nbytes += weights.nbytes if weights is not None else 0
        item = CachedAdapter(modules, nbytes, weights)
        if key in self._items:
            self.nbytes -= self._items.pop(key).nbytes
        if nbytes <= self.max_bytes:
            self._items[key] = item
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= evicted.nbytes
        return item

    def keys(self, limit: int | None = None) -> list[str]:
        """Most recently used first."""
        keys = list(reversed(self._items))
        return keys if limit is None else keys[:limit]

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items
