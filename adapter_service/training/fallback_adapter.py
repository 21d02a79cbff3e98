"""The fallback adapter: requests a label router is unsure of get the static LoRA instead.

A label router (predicted-label, pseudo-label, classifier) gives every request the adapter of the class
it predicts, however unsure its classifier was, so a request between classes gets one class's adapter.
The static LoRA of the same size, which `train` trains anyway as the bar Chameleon must clear, is the
safer adapter for those. `install_fallback` puts it into the mixture as extra bases: the artifact's
graph gives a request whose top label probability is below the threshold weight 1 on those bases and 0
on the others, so the compact wire form, the sidecar's grouping and every plugin serve it unchanged
(unsure requests share one weight row, so they form one group). The price is rank: the artifact's is
the mixture's plus the static LoRA's. `choose_threshold` picks the threshold on validation only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adapter_service.core.clustering import FixedK
from adapter_service.training.hypernetwork import LABEL_ROUTINGS, MixtureHyperNetwork
from adapter_service.training.trainer import (
    DeltaApplier,
    Example,
    PrefixCache,
    StatisticCache,
    TrainConfig,
    mean_nll,
)


@dataclass(frozen=True)
class FallbackChoice:
    """The threshold that minimises validation NLL, and what it does there (NLL per token)."""

    threshold: float  # requests with top label probability below it get the static LoRA; 0: none do
    share: float  # of validation requests that fall back
    routed_nll: float  # validation NLL with every request routed
    nll: float  # validation NLL with the fallback (in-sample: the threshold was chosen on it)
    # What a threshold chosen on one half of validation gains on the other half, both ways round:
    # with hundreds of cuts to choose from, some cut always looks better in-sample, even on noise.
    held_out_gain: float

    @property
    def gains(self) -> bool:
        """Worth its rank: better in-sample and on held-out halves."""
        return self.nll < self.routed_nll and self.held_out_gain > 0

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def choose_threshold(
    confidence: Sequence[float], routed_nll: Sequence[float], static_nll: Sequence[float], seed: int = 0
) -> FallbackChoice:
    """The confidence threshold with the lowest mean NLL over these (validation) requests, given each
    one's router confidence and its NLL routed and under the static LoRA, and its held-out gain over two
    seeded halves."""
    conf = np.asarray(confidence, dtype=np.float64)
    routed = np.asarray(routed_nll, dtype=np.float64)
    static = np.asarray(static_nll, dtype=np.float64)
    if not (conf.shape == routed.shape == static.shape) or conf.ndim != 1 or not len(conf):
        raise ValueError(
            f"confidence, routed_nll, static_nll: expected three equal, non-empty lists, got lengths "
            f"{conf.size}, {routed.size}, {static.size}"
        )
    threshold = best_threshold(conf, routed, static)
    unsure = conf < threshold
    held_out_gain = 0.0
    if len(conf) >= 2:
        half = np.random.default_rng(seed).permutation(len(conf)) % 2
        served = np.empty_like(routed)
        for h in (0, 1):
            fit, out = half != h, half == h
            cut = best_threshold(conf[fit], routed[fit], static[fit])
            served[out] = np.where(conf[out] < cut, static[out], routed[out])
        held_out_gain = float(routed.mean() - served.mean())
    return FallbackChoice(
        threshold=threshold,
        share=float(unsure.mean()),
        routed_nll=float(routed.mean()),
        nll=float(np.where(unsure, static, routed).mean()),
        held_out_gain=held_out_gain,
    )


def best_threshold(conf: np.ndarray, routed: np.ndarray, static: np.ndarray) -> float:
    """The in-sample optimum. Only cuts between distinct confidences count (equal ones cannot be told
    apart), each at the midpoint so float32 and float64 confidences agree; ties go to the fewest
    fallbacks."""
    order = np.argsort(conf, kind="stable")
    conf, routed, static = conf[order], routed[order], static[order]
    # totals[j]: the summed NLL when the j least confident requests fall back
    totals = routed.sum() + np.concatenate([[0.0], np.cumsum(static - routed)])
    n = len(conf)
    allowed = np.ones(n + 1, dtype=bool)
    allowed[1:n] = conf[:-1] < conf[1:]
    j = int(np.flatnonzero(allowed)[np.argmin(totals[allowed])])
    if j == 0:
        return 0.0
    if j == n:
        return float(min(1.0, np.nextafter(conf[-1], np.inf)))
    return float((conf[j - 1] + conf[j]) / 2)


def validation_choice(
    model: torch.nn.Module,
    mixture: MixtureHyperNetwork,
    static: torch.nn.Module,
    group_modules: dict[str, list[str]],
    scaling: float,
    validation: Sequence[Example],
    config: TrainConfig,
    prefix: PrefixCache | None = None,
    statistics: StatisticCache | None = None,
) -> FallbackChoice:
    """`choose_threshold` on the validation split: the mixture scored as it trained (config.policy),
    the static LoRA as one cluster, each request's confidence from its own statistic."""
    if mixture.classifier is None:
        raise ValueError(
            f"routing: a fallback needs a label router ({', '.join(LABEL_ROUTINGS)}), got "
            f"{mixture.config.routing!r}"
        )
    statistics = statistics or StatisticCache(model, config.statistic)
    applier = DeltaApplier(model, [n for ms in group_modules.values() for n in ms], scaling)
    try:
        score = dict(
            group_modules=group_modules,
            examples=validation,
            batch_size=config.batch_size,
            seed=config.seed,
            prefix=prefix,
            statistic=config.statistic,
            statistics=statistics,
        )
        routed, length = mean_nll(model, applier, mixture, policy=config.policy, **score)
        fixed, _ = mean_nll(model, applier, static, policy=FixedK(1), **score)
    finally:
        applier.remove()
    with torch.no_grad():
        confidence = mixture.confidence(statistics([e.prompt for e in validation], mixture))
    return choose_threshold(confidence.cpu().numpy(), routed / length, fixed / length)


def install_fallback(
    mixture: MixtureHyperNetwork, static: torch.nn.Module, threshold: float
) -> MixtureHyperNetwork:
    """A copy of `mixture` with `static`'s A and B as its last bases, served alone to requests whose
    confidence is below `threshold`. The static LoRA's rank must be a multiple of a basis's rank."""
    config = mixture.config
    if config.fallback_bases:
        raise ValueError("mixture: already has a fallback adapter")
    if static.config.groups != config.groups:
        raise ValueError("static: expected a static LoRA of the mixture's target groups")
    per_basis = config.rank // config.bases
    if static.config.rank % per_basis:
        raise ValueError(
            f"static: rank {static.config.rank} is not a multiple of the mixture's basis rank {per_basis}"
        )
    extra = static.config.rank // per_basis
    combined = MixtureHyperNetwork(
        dataclasses.replace(
            config,
            rank=config.rank + static.config.rank,
            bases=config.bases + extra,
            fallback_bases=extra,
            fallback_threshold=threshold,
        )
    )
    state = mixture.state_dict()
    for i, (a, b) in enumerate(zip(static.a, static.b, strict=True)):
        layers, d_out = b.shape[0], b.shape[1]
        a_blocks = a.detach().reshape(layers, extra, per_basis, a.shape[-1])
        b_blocks = b.detach().reshape(layers, d_out, extra, per_basis)
        state[f"a.{i}"] = torch.cat([state[f"a.{i}"], a_blocks.to(state[f"a.{i}"])], dim=1)
        state[f"b.{i}"] = torch.cat([state[f"b.{i}"], b_blocks.to(state[f"b.{i}"])], dim=2)
    combined.load_state_dict(state)
    return combined.to(next(mixture.parameters()).device).eval()
