"""STAND-IN, not TGI (see text_generation_server/__init__.py): `utils/segments.py`.

find_segments: run boundaries of equal adapter indices and the index of each run; SegmentConcatBuilder
merges the segments of concatenated batches.
"""

from __future__ import annotations

import torch


def find_segments(adapter_indices) -> tuple[list[int], list[int]]:
    values = adapter_indices.tolist() if isinstance(adapter_indices, torch.Tensor) else list(adapter_indices)
    starts = [i for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    return [*starts, len(values)], [values[i] for i in starts]


class SegmentConcatBuilder:
    def __init__(self) -> None:
        self.adapter_segment_indices: list[int] = []
        self.adapter_segment_tensors: list[torch.Tensor] = []

    def concat(self, adapter_segments: torch.Tensor, segment_indices: list[int]) -> None:
        if self.adapter_segment_tensors:
            adapter_segments = adapter_segments[1:] + self.adapter_segment_tensors[-1][-1]
        if self.adapter_segment_indices and self.adapter_segment_indices[-1] == segment_indices[0]:
            segment_indices = segment_indices[1:]
            self.adapter_segment_tensors[-1] = self.adapter_segment_tensors[-1][:-1]
        self.adapter_segment_indices.extend(segment_indices)
        self.adapter_segment_tensors.append(adapter_segments)

    def build(self) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(self.adapter_segment_tensors), self.adapter_segment_indices
