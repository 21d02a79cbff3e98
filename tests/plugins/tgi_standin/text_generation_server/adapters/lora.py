"""STAND-IN, not TGI (see text_generation_server/__init__.py): `adapters/lora.py`.

LoraConfig (the fields of TGI's dataclass), LoraWeights (one adapter, one layer type, all layers stacked:
A [L, in, r] or [L, r, in] by `orient_for_rank`, B [L, r, out]; the `*_t` properties re-transpose and
re-allocate, flipping a flag), RankSegments and BatchLoraWeights.load: keeps adapters present in
`segment_indices`, one pointer per segment (0 for base), groups segments by rank, SGMV segment bounds in
prefill, and in decode a per-token index that is the *global* segment number (or -1), which the kernels
apply to the per-rank pointer subset (TGI_INTERNALS.md, risk 4).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from text_generation_server.adapters.config import AdapterConfig
from text_generation_server.adapters.weights import AdapterBatchMetadata, AdapterWeights, BatchAdapterWeights
from text_generation_server.utils.kernels import load_kernel

punica_sgmv = load_kernel(module="punica_sgmv", repo_id="kernels-community/punica-sgmv")


@dataclass
class LoraConfig(AdapterConfig):
    r: int
    target_modules: list[str] | str | None
    fan_in_fan_out: bool
    lora_alpha: int
    use_rslora: bool

    def map_weights_for_model(self, adapter_weights, weight_names):
        module_map, used = {}, set()
        for name in weight_names:
            a, b = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
            if a in adapter_weights and b in adapter_weights:
                module_map[name] = {"lora_A": (adapter_weights[a], a), "lora_B": (adapter_weights[b], b)}
                used.update((a, b))
        return module_map, used


class LoraWeights(AdapterWeights):
    """LoRA weights of one adapter for one layer type, all layers stacked."""

    def __init__(
        self, weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], adapter_config: LoraConfig
    ):
        self.lora_a_r = weights_a[0].size(1) if weights_a else 1
        self.lora_b_r = weights_b[0].size(0) if weights_a else 1
        self._is_transposed = False
        self._use_cutlass_shrink = punica_sgmv.use_cutlass_shrink(self.lora_a_r)
        self._weights_a = torch.stack(
            [punica_sgmv.orient_for_rank(w, w.size(1)).contiguous() for w in weights_a]
        )
        self._weights_b = torch.stack(weights_b)
        self.adapter_config = adapter_config

    @property
    def weights_a(self) -> torch.Tensor:
        if self._is_transposed:
            self._transpose_weights()
        return self._weights_a

    @property
    def weights_b(self) -> torch.Tensor:
        if self._is_transposed:
            self._transpose_weights()
        return self._weights_b

    @property
    def weights_a_t(self) -> torch.Tensor:
        if not self._is_transposed:
            self._transpose_weights()
        return self._weights_a

    @property
    def weights_b_t(self) -> torch.Tensor:
        if not self._is_transposed:
            self._transpose_weights()
        return self._weights_b

    def _transpose_weights(self) -> None:
        if self._use_cutlass_shrink:  # above rank 16, A is already [L, r, in] in both orientations
            self._weights_a = self._weights_a.transpose(1, 2).contiguous()
        self._weights_b = self._weights_b.transpose(1, 2).contiguous()
        self._is_transposed = not self._is_transposed

    @classmethod
    def get_batch_types(cls) -> list[type[BatchAdapterWeights]]:
        return [BatchLoraWeights]


@dataclass
class RankSegments:
    rank: int
    lora_a_ptr: torch.Tensor
    lora_b_ptr: torch.Tensor
    tmp_shrink: torch.Tensor | None
    tmp_expand: torch.Tensor | None
    segment_starts: torch.Tensor | None
    segment_ends: torch.Tensor | None
    indices: torch.Tensor | None


@dataclass
class BatchLoraWeights(BatchAdapterWeights):
    lora_a: dict[int, torch.Tensor]
    lora_b: dict[int, torch.Tensor]
    adapter_index_configs: dict[int, LoraConfig]
    rank_data: dict[int, RankSegments]
    use_sgmv: bool

    def has_adapter(self, adapter_index: int) -> bool:
        return adapter_index in self.adapter_index_configs

    def can_vectorize(self, pg) -> bool:
        return all(rd.rank // pg.size() <= punica_sgmv.MAX_RANK_CUSTOM for rd in self.rank_data.values())

    @classmethod
    def load(cls, adapter_weights, meta: AdapterBatchMetadata, prefill: bool, prefill_head_indices):
        adapter_weights = {k: v for k, v in adapter_weights.items() if isinstance(v, LoraWeights)}
        if not adapter_weights:
            return None
        device = next(iter(adapter_weights.values())).weights_a.device
        segment_indices = meta.segment_indices
        present = [idx for idx in segment_indices if idx in adapter_weights]
        lora_a = {idx: adapter_weights[idx].weights_a for idx in present}
        lora_b = {idx: adapter_weights[idx].weights_b for idx in present}
        max_rank = max((adapter_weights[idx].lora_a_r for idx in present), default=0)

        use_sgmv = prefill or max_rank > punica_sgmv.BGMV_MAX_RANK

        def pointers(attr: str) -> torch.Tensor:
            ptrs = [
                punica_sgmv.remember(getattr(adapter_weights[idx], attr)) if idx in adapter_weights else 0
                for idx in segment_indices
            ]
            return torch.tensor(ptrs, dtype=torch.int64, device=device)

        # Prefill (SGMV) points at the normal orientation, decode (BGMV) at the transposed one.
        lora_a_ptr = pointers("weights_a" if use_sgmv else "weights_a_t")
        lora_b_ptr = pointers("weights_b" if use_sgmv else "weights_b_t")
        configs = {idx: adapter_weights[idx].adapter_config for idx in present}
        adapter_to_segment = {adapter: segment for segment, adapter in enumerate(segment_indices)}

        by_rank: dict[int, list[int]] = defaultdict(list)
        for segment, adapter in enumerate(segment_indices):
            if adapter in adapter_weights:
                by_rank[adapter_weights[adapter].lora_a_r].append(segment)

        rank_data = {}
        for rank, segments in by_rank.items():
            tmp_shrink = tmp_expand = starts = ends = batch_indices = None
            if use_sgmv:
                tmp_shrink, tmp_expand = punica_sgmv.get_tmp_tensors(len(segments), rank, device)
                starts = meta.adapter_segments[segments]
                ends = meta.adapter_segments[[s + 1 for s in segments]]
            else:
                in_rank = set(segments)
                per_token = [adapter_to_segment[a] for a in meta.adapter_indices.tolist()]
                batch_indices = torch.tensor(
                    [s if s in in_rank else -1 for s in per_token], dtype=torch.int64, device=device
                )
            rank_data[rank] = RankSegments(
                rank=rank,
                lora_a_ptr=lora_a_ptr[segments],
                lora_b_ptr=lora_b_ptr[segments],
                tmp_shrink=tmp_shrink,
                tmp_expand=tmp_expand,
                segment_starts=starts,
                segment_ends=ends,
                indices=batch_indices,
            )
        return BatchLoraWeights(lora_a, lora_b, configs, rank_data, use_sgmv)


def get_scaling_factor(lora_alpha: int, r: int, uses_rslora: bool = False) -> float:
    return lora_alpha / (r**0.5) if uses_rslora else lora_alpha / r
