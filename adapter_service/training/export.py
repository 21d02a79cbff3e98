"""Write hyper-network artifacts: torch module -> ONNX (dynamic K) -> verified against torch -> files.

Refuses to write an artifact whose onnxruntime outputs differ from torch's by more than 1e-5
relative (max |ort - torch| / max |torch| per output, fp32): the service must serve exactly what
was trained.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapter_service import __version__
from adapter_service.core.artifact import (
    CENTROIDS_INPUT,
    Artifact,
    Manifest,
    MixtureLayout,
    StatisticSpec,
    TargetGroup,
    write_artifact,
)
from adapter_service.models.spec import find_targets, fingerprint, group_targets
from adapter_service.models.statistics import parse_statistic, statistic_dim
from adapter_service.serving.runtime import create_session
from adapter_service.training.hypernetwork import (
    ONE_HOT_ROUTINGS,
    AdapterGenerator,
    GroupShape,
    HyperNetworkConfig,
    MixtureHyperNetwork,
    build_network,
    check_kind,
)

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-5
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ExportError(Exception):
    pass


@dataclass(frozen=True)
class ExportPlan:
    """Everything an artifact needs besides the trained weights."""

    manifest_base: dict
    hypernetwork_config: HyperNetworkConfig
    group_modules: dict[str, list[str]]


def load_model(model: str | os.PathLike[str]) -> torch.nn.Module:
    """A causal LM from a local HF directory, a config.json, the preset `smollm2-135m-instruct`, a
    `.gguf` file, or a hub id (for users who are online).

    A directory or file with a config but no weights is built on the meta device: shapes only,
    no memory, and the fingerprint then carries no weights hash. The preset and GGUF files load as
    `load_causal_lm` loads them (the same dense weights, so the same fingerprint as train and serve).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapter_service.models.loading import PRESETS, load_causal_lm

    path = Path(model).expanduser()
    if os.fspath(model) in PRESETS or path.suffix.lower() == ".gguf":
        return load_causal_lm(model)[0]
    if path.is_file() and path.suffix == ".json":
        config = AutoConfig.for_model(**json.loads(path.read_text()))
        return _meta_model(config)
    if path.is_dir() and not any((path / f).exists() for f in WEIGHT_FILES):
        return _meta_model(AutoConfig.from_pretrained(path))
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


def _meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_export(
    model: torch.nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float | None = None,
    hidden: int = 64,
    init: str = "zero",
    max_delta_norm: float | None = None,
    statistic: str = "embedding",
    kind: str = "full",
    bases: int = 1,
    routing_sharpness: float = 0.3,
    shared_bases: int = 0,
    routing: str = "distance",
    labels: Sequence[str] = (),
) -> ExportPlan:
    """`max_delta_norm` c caps every emitted delta at ||s B A||_F <= c ||W||_F (needs real weights).
    `statistic`: `embedding` (mean input embedding), `hidden:L` (mean hidden state after layer L of the
    base model: with targets only after L a server could read it off its own prefill; with targets at
    or before L it needs a separate pass of the first L layers, which `chameleon_torch` always runs) or
    `encoder[:NAME]` (a sentence encoder's embedding of the prompt text; statistics.py).
    `kind`/`bases`: the generator (hypernetwork.build_network); `rank` is the emitted rank. `labels`:
    the training data's label names, for a mixture routed by a label classifier (`routing`)."""
    if rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank}")
    if max_delta_norm is not None and not max_delta_norm > 0:
        raise ValueError(f"max_delta_norm: expected a positive number or None, got {max_delta_norm}")
    stat_kind, params = parse_statistic(statistic)
    found = find_targets(model, targets)
    stat_dim = statistic_dim(model, StatisticSpec(kind=stat_kind, dim=1, params=params))
    groups = group_targets(found)
    fp = fingerprint(model)
    alpha = float(alpha if alpha is not None else 2 * rank)
    scaling = alpha / rank

    def limits(members) -> tuple[float, ...]:
        if max_delta_norm is None:
            return ()
        weights = [model.get_submodule(m.name).weight for m in members]
        if any(w.is_meta for w in weights):
            raise ValueError(
                "max_delta_norm: the cap is relative to the base weights; load the model's weights"
            )
        return tuple(float(max_delta_norm * w.detach().float().norm() / scaling) for w in weights)

    config = HyperNetworkConfig(
        stat_dim=stat_dim,
        groups=tuple(
            GroupShape(name, ms[0].d_in, ms[0].d_out, len(ms), limits(ms)) for name, ms in groups.items()
        ),
        rank=rank,
        hidden=hidden,
        init=init,
        max_delta_norm=max_delta_norm,
        kind=kind,
        bases=bases,
        routing_sharpness=routing_sharpness,
        shared_bases=shared_bases,
        routing=routing,
        labels=tuple(labels),
    )
    check_kind(config)
    manifest_base = {
        "base_model": fp,
        "statistic": StatisticSpec(kind=stat_kind, dim=stat_dim, normalization="l2", params=params),
        "rank": rank,
        "scaling": scaling,
    }
    return ExportPlan(manifest_base, config, {name: [m.name for m in ms] for name, ms in groups.items()})


def export_artifact(
    network: AdapterGenerator, plan: ExportPlan, out: str | os.PathLike[str], facts: dict | None = None
) -> Artifact:
    """Export `network` to ONNX, check onnxruntime against torch, and write the artifact."""
    network = network.eval()
    mixture = None
    if compact_form_exact(network):
        network = WithMixtureOutputs(network)
        mixture = network.layout
    onnx_bytes = to_onnx(network)
    error = parity_error(network, onnx_bytes)
    if error > PARITY_TOLERANCE:
        raise ExportError(
            f"onnxruntime differs from torch by {error:.2e} relative (limit {PARITY_TOLERANCE:.0e}); "
            "artifact not written"
        )
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    config = network.config
    groups = tuple(
        TargetGroup(g.name, g.d_in, g.d_out, tuple(plan.group_modules[g.name]), f"A:{g.name}", f"B:{g.name}")
        for g in config.groups
    )
    manifest = Manifest(
        artifact_id=f"{plan.manifest_base['base_model'].architecture}-r{config.rank}-{sha[:12]}",
        groups=groups,
        hypernetwork_sha256=sha,
        hypernetwork={
            "config": config.to_json(),
            "parameters": network.num_parameters(),
            "onnx_parity_max_rel_error": error,
            **(facts or {}),
        },
        created_by=f"chameleon-adapters {__version__}",
        mixture=mixture,
        declared_grouping="predicted-label"
        if mixture is not None and config.routing in ONE_HOT_ROUTINGS
        else "policy",
        # the network's own rank: a fallback adapter installed after planning adds to it
        **{**plan.manifest_base, "rank": config.rank},
    )
    return write_artifact(out, manifest, onnx_bytes)


def compact_form_exact(network: AdapterGenerator) -> bool:
    """A mixture's adapters are its bases and per-cluster weights, unless a delta-norm cap rescales
    each cluster's B by a factor of its own (then only whole adapters are exact)."""
    return isinstance(network, MixtureHyperNetwork) and not any(g.norm_limits for g in network.config.groups)


class WithMixtureOutputs(AdapterGenerator):
    """The mixture as exported: its adapters, then the weights and unweighted B that the service's
    compact wire form is made of (artifact.MixtureLayout). Training never sees this wrapper."""

    def __init__(self, network: MixtureHyperNetwork) -> None:
        super().__init__(network.config)
        self.network = network
        self.layout = MixtureLayout(
            bases=network.config.bases,
            weights_output="mixture_weights",
            basis_b_outputs=tuple(f"basis_B:{g.name}" for g in network.config.groups),
        )

    @property
    def output_names(self) -> list[str]:
        return [*self.network.output_names, self.layout.weights_output, *self.layout.basis_b_outputs]

    def forward(self, centroids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A zero-cost dependence on the input makes the constant B's node outputs, not bare initializers
        # (which the exporter's optimiser warns about).
        anchor = centroids[:1, :1].sum() * 0.0
        basis_b = tuple(b + anchor for b in self.network.unweighted_b())
        return (*self.network(centroids), self.network.weights(centroids), *basis_b)


def to_onnx(network: AdapterGenerator) -> bytes:
    """ONNX with a dynamic cluster axis K, as one self-contained file."""
    example = torch.nn.functional.normalize(torch.randn(3, network.config.stat_dim), dim=-1)
    k = torch.export.Dim("K", min=1, max=4096)
    with warnings.catch_warnings(), _quiet("torch.onnx"), _quiet("onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network,
            (example,),
            input_names=[CENTROIDS_INPUT],
            output_names=network.output_names,
            dynamic_shapes=({0: k},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    buffer = io.BytesIO()
    program.save(buffer)
    return _strip_source_locations(buffer.getvalue())


def _strip_source_locations(onnx_bytes: bytes) -> bytes:
    """Drop the exporter's per-node stack traces: they embed this machine's file paths, so the same
    network exported from two checkouts would hash differently."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return model.SerializeToString()


def parity_error(network: AdapterGenerator, onnx_bytes: bytes, ks: Sequence[int] = (1, 5)) -> float:
    """Largest normwise relative error between torch and onnxruntime over a few K."""
    session = create_session(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in ks:
        centroids = torch.nn.functional.normalize(
            torch.randn(k, network.config.stat_dim, generator=generator), dim=-1
        )
        with torch.no_grad():
            expected = [t.numpy() for t in network(centroids)]
        actual = session.run(network.output_names, {CENTROIDS_INPUT: centroids.numpy()})
        for want, got in zip(expected, actual, strict=True):
            if want.shape != got.shape or not (np.isfinite(want).all() and np.isfinite(got).all()):
                return float("inf")  # a network emitting NaN/Inf is never exported
            scale = max(float(np.abs(want).max()), 1e-30)
            worst = max(worst, float(np.abs(got - want).max()) / scale)
    return worst


def make_fresh_artifact(
    model: str | os.PathLike[str] | torch.nn.Module,
    targets: Sequence[str],
    rank: int,
    out: str | os.PathLike[str],
    *,
    alpha: float | None = None,
    hidden: int = 64,
    init: str = "zero",
    seed: int = 0,
    statistic: str = "embedding",
) -> Artifact:
    """An artifact from a freshly initialised (untrained) hyper-network for `model`."""
    module = load_model(model) if not isinstance(model, torch.nn.Module) else model
    plan = plan_export(module, targets, rank, alpha=alpha, hidden=hidden, init=init, statistic=statistic)
    torch.manual_seed(seed)
    network = build_network(plan.hypernetwork_config)
    return export_artifact(network, plan, out, facts={"trained": False, "seed": seed})


class _quiet:
    """Silence a chatty logger for the duration of a block."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
