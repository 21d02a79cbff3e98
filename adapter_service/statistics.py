"""Request statistics: the one place trainer, plugins and demo compute how a prompt is described.

One implementation on purpose: a statistic computed differently at training and at serving time
silently breaks the adapters. The manifest declares the kind and its parameters (`StatisticSpec`);
`compute_statistic` is the single entry point every side calls with it. Pad-aware; prompt tokens
only (the scored continuation never leaks in). Kinds:

* `mean_input_embedding` (the paper's): mean of the prompt's input-token embeddings. Free.
* `mean_hidden_state` with params `{"layer": "L"}`: mean of the served model's own hidden states
  after decoder layer L (1-based). Separates domains better (benchmarks/statistic_grouping.py); costs
  the first L layers of a prefill, and artifacts using it adapt only layers after L, so a server can
  take it from the prefill it runs anyway.

Both are L2-normalised float32 [N, D].
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

import torch

MEAN_INPUT_EMBEDDING = "mean_input_embedding"
MEAN_HIDDEN_STATE = "mean_hidden_state"
SUPPORTED_KINDS = (MEAN_INPUT_EMBEDDING, MEAN_HIDDEN_STATE)


class StatisticLike(Protocol):
    kind: str
    params: Mapping[str, str]


def _check_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [N, T], got {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError("attention_mask: every row needs at least one prompt token")
    return attention_mask


def _masked_mean(vectors: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    mean = (vectors.to(torch.float32) * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1)


def mean_input_embedding(
    embedding: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised mean of the input-token embeddings of each prompt, pads excluded -> [N, D] fp32.

    `embedding` is the model's input embedding table [vocab, D]; works for left or right padding.
    """
    attention_mask = _check_mask(input_ids, attention_mask)
    with torch.no_grad():
        return _masked_mean(embedding[input_ids], attention_mask)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama-family `model.layers`, GPT-2 `transformer.h`)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        holder: Any = model
        for part in path.split("."):
            holder = getattr(holder, part, None)
        if isinstance(holder, torch.nn.ModuleList):
            return holder
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers for a hidden-state statistic")


class _Stop(Exception):
    """Ends the forward pass once the wanted layer's output is captured."""


def mean_hidden_state(
    model: torch.nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised mean over prompt tokens of decoder block `layer`'s output (1-based; before any
    final norm, so the last layer differs from transformers' last `hidden_states` entry).

    Runs only the first `layer` blocks. Position ids follow the mask, so left and right padding give
    the same statistic (up to float rounding)."""
    attention_mask = _check_mask(input_ids, attention_mask)
    blocks = decoder_layers(model)
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"statistic.params.layer: expected 1..{len(blocks)}, got {layer}")
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
    handle = blocks[layer - 1].register_forward_hook(capture)
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {layer} did not run; cannot compute the hidden-state statistic")
    return _masked_mean(captured[0], attention_mask)


def statistic_layer(spec: StatisticLike | None) -> int | None:
    """The decoder layer a statistic reads (None for the input embedding, also the kind of a missing
    spec); ValueError when malformed."""
    if spec is None or spec.kind == MEAN_INPUT_EMBEDDING:
        return None
    if spec.kind == MEAN_HIDDEN_STATE:
        raw = spec.params.get("layer")
        if raw is None or not str(raw).isdigit() or int(raw) < 1:
            raise ValueError(f"statistic.params.layer: expected a positive integer, got {raw!r}")
        return int(raw)
    raise ValueError(
        f"statistic.kind: {spec.kind!r} is not computed here; known: {', '.join(SUPPORTED_KINDS)}"
    )


def compute_statistic(
    model: torch.nn.Module,
    spec: StatisticLike | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The statistic `spec` declares (None: the mean input embedding), per prompt -> [N, D] float32."""
    layer = statistic_layer(spec)
    if layer is None:
        return mean_input_embedding(model.get_input_embeddings().weight, input_ids, attention_mask)
    return mean_hidden_state(model, layer, input_ids, attention_mask)


def parse_statistic(text: str) -> tuple[str, dict[str, str]]:
    """CLI form -> (kind, params): `embedding` or `hidden:L`."""
    if text in ("embedding", MEAN_INPUT_EMBEDDING):
        return MEAN_INPUT_EMBEDDING, {}
    kind, _, layer = text.partition(":")
    if kind in ("hidden", MEAN_HIDDEN_STATE) and layer.isdigit() and int(layer) >= 1:
        return MEAN_HIDDEN_STATE, {"layer": layer}
    raise ValueError(f"statistic: expected 'embedding' or 'hidden:L' with L >= 1, got {text!r}")
