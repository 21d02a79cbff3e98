"""STAND-IN, not TGI (see text_generation_server/__init__.py): `models/flash_causal_lm.py`.

FlashCausalLMBatch keeps the protobuf requests in `requests`, the full prompt in `all_input_ids[i]`, the
batch-level `prefilling` flag and `adapter_meta`; `prepare_for_prefill` maps each request's `adapter_id`
through ADAPTER_TO_INDEX on every prefill step (unknown ids -> 0; an empty dict -> the single-segment quirk
of TGI_INTERNALS.md, risk 6); after the last prefill chunk the indices shrink to one per request; `filter`
re-derives `adapter_set` from `adapter_id`; `concatenate` merges segments. FlashCausalLM.generate_token
rebuilds AdapterBatchData.from_meta every step and calls forward(batch, adapter_data); `warmup` runs one
generate_token. Prefill may be chunked (`prefill_chunk` prompt tokens per request and step). Sampling is
greedy; `Generation.logits` is a stand-in extra that lets tests compare outputs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from text_generation_server.adapters import AdapterBatchData, AdapterBatchMetadata
from text_generation_server.adapters.weights import LayerAdapterWeights
from text_generation_server.models.globals import get_adapter_to_index
from text_generation_server.utils.segments import SegmentConcatBuilder, find_segments


class ProcessGroup:
    """One rank, no collectives (the stand-in does not re-create tensor parallelism)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


class Tokenizer:
    """Stand-in tokenizer: prompts are space-separated token ids."""

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


@dataclass
class Generation:
    request_id: int
    token_id: int
    logits: torch.Tensor
    stopped: bool


@dataclass
class FlashCausalLMBatch:
    batch_id: int
    requests: list
    requests_idx_mapping: dict[int, int]
    all_input_ids: list[list[int]]
    prompt_lengths: list[int]
    cache_lengths: list[int]
    generated: list[int]
    prefilling: bool
    prefilling_mask: list[bool]
    kv: list
    prefill_chunk: int | None = None
    input_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    input_lengths: list[int] | None = None
    cu_seqlen_prefill: torch.Tensor | None = None
    prefill_head_indices: torch.Tensor | None = None
    adapter_meta: AdapterBatchMetadata | None = None
    speculative_ids: torch.Tensor | None = None

    @classmethod
    def from_pb(cls, pb, tokenizer, dtype, device, prefill_chunk: int | None = None) -> FlashCausalLMBatch:
        ids = [tokenizer.encode(r.inputs) for r in pb.requests]
        n = len(ids)
        return cls(
            batch_id=pb.id,
            requests=list(pb.requests),
            requests_idx_mapping={r.id: i for i, r in enumerate(pb.requests)},
            all_input_ids=ids,
            prompt_lengths=[len(x) for x in ids],
            cache_lengths=[0] * n,
            generated=[0] * n,
            prefilling=True,
            prefilling_mask=[True] * n,
            kv=[None] * n,
            prefill_chunk=prefill_chunk,
        )

    def _step_tokens(self, i: int) -> list[int]:
        if not self.prefilling_mask[i]:
            return self.all_input_ids[i][-1:]
        start = self.cache_lengths[i]
        end = self.prompt_lengths[i] if self.prefill_chunk is None else start + self.prefill_chunk
        return self.all_input_ids[i][start : min(end, self.prompt_lengths[i])]

    def _set_step_inputs(self) -> list[list[int]]:
        tokens = [self._step_tokens(i) for i in range(len(self))]
        self.input_ids = torch.tensor([t for chunk in tokens for t in chunk], dtype=torch.int64)
        self.position_ids = torch.tensor(
            [self.cache_lengths[i] + j for i, chunk in enumerate(tokens) for j in range(len(chunk))]
        )
        self.input_lengths = [len(chunk) for chunk in tokens]
        return tokens

    def prepare_for_prefill(self) -> None:
        tokens = self._set_step_inputs()
        lengths = torch.tensor(self.input_lengths)
        self.cu_seqlen_prefill = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        adapter_to_index = get_adapter_to_index()
        per_request, adapter_set = [], set()
        for r, chunk in zip(self.requests, tokens, strict=True):
            if adapter_to_index:
                index = adapter_to_index.get(r.adapter_id, 0)
                per_request.append(torch.full((len(chunk),), index))
                adapter_set.add(index)
        if adapter_set:
            adapter_indices = torch.cat(per_request).to(torch.int64)
            segments, segment_indices = find_segments(adapter_indices)
        else:
            adapter_indices = torch.zeros_like(self.input_ids)
            segments, segment_indices = [0, len(adapter_indices)], [len(adapter_indices) - 1]
        self.adapter_meta = AdapterBatchMetadata(
            adapter_indices=adapter_indices,
            adapter_set=adapter_set,
            adapter_segments=torch.tensor(segments, dtype=torch.int32),
            segment_indices=segment_indices,
        )

    def filter(self, request_ids: list[int]) -> FlashCausalLMBatch:
        if len(request_ids) == 0:
            raise ValueError("Batch must have at least one request")
        if len(request_ids) == len(self):
            return self
        keep = [self.requests_idx_mapping[rid] for rid in request_ids]
        adapter_to_index = get_adapter_to_index()
        adapter_set = {adapter_to_index.get(self.requests[i].adapter_id, 0) for i in keep}
        if self.prefilling:
            adapter_meta = None
        else:
            adapter_indices = self.adapter_meta.adapter_indices[keep]
            segments, segment_indices = find_segments(adapter_indices)
            adapter_meta = AdapterBatchMetadata(
                adapter_indices, adapter_set, torch.tensor(segments, dtype=torch.int32), segment_indices
            )
        requests = [self.requests[i] for i in keep]
        return type(self)(
            batch_id=self.batch_id,
            requests=requests,
            requests_idx_mapping={r.id: i for i, r in enumerate(requests)},
            all_input_ids=[self.all_input_ids[i] for i in keep],
            prompt_lengths=[self.prompt_lengths[i] for i in keep],
            cache_lengths=[self.cache_lengths[i] for i in keep],
            generated=[self.generated[i] for i in keep],
            prefilling=self.prefilling,
            prefilling_mask=[self.prefilling_mask[i] for i in keep],
            kv=[self.kv[i] for i in keep],
            prefill_chunk=self.prefill_chunk,
            adapter_meta=adapter_meta,
        )

    @classmethod
    def concatenate(cls, batches: list[FlashCausalLMBatch]) -> FlashCausalLMBatch:
        prefilling = any(b.prefilling for b in batches)
        adapter_meta = None
        if not prefilling:
            builder, adapter_set = SegmentConcatBuilder(), set()
            for b in batches:
                adapter_set |= b.adapter_meta.adapter_set
                builder.concat(b.adapter_meta.adapter_segments, b.adapter_meta.segment_indices)
            segments, segment_indices = builder.build()
            adapter_meta = AdapterBatchMetadata(
                torch.cat([b.adapter_meta.adapter_indices for b in batches]),
                adapter_set,
                segments,
                segment_indices,
            )
        requests = [r for b in batches for r in b.requests]

        def cat(attr: str) -> list:
            return [x for b in batches for x in getattr(b, attr)]

        return cls(
            batch_id=batches[0].batch_id,
            requests=requests,
            requests_idx_mapping={r.id: i for i, r in enumerate(requests)},
            all_input_ids=cat("all_input_ids"),
            prompt_lengths=cat("prompt_lengths"),
            cache_lengths=cat("cache_lengths"),
            generated=cat("generated"),
            prefilling=prefilling,
            prefilling_mask=cat("prefilling_mask"),
            kv=cat("kv"),
            prefill_chunk=batches[0].prefill_chunk,
            adapter_meta=adapter_meta,
        )

    def __len__(self) -> int:
        return len(self.requests)


class FlashCausalLM:
    def __init__(self, model_id: str, model, config, tokenizer, dtype, device, process_group) -> None:
        self.model_id = model_id
        self.model = model.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = device
        self.process_group = process_group
        self.world_size = process_group.size()
        self.rank = process_group.rank()
        self.num_layers = config.num_hidden_layers
        self.layer_to_adapter_weights: dict[str, LayerAdapterWeights] = defaultdict(LayerAdapterWeights)
        self.loaded_adapters: set[int] = set()

    @property
    def batch_type(self) -> type[FlashCausalLMBatch]:
        return FlashCausalLMBatch

    def warmup(self, batch: FlashCausalLMBatch, max_input_tokens: int | None, max_total_tokens: int | None):
        _, _batch, _ = self.generate_token(batch)
        return 4096, max_input_tokens, max_total_tokens

    def forward(self, batch: FlashCausalLMBatch, adapter_data: AdapterBatchData) -> tuple[torch.Tensor, None]:
        layers = len(self.model.model.layers)
        attn = self.model.model.layers[0].self_attn
        for i, cache in enumerate(batch.kv):
            if cache is None:
                empty = torch.zeros(0, attn.num_kv_heads, attn.head_size, dtype=self.dtype)
                batch.kv[i] = [(empty, empty)] * layers
        per_layer = [[batch.kv[i][layer] for i in range(len(batch))] for layer in range(layers)]
        lm_head_indices = torch.tensor(batch.input_lengths).cumsum(0) - 1
        with torch.no_grad():
            logits, speculative = self.model.forward(
                batch.input_ids,
                batch.position_ids,
                batch.input_lengths,
                per_layer,
                lm_head_indices=lm_head_indices,
                adapter_data=adapter_data,
            )
        for i in range(len(batch)):
            batch.kv[i] = [per_layer[layer][i] for layer in range(layers)]
        return logits, speculative

    def generate_token(self, batch: FlashCausalLMBatch):
        prefill = batch.prefilling
        if prefill:
            batch.prepare_for_prefill()
        else:
            batch._set_step_inputs()
        adapter_data = AdapterBatchData.from_meta(
            batch.adapter_meta, self.layer_to_adapter_weights, prefill, batch.prefill_head_indices
        )
        out, _ = self.forward(batch, adapter_data)

        generations, finished_prefilling = [], True
        for i, request in enumerate(batch.requests):
            batch.cache_lengths[i] += batch.input_lengths[i]
            if batch.prefilling_mask[i]:
                if batch.cache_lengths[i] < batch.prompt_lengths[i]:
                    finished_prefilling = False
                    continue
                batch.prefilling_mask[i] = False
            token = int(out[i].argmax())
            batch.all_input_ids[i].append(token)
            batch.generated[i] += 1
            stopped = batch.generated[i] >= request.stopping_parameters.max_new_tokens
            generations.append(Generation(request.id, token, out[i].clone(), stopped))
        batch.prefilling = not finished_prefilling

        if prefill and finished_prefilling:
            ends = batch.cu_seqlen_prefill[1:] - 1
            batch.adapter_meta.adapter_indices = batch.adapter_meta.adapter_indices[ends]
            segments, _ = find_segments(batch.adapter_meta.adapter_indices)
            batch.adapter_meta.adapter_segments = torch.tensor(segments, dtype=torch.int32)
            batch.cu_seqlen_prefill = None

        done = {g.request_id for g in generations if g.stopped}
        if not batch.prefilling and all(r.id in done for r in batch.requests):
            return generations, None, (0, 0)
        return generations, batch, (0, 0)
