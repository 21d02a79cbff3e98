"""STAND-IN, not TGI (see text_generation_server/__init__.py): `adapters/weights.py`.

AdapterBatchMetadata, LayerAdapterWeights (adapter index -> weights, add/remove/get_data) and
AdapterBatchData (from_meta rebuilt every step; `data[layer_type]` is a BatchLoraWeights directly).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class AdapterBatchMetadata:
    adapter_indices: torch.Tensor  # one adapter index per token (prefill) or per request (decode)
    adapter_set: set[int]
    adapter_segments: torch.Tensor  # int32 run boundaries, S + 1
    segment_indices: list[int]  # adapter index of each run


class AdapterWeights(ABC):
    @classmethod
    @abstractmethod
    def get_batch_types(cls) -> list[type[BatchAdapterWeights]]: ...

    @property
    def speculative_tokens(self) -> int:
        return 0


class BatchAdapterWeights(ABC):
    @abstractmethod
    def has_adapter(self, adapter_index: int) -> bool: ...

    @classmethod
    @abstractmethod
    def load(cls, adapter_weights, meta, prefill, prefill_head_indices): ...


class LayerAdapterWeights:
    """The adapters registered for one layer type, by adapter index."""

    def __init__(self) -> None:
        self.adapter_weights: dict[int, AdapterWeights] = {}

    def add_adapter(self, adapter_idx: int, weights: AdapterWeights) -> None:
        self.adapter_weights[adapter_idx] = weights

    def remove_adapter(self, adapter_idx: int) -> None:
        self.adapter_weights.pop(adapter_idx, None)

    def is_empty(self) -> bool:
        return not self.adapter_weights

    def get_data(self, meta: AdapterBatchMetadata, prefill: bool, prefill_head_indices):
        by_type: dict[type, dict[int, AdapterWeights]] = defaultdict(dict)
        for index, weights in self.adapter_weights.items():
            for batch_type in weights.get_batch_types():
                by_type[batch_type][index] = weights
        data = {}
        for batch_type, weights in by_type.items():
            loaded = batch_type.load(weights, meta, prefill, prefill_head_indices)
            if loaded is not None:
                data = loaded  # as in TGI: the batch weights themselves, not a dict by kind
        return data


@dataclass
class AdapterBatchData:
    meta: AdapterBatchMetadata
    data: dict
    prefill: bool

    @staticmethod
    def from_meta(meta, weights, prefill, prefill_head_indices) -> AdapterBatchData:
        data = {}
        for layer_type, layer_weights in weights.items():
            if layer_weights.is_empty():
                continue
            data[layer_type] = layer_weights.get_data(
                meta, prefill, prefill_head_indices if layer_type == "lm_head" else None
            )
        return AdapterBatchData(meta=meta, data=data, prefill=prefill)
