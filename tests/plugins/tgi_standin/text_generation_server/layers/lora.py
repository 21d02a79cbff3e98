"""STAND-IN, not TGI (see text_generation_server/__init__.py): `layers/lora.py`.

LoraLinear.forward_layer_type(result, input, adapter_data, layer_type, start_idx, end_idx) with TGI's two
paths: the vectorized one (SGMV in prefill, BGMV in decode, per rank group, through `punica_sgmv`; taken
when every rank group's rank is <= MAX_RANK_CUSTOM) and the pure-torch fallback that loops over
`meta.adapter_set` and adds `(x @ A) @ B * mask` (`forward_lora`), the reference math. The two wrappers
carve the output like TGI: fused column layers by `layer_names`/`sizes`, row layers by this rank's stride.
"""

from __future__ import annotations

import torch
from torch import nn

from text_generation_server.utils.kernels import load_kernel

punica_sgmv = load_kernel(module="punica_sgmv", repo_id="kernels-community/punica-sgmv")


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, layer_id: int, process_group) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_id = layer_id
        self.process_group = process_group

    def forward_layer_type(
        self,
        result: torch.Tensor,
        input: torch.Tensor,
        adapter_data,
        layer_type: str,
        start_idx: int,
        end_idx: int,
    ) -> torch.Tensor:
        if adapter_data is None:
            return result
        data = adapter_data.data.get(layer_type)
        if data is not None and punica_sgmv is not None and data.can_vectorize(self.process_group):
            sliced = end_idx - start_idx != result.shape[1]
            proj = torch.zeros_like(result[:, start_idx:end_idx]) if sliced else result
            for rank, segments in data.rank_data.items():
                if data.use_sgmv:
                    v = punica_sgmv.lora_a_sgmv_cutlass(
                        input,
                        segments.tmp_shrink,
                        segments.lora_a_ptr,
                        segments.segment_starts,
                        segments.segment_ends,
                        self.layer_id,
                        rank,
                    )
                    punica_sgmv.lora_b_sgmv_cutlass(
                        proj,
                        v,
                        segments.tmp_expand,
                        segments.lora_b_ptr,
                        segments.segment_starts,
                        segments.segment_ends,
                        self.layer_id,
                    )
                else:
                    v = torch.zeros((input.size(0), rank), dtype=input.dtype, device=input.device)
                    punica_sgmv.add_lora_a_bgmv(
                        v, input, segments.lora_a_ptr, segments.indices, self.layer_id
                    )
                    punica_sgmv.add_lora_b_bgmv(proj, v, segments.lora_b_ptr, segments.indices, self.layer_id)
            if sliced:
                result[:, start_idx:end_idx] += proj
        else:
            for adapter_index in adapter_data.meta.adapter_set:
                if data is not None and data.has_adapter(adapter_index):
                    mask = (adapter_data.meta.adapter_indices == adapter_index).to(input.dtype).view(-1, 1)
                    result[:, start_idx:end_idx] += self.forward_lora(input, data, adapter_index, mask)
        return result

    def forward_lora(
        self, input: torch.Tensor, data, adapter_index: int, adapter_mask: torch.Tensor
    ) -> torch.Tensor:
        lora_a = data.lora_a[adapter_index][self.layer_id, :, :]
        lora_b = data.lora_b[adapter_index][self.layer_id, :, :]
        lora_a = punica_sgmv.orient_for_rank(lora_a, lora_b.size(0))
        return ((input @ lora_a) @ lora_b) * adapter_mask

    def collect_lora_a(self, a_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("tensor parallelism is not re-created in the stand-in")


class TensorParallelMultiAdapterLinear(LoraLinear):
    """A fused column-parallel layer (qkv, gate_up): one base matmul, then each sub-projection's slice."""

    def __init__(self, base_layer, layer_id, layer_names, sizes, process_group) -> None:
        super().__init__(base_layer, layer_id, process_group)
        self.layer_names = layer_names
        self.sizes = sizes

    @classmethod
    def load(cls, base_layer, layer_id, layer_names, sizes, process_group):
        return cls(base_layer, layer_id, layer_names, sizes, process_group)

    def forward(self, input: torch.Tensor, adapter_data) -> torch.Tensor:
        result = self.base_layer(input)
        if self.layer_names is None:
            return result
        offset = 0
        world = self.process_group.size()
        for i, layer_name in enumerate(self.layer_names):
            start_idx = offset // world
            if self.sizes is not None:
                offset += self.sizes[i]
                end_idx = offset // world
            else:
                end_idx = result.shape[1]
            result = self.forward_layer_type(result, input, adapter_data, layer_name, start_idx, end_idx)
        return result


class TensorParallelAdapterRowLinear(LoraLinear):
    """A row-parallel layer (o_proj, down_proj): the delta goes to this rank's column slice."""

    def __init__(self, base_layer, layer_id, layer_name, process_group) -> None:
        super().__init__(base_layer, layer_id, process_group)
        self.layer_name = layer_name

    @classmethod
    def load(cls, base_layer, layer_id, layer_name, process_group):
        return cls(base_layer, layer_id, layer_name, process_group)

    def forward(self, input: torch.Tensor, adapter_data) -> torch.Tensor:
        result = self.base_layer(input)
        if self.layer_name is None:
            return result
        stride = result.shape[-1] // self.process_group.size()
        start_idx = self.process_group.rank() * stride
        self.forward_layer_type(result, input, adapter_data, self.layer_name, start_idx, start_idx + stride)
        return result
