"""Runtime adapter slots inside TGI: cluster key -> TGI adapter index, reference-counted by request id.

An adapter is *registered* while a request uses it: its LoraWeights sit in
`layer_to_adapter_weights[layer_type]` under an index, and its name ("chameleon:<key>") maps to that
index in the dict `get_adapter_to_index()` returns, so TGI's prepare_for_prefill/filter/concatenate
find it from `request.adapter_id`. When the last request using it leaves, it is unregistered (indices,
names and layer weights removed) but its prepared LoraWeights stay in a byte-bounded LRU, so the next
batch in that cluster re-registers it without a transfer (its key goes back to the sidecar as held).
Pinned adapters (the zero identity) stay registered with no user. Each LoraWeights object is immutable
once built (TGI_INTERNALS.md, section 5: never mutate registered tensors; a new version gets a new key).

No TGI import: the layer weights and the name dict are passed in, so this is plain Python.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

NAME_PREFIX = "chameleon:"


@dataclass(frozen=True)
class Prepared:
    """One adapter ready for TGI: a LoraWeights per layer type, and its size on the device."""

    key: str
    weights: dict[str, Any]  # layer type -> LoraWeights
    nbytes: int


class AdapterSlots:
    def __init__(
        self,
        layer_to_adapter_weights: MutableMapping[str, Any],
        adapter_to_index: Callable[[], MutableMapping[str, int]],
        cache_bytes: int,
        on_change: Callable[[AdapterSlots], None] | None = None,
    ) -> None:
        self._layers = layer_to_adapter_weights
        self._names = adapter_to_index
        self.cache_bytes = cache_bytes
        self._on_change = on_change
        self._prepared: OrderedDict[str, Prepared] = OrderedDict()
        self._index: dict[str, int] = {}  # registered key -> TGI adapter index
        self._users: dict[str, set[int]] = {}  # registered key -> request ids using it
        self._request_key: dict[int, str | None] = {}  # every request seen; None: no Chameleon adapter
        self._pinned: set[str] = set()
        self.evictions = 0
        self._lock = threading.RLock()

    @staticmethod
    def name(key: str) -> str:
        return NAME_PREFIX + key

    # -- prepared adapters (LRU) --------------------------------------------------------------------
    def get(self, key: str) -> Prepared | None:
        with self._lock:
            item = self._prepared.get(key)
            if item is not None:
                self._prepared.move_to_end(key)
            return item

    def put(self, prepared: Prepared) -> Prepared:
        """Keep a prepared adapter; trims unregistered ones beyond the byte budget, oldest first."""
        with self._lock:
            if prepared.key in self._index:  # registered objects are never replaced
                return self._prepared[prepared.key]
            self._prepared[prepared.key] = prepared
            self._prepared.move_to_end(prepared.key)
            self._trim()
            return prepared

    def held_keys(self, limit: int | None = None) -> list[str]:
        """Keys the sidecar may leave out next time, most recently used first."""
        with self._lock:
            keys = [k for k in reversed(self._prepared) if k not in self._pinned]
            return keys if limit is None else keys[:limit]

    def _trim(self) -> None:
        total = sum(p.nbytes for p in self._prepared.values())
        for key in list(self._prepared):
            if total <= self.cache_bytes:
                break
            if key not in self._index:
                total -= self._prepared.pop(key).nbytes

    # -- registration -------------------------------------------------------------------------------
    def assign(self, request_id: int, prepared: Prepared) -> str:
        """Make `prepared` registered and used by `request_id`; returns the name to put in `adapter_id`.

        Takes the object, not the key: the LRU may have trimmed an unregistered adapter between the
        sidecar's answer and this call, and the caller's reference brings it back."""
        key = prepared.key
        with self._lock:
            if key not in self._prepared:
                self._prepared[key] = prepared
            self._drop_request(request_id)
            if key not in self._index:
                self._register(key)
            self._users[key].add(request_id)
            self._request_key[request_id] = key
            return self.name(key)

    def track(self, request_id: int) -> None:
        """Remember a request that got no Chameleon adapter, so later prefill chunks skip it."""
        with self._lock:
            self._drop_request(request_id)
            self._request_key[request_id] = None

    def pin(self, key: str) -> str:
        """Register `key` for good (the identity adapter): it never becomes unreferenced."""
        with self._lock:
            if key not in self._index:
                self._register(key)
            self._pinned.add(key)
            return self.name(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pinned.discard(key)
            self._evict_if_unused(key)

    def release(self, request_ids: Iterable[int]) -> list[str]:
        """Requests that left; returns the keys this unregistered."""
        evicted = []
        with self._lock:
            for request_id in request_ids:
                key = self._request_key.pop(request_id, None)
                if key is not None and key in self._users:
                    self._users[key].discard(request_id)
                    if self._evict_if_unused(key):
                        evicted.append(key)
        return evicted

    def forget_unregistered(self) -> None:
        """Drop prepared adapters nobody uses (the sidecar switched artifacts)."""
        with self._lock:
            for key in [k for k in self._prepared if k not in self._index]:
                del self._prepared[key]

    def _register(self, key: str) -> None:
        names = self._names()
        taken = set(names.values()) | set(self._index.values())
        index = next(i for i in range(1, len(taken) + 2) if i not in taken)  # 0 is the base model
        for layer_type, weights in self._prepared[key].weights.items():
            self._layers[layer_type].add_adapter(index, weights)
        names[self.name(key)] = index
        self._index[key] = index
        self._users[key] = set()
        self._changed()

    def _evict_if_unused(self, key: str) -> bool:
        if key not in self._index or self._users[key] or key in self._pinned:
            return False
        index = self._index.pop(key)
        del self._users[key]
        for layer_type in self._prepared[key].weights:
            self._layers[layer_type].remove_adapter(index)
        self._names().pop(self.name(key), None)
        self.evictions += 1
        self._trim()
        self._changed()
        return True

    def _drop_request(self, request_id: int) -> None:
        if request_id in self._request_key:
            self.release([request_id])

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    # -- inspection ---------------------------------------------------------------------------------
    def registered(self) -> dict[str, int]:
        """Name -> TGI index of every registered Chameleon adapter."""
        with self._lock:
            return {self.name(k): i for k, i in self._index.items()}

    def users(self, key: str) -> frozenset[int]:
        with self._lock:
            return frozenset(self._users.get(key, ()))

    def requests(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._request_key)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._request_key

    def __len__(self) -> int:
        return len(self._index)
