"""The hyper-network: a cluster centroid in, low-rank factors (A, B) for every target module out.

Scales to many target layers without a giant output layer: a shared trunk encodes the centroid, and
one head per target group (modules of one type and shape, e.g. all q_proj) decodes it, conditioned
on a learned per-layer embedding. Parameters grow with the number of module *types*, not layers.

B's head starts at zero, so a fresh network emits zero deltas and training starts at the base
model, as LoRA does; `init="random"` gives non-zero B for tests and demos of the plumbing.

Two kinds (`HyperNetworkConfig.kind`):

* ``full`` (`HyperNetwork`): the paper's design, every number of A and B generated from the centroid.
  Measured on real data, it learns to ignore its input (docs/research/results.md).
* ``mixture`` (`MixtureHyperNetwork`): far fewer generated numbers. `bases` learned LoRAs (each of rank
  rank / bases) and one soft weight per basis, from the centroid's distances to learned prototypes.
  Prototypes start at k-means centroids of the training statistics, standardised with the training
  mean and spread (raw statistics point in nearly one direction), so the network starts out routing
  unlike prompts to unlike bases. The emitted adapter is the concatenation of the weighted bases, an
  ordinary rank-`rank` LoRA: service, codec and plugins need nothing new. With `routing="table"` the
  nearest prototype (fixed after k-means) only picks a row of learned weights; with
  `routing="classifier"` the distances are taken from a linear classifier's label probabilities,
  fitted to the training data's labels (labels at training time only; serving needs none), and with
  `routing="predicted-label"` from its predicted label alone (one-hot). `routing="pseudo-label"` is
  the predicted-label router without labels: its classes are k-means groups of the training statistics.
A label router's mixture may end in fallback bases, a static LoRA served alone to the requests its
classifier is unsure of (fallback_adapter.py).

An optional cap bounds every emitted delta, ||s B A||_F <= c ||W||_F per cluster and module, inside
the network (so the exported graph enforces it too): a centroid unlike anything seen in training
cannot produce an arbitrarily large change to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GroupShape:
    name: str
    d_in: int
    d_out: int
    num_modules: int
    # Per module, the largest allowed ||B A||_F (= c ||W||_F / s); empty = no cap.
    norm_limits: tuple[float, ...] = ()


@dataclass(frozen=True)
class HyperNetworkConfig:
    stat_dim: int
    groups: tuple[GroupShape, ...]
    rank: int
    hidden: int = 64
    init: str = "zero"  # "zero": B = 0 (training starts at the base model); "random": small B
    max_delta_norm: float | None = None  # c of the cap, relative to ||W||_F (recorded; limits in groups)
    kind: str = "full"  # "full" (HyperNetwork) or "mixture" (MixtureHyperNetwork)
    bases: int = 1  # mixture: number of learned LoRA bases; rank must be a multiple of it
    # mixture: mean logit lead of the nearest prototype over the second nearest at initialisation
    # (0.3: soft, top weight ~0.3 of 6 bases; 4: nearly hard, ~0.9). Measured: soft ties a static LoRA
    # of the same rank, hard loses (docs/research/adaptation.md).
    routing_sharpness: float = 0.3
    # mixture: how many of the `bases` are always on (weight 1, not routed), a static LoRA inside the
    # mixture; the other bases - shared_bases are routed. 0: every basis is routed.
    shared_bases: int = 0
    # mixture: "distance" (weights from the statistic's distances to learned prototypes) or "table"
    # (the nearest of fixed k-means prototypes picks a row of learned weights: requests of one group
    # share their weights exactly, as with the label oracle of docs/research/adaptation.md, without labels).
    routing: str = "distance"
    # mixture with routing "classifier": the training labels, in the order of the classifier's outputs.
    labels: tuple[str, ...] = ()
    # mixture with a label router: the last `fallback_bases` bases hold a static LoRA that serves, alone,
    # every request whose classifier confidence (top label probability) is below `fallback_threshold`;
    # 0: none. Installed after training (fallback_adapter.py), with the threshold chosen on validation.
    fallback_bases: int = 0
    fallback_threshold: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> HyperNetworkConfig:
        groups = tuple(
            GroupShape(**{**g, "norm_limits": tuple(g.get("norm_limits", ()))}) for g in data["groups"]
        )
        return cls(**{**data, "groups": groups, "labels": tuple(data.get("labels", ()))})


def cap_delta_norm(a: torch.Tensor, b: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """B rescaled so that ||B A||_F <= limit for each [..., L] module; differentiable and exportable.

    ||B A||_F^2 = sum((A A^T) * (B^T B)): two r x r products, never the d_out x d_in delta itself. The
    tiny epsilon keeps the gradient finite at B = 0, where training starts."""
    gram = (a @ a.transpose(-1, -2)) * (b.transpose(-1, -2) @ b)
    norm = torch.sqrt(gram.sum(dim=(-1, -2)).clamp_min(0.0) + 1e-24)
    factor = torch.clamp(limits / norm, max=1.0)
    return b * factor[..., None, None]


class DeltaNormCaps(nn.Module):
    """The cap's per-module limits as buffers (derived from the config, not saved in state dicts)."""

    def __init__(self, groups: tuple[GroupShape, ...]) -> None:
        super().__init__()
        self.enabled = [bool(g.norm_limits) for g in groups]
        for i, g in enumerate(groups):
            if g.norm_limits and len(g.norm_limits) != g.num_modules:
                raise ValueError(
                    f"groups[{g.name}].norm_limits: expected {g.num_modules} values, got {len(g.norm_limits)}"
                )
            self.register_buffer(f"limits_{i}", torch.tensor(g.norm_limits or [0.0]), persistent=False)

    def apply(self, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cap_delta_norm(a, b, getattr(self, f"limits_{i}")) if self.enabled[i] else b


class AdapterGenerator(nn.Module):
    """What export and training rely on: centroids [K, D] in, one (A, B) pair per target group out,
    named as the artifact's ONNX outputs. The hyper-network and the static-LoRA baseline share it."""

    uses_statistic = True  # False: the output ignores the centroids (training then skips the statistic)

    def __init__(self, config: HyperNetworkConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def output_names(self) -> list[str]:
        return [name for g in self.config.groups for name in (f"A:{g.name}", f"B:{g.name}")]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


KINDS = ("full", "mixture")
ROUTINGS = ("distance", "table", "classifier", "predicted-label", "pseudo-label")
# Routings that fit a classifier (to the training labels, or to k-means groups for "pseudo-label") and
# serve without labels.
LABEL_ROUTINGS = ("classifier", "predicted-label", "pseudo-label")
# Routings whose router sees only the predicted class, one-hot: the sidecar groups a batch by that class.
ONE_HOT_ROUTINGS = ("predicted-label", "pseudo-label")


def pseudo_label_names(count: int) -> tuple[str, ...]:
    """The classes of a pseudo-label router: one per routed basis, so each group can own a basis."""
    return tuple(f"group-{i:02d}" for i in range(count))


def emitted_rank(kind: str, rank: int, bases: int) -> int:
    """The rank of the adapters a generator emits: a mixture puts its `bases` LoRAs of rank `rank` side
    by side; the paper's generator emits rank `rank`."""
    return rank * bases if kind == "mixture" else rank


def check_kind(config: HyperNetworkConfig) -> None:
    """Refuse an unknown kind, or mixture bases that do not divide the rank, before building anything."""
    if config.kind not in KINDS:
        raise ValueError(f"kind: got {config.kind!r}, expected one of {', '.join(KINDS)}")
    m = config.bases
    if (
        isinstance(m, bool)
        or not isinstance(m, int)
        or m < 1
        or (config.kind == "mixture" and config.rank % m)
    ):
        raise ValueError(f"bases: expected a positive divisor of rank {config.rank}, got {m!r}")
    s = config.shared_bases
    if isinstance(s, bool) or not isinstance(s, int) or s < 0 or (config.kind == "mixture" and s >= m):
        raise ValueError(f"shared_bases: expected an integer in 0..{m - 1} (bases - 1), got {s!r}")
    if config.kind != "mixture" and s:
        raise ValueError(f"shared_bases: only a mixture has bases to share; expected 0, got {s!r}")
    f = config.fallback_bases
    if isinstance(f, bool) or not isinstance(f, int) or f < 0 or (f and s + f >= m):
        raise ValueError(
            f"fallback_bases: expected an integer in 0..{max(0, m - s - 1)} (bases - shared_bases - 1), "
            f"got {f!r}"
        )
    if f and (config.kind != "mixture" or config.routing not in LABEL_ROUTINGS):
        raise ValueError(
            f"fallback_bases: only a mixture with a label router ({', '.join(LABEL_ROUTINGS)}) knows when it "
            f"is unsure; expected 0, got {f!r}"
        )
    if not 0.0 <= config.fallback_threshold <= 1.0:
        raise ValueError(
            f"fallback_threshold: expected a probability in [0, 1], got {config.fallback_threshold!r}"
        )
    if not config.routing_sharpness > 0:
        raise ValueError(f"routing_sharpness: expected a positive number, got {config.routing_sharpness!r}")
    if config.routing not in ROUTINGS:
        raise ValueError(f"routing: got {config.routing!r}, expected one of {', '.join(ROUTINGS)}")
    if config.kind != "mixture" and config.routing != "distance":
        raise ValueError(f"routing: only a mixture routes; expected 'distance', got {config.routing!r}")
    labels = config.labels
    if config.routing in LABEL_ROUTINGS:
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) for x in labels):
            raise ValueError(
                f"labels: routing {config.routing!r} needs at least 2 distinct label names, got {labels!r}"
            )
    elif labels:
        raise ValueError(
            f"labels: only routings {', '.join(LABEL_ROUTINGS)} use labels; expected (), got {labels!r}"
        )


def standardisation(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread of training rows [N, D], as a router standardises its input: raw statistics
    point in nearly one direction, so distances mean little before this."""
    return rows.mean(0), rows.std(0).clamp_min(1e-6)


def fit_prototypes(x: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """`count` prototypes [count, D] of standardised rows `x`: the service's k-means (cosine), member
    means; random rows fill in when there are fewer distinct rows than prototypes."""
    groups = torch.from_numpy(kmeans_groups(x, count, seed))
    prototypes = torch.stack([x[groups == j].mean(0) for j in torch.unique(groups)])
    if prototypes.shape[0] < count:
        extra = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))]
        prototypes = torch.cat([prototypes, extra[: count - prototypes.shape[0]]])
    return prototypes


def kmeans_groups(x: torch.Tensor, count: int, seed: int = 0):
    """Each standardised row's group [N] under the service's k-means (cosine) with `count` groups."""
    from adapter_service.core.clustering import FixedK, cluster

    return cluster(x.numpy(), FixedK(count), seed=seed).assignments


def pseudo_labels(x: torch.Tensor, names: Sequence[str], seed: int = 0) -> list[str]:
    """Each standardised row's k-means group (one group per name), as a label."""
    return [names[int(g)] for g in kmeans_groups(x, len(names), seed)]


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int = 0) -> nn.Linear:
    """A multinomial logistic regression of `y` [N] on standardised rows `x` [N, D] (full-batch Adam,
    lr 1e-2, weight decay 1e-3, 300 steps, seeded): the classifier router's fit, and the grouping
    benchmark's measure of how well any linear router could tell the labels apart."""
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        bound = 1.0 / x.shape[1] ** 0.5
        probe.weight.uniform_(-bound, bound, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(probe(x), y).backward()
            optimizer.step()
    return probe.requires_grad_(False)


def build_network(config: HyperNetworkConfig) -> AdapterGenerator:
    """The generator named by `config.kind`."""
    check_kind(config)
    return (HyperNetwork if config.kind == "full" else MixtureHyperNetwork)(config)


class HyperNetwork(AdapterGenerator):
    """centroids [K, D] -> (A_g [K, L_g, r, d_in], B_g [K, L_g, d_out, r]) for each group g."""

    def __init__(self, config: HyperNetworkConfig) -> None:
        super().__init__(config)
        if config.init not in ("zero", "random"):
            raise ValueError(f"init: got {config.init!r}, expected 'zero' or 'random'")
        h, r = config.hidden, config.rank
        self.trunk = nn.Sequential(nn.Linear(config.stat_dim, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.layer_embeddings = nn.ParameterList(
            [nn.Parameter(torch.randn(g.num_modules, h) * 0.02) for g in config.groups]
        )
        self.heads_a = nn.ModuleList([nn.Linear(h, r * g.d_in) for g in config.groups])
        self.heads_b = nn.ModuleList([nn.Linear(h, g.d_out * r) for g in config.groups])
        for group, head_a, head_b in zip(config.groups, self.heads_a, self.heads_b, strict=True):
            # A's rows then have the scale of a Kaiming-initialised LoRA A (about 1/sqrt(d_in)).
            nn.init.normal_(head_a.weight, std=1.0 / (group.d_in**0.5 * h**0.5))
            nn.init.normal_(head_a.bias, std=1.0 / group.d_in**0.5)
            if config.init == "zero":
                nn.init.zeros_(head_b.weight)
                nn.init.zeros_(head_b.bias)
            else:
                nn.init.normal_(head_b.weight, std=0.02 / h**0.5)
                nn.init.normal_(head_b.bias, std=0.02)
        self.caps = DeltaNormCaps(config.groups)

    def forward(self, centroids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = centroids.shape[0]
        r = self.config.rank
        z = self.trunk(centroids)
        outputs: list[torch.Tensor] = []
        for i, (group, emb, head_a, head_b) in enumerate(
            zip(self.config.groups, self.layer_embeddings, self.heads_a, self.heads_b, strict=True)
        ):
            u = nn.functional.gelu(z[:, None, :] + emb[None, :, :])  # [K, L, h]
            a = head_a(u).reshape(k, group.num_modules, r, group.d_in)
            b = head_b(u).reshape(k, group.num_modules, group.d_out, r)
            outputs += [a, self.caps.apply(i, a, b)]
        return tuple(outputs)


class MixtureHyperNetwork(AdapterGenerator):
    """centroids [K, D] -> a soft mixture of `bases` learned LoRAs, emitted as one rank-`rank` LoRA.

    weights = bases * softmax(-||x - p_m||^2 / t), with x the standardised centroid, p_m learned
    prototypes and t a learned temperature; A = [A_1; ...; A_M], B = [w_1 B_1, ..., w_M B_M]. Uniform
    weights make it a static LoRA of rank `rank`: all it adds over one is the routing. With
    `shared_bases` S, the first S bases always have weight 1 and the softmax (scaled to M - S) routes
    the rest: a static LoRA plus routed ones, so routing only has to add to what a static LoRA does. Call
    `fit_statistics` with the training statistics before training; the fitted mean, spread and
    prototypes live in the state dict and in the exported graph.

    `routing="table"`: the prototypes stay at their k-means centroids, and the nearest one picks a row
    of a learned [prototypes, routed] logit table, started at the distance router's logits at each
    prototype. Every request of one group gets exactly the same weights, as the label oracle's one-hot
    rows did, with groups found without labels.

    `routing="classifier"`: the label oracle's router with predicted labels. A linear classifier of the
    standardised statistic is fitted once to the training labels (`fit_statistics(..., labels=)`) and
    frozen; distance routing then runs on its standardised label probabilities, as the oracle's ran on
    one-hot labels. Labels are needed at training time only: the exported graph takes the statistic.

    `routing="predicted-label"`: the same classifier, but the router sees only its predicted label,
    one-hot, exactly as the oracle saw the true one: every request the classifier puts in a domain gets
    that domain's adapter, however unsure the classifier was.

    `routing="pseudo-label"`: predicted-label routing with no labels anywhere. The classes are the
    k-means groups of the standardised training statistics (one per routed basis, `pseudo_label_names`),
    found once before training; the classifier learns them, and training and serving go on exactly as
    with true labels, so a batch is served one adapter per group.
    """

    def __init__(self, config: HyperNetworkConfig) -> None:
        super().__init__(config)
        check_kind(config)
        m = config.bases
        if config.init not in ("zero", "random"):
            raise ValueError(f"init: got {config.init!r}, expected 'zero' or 'random'")
        r = config.rank // m
        d = config.stat_dim
        self.routed = m - config.shared_bases - config.fallback_bases
        self.register_buffer("stat_mean", torch.zeros(d))
        self.register_buffer("stat_scale", torch.ones(d))
        self.classifier = None
        if config.routing in LABEL_ROUTINGS:
            self.classifier = nn.Linear(d, len(config.labels)).requires_grad_(False)
            d = len(config.labels)  # the router's input: label probabilities (or one-hot), standardised
            self.register_buffer("label_mean", torch.zeros(d))
            self.register_buffer("label_scale", torch.ones(d))
        self.prototypes = nn.Parameter(torch.randn(self.routed, d))
        self.log_temperature = nn.Parameter(torch.tensor(float(d) ** 0.5).log())
        self.table = None
        if config.routing == "table":  # argmin passes no gradient: the prototypes stay where k-means put them
            self.prototypes.requires_grad_(False)
            self.log_temperature.requires_grad_(False)
            self.table = nn.Parameter(torch.zeros(self.routed, self.routed))
        self.a = nn.ParameterList(
            [nn.Parameter(torch.randn(g.num_modules, m, r, g.d_in) / g.d_in**0.5) for g in config.groups]
        )
        b_std = 0.0 if config.init == "zero" else 0.02
        self.b = nn.ParameterList(
            [nn.Parameter(torch.randn(g.num_modules, g.d_out, m, r) * b_std) for g in config.groups]
        )
        self.caps = DeltaNormCaps(config.groups)

    @torch.no_grad()
    def fit_statistics(
        self, stats: torch.Tensor, seed: int = 0, labels: Sequence[str | None] | None = None
    ) -> None:
        """Standardise with the training statistics; prototypes start at their k-means centroids, and the
        temperature gives the nearest prototype a mean logit lead of `routing_sharpness` over the second.
        A classifier router is first fitted to `labels` (one per row); other routers ignore them."""
        stats = stats.detach().float().cpu()
        if stats.ndim != 2 or stats.shape[1] != self.config.stat_dim:
            raise ValueError(f"stats: expected [N, {self.config.stat_dim}], got {list(stats.shape)}")
        routed = self.routed
        if stats.shape[0] < routed:
            raise ValueError(
                f"stats: need at least {routed} rows (one per routed basis), got {stats.shape[0]}"
            )
        for buffer, value in zip((self.stat_mean, self.stat_scale), standardisation(stats), strict=True):
            buffer.copy_(value)
        if self.classifier is not None:
            standardised = (stats - self.stat_mean) / self.stat_scale
            if self.config.routing == "pseudo-label":
                labels = pseudo_labels(standardised, self.config.labels, seed)
            self._fit_classifier(standardised, labels, seed)
        x = self.router_input(stats)
        prototypes = fit_prototypes(x, routed, seed)
        self.prototypes.copy_(prototypes)
        nearest = torch.cdist(x, prototypes).pow(2).topk(min(2, len(prototypes)), largest=False).values
        gap = (nearest[:, -1] - nearest[:, 0]).mean() if len(prototypes) > 1 else nearest.mean()
        self.log_temperature.copy_((gap / self.config.routing_sharpness).clamp_min(1e-6).log())
        if self.table is not None:
            self.table.copy_(-torch.cdist(prototypes, prototypes).pow(2) / self.log_temperature.exp())

    def _fit_classifier(self, x: torch.Tensor, labels: Sequence[str | None] | None, seed: int) -> None:
        """Fit the classifier on standardised rows `x`, and the standardisation of its probabilities."""
        names = self.config.labels
        if labels is None or len(labels) != x.shape[0] or any(label not in names for label in labels):
            found = sorted({str(label) for label in labels or ()})
            raise ValueError(
                f"labels: routing {self.config.routing!r} needs one label from {list(names)} per "
                f"training row ({x.shape[0]} rows), got {len(labels or ())} labels with values {found[:8]}"
            )
        y = torch.tensor([names.index(label) for label in labels])
        self.classifier.load_state_dict(fit_linear_probe(x, y, len(names), seed).state_dict())
        p = self._classify(x)
        for buffer, value in zip((self.label_mean, self.label_scale), standardisation(p), strict=True):
            buffer.copy_(value)

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's label probabilities of standardised rows, or its predicted label one-hot
        (a comparison with the row maximum rather than argmax + one_hot: plain ops in the ONNX graph)."""
        p = torch.softmax(self.classifier(x), dim=-1)
        if self.config.routing in ONE_HOT_ROUTINGS:
            p = (p == p.amax(dim=-1, keepdim=True)).to(p.dtype)
        return p

    def confidence(self, centroids: torch.Tensor) -> torch.Tensor:
        """[K] the label router's top label probability: how sure it is of the class it routes by."""
        if self.classifier is None:
            raise ValueError(f"routing {self.config.routing!r} has no classifier to be sure or unsure")
        x = (centroids - self.stat_mean) / self.stat_scale
        return torch.softmax(self.classifier(x), dim=-1).amax(dim=-1)

    def router_input(self, centroids: torch.Tensor) -> torch.Tensor:
        """What the prototypes are compared with: the standardised statistic, or a label router's
        standardised label probabilities (or predicted label) of it."""
        x = (centroids - self.stat_mean) / self.stat_scale
        if self.classifier is None:
            return x
        return (self._classify(x) - self.label_mean) / self.label_scale

    def weights(self, centroids: torch.Tensor) -> torch.Tensor:
        """[K, bases] basis weights (the routed ones summing to their number; the shared ones are 1; an
        unsure request's are 1 on the fallback bases and 0 elsewhere)."""
        x = self.router_input(centroids)
        distance = (x[:, None, :] - self.prototypes[None, :, :]).pow(2).sum(-1)
        if self.table is None:
            logits = -distance / self.log_temperature.exp()
        else:
            logits = self.table[distance.argmin(dim=-1)]
        routed = self.routed * torch.softmax(logits, dim=-1)
        if self.config.shared_bases:
            routed = torch.cat([routed.new_ones(routed.shape[0], self.config.shared_bases), routed], dim=-1)
        if not self.config.fallback_bases:
            return routed
        unsure = (self.confidence(centroids) < self.config.fallback_threshold).to(routed.dtype)[:, None]
        fallback = unsure.expand(-1, self.config.fallback_bases)
        return torch.cat([routed * (1.0 - unsure), fallback], dim=-1)

    def unweighted_b(self) -> tuple[torch.Tensor, ...]:
        """Per group, B with every basis at weight 1 [L, d_out, rank]: what the compact wire form sends
        once, so a cluster is then just its weights (artifact.MixtureLayout)."""
        return tuple(b.reshape(b.shape[0], b.shape[1], -1) for b in self.b)

    def forward(self, centroids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = centroids.shape[0]
        w = self.weights(centroids)  # [K, M]
        outputs: list[torch.Tensor] = []
        for i, (group, a, b) in enumerate(zip(self.config.groups, self.a, self.b, strict=True)):
            layers, m, r, d_in = a.shape
            a_out = a.reshape(layers, m * r, d_in).unsqueeze(0).expand(k, layers, m * r, d_in)
            b_out = (b.unsqueeze(0) * w[:, None, None, :, None]).reshape(k, layers, group.d_out, m * r)
            outputs += [a_out, self.caps.apply(i, a_out, b_out)]
        return tuple(outputs)
