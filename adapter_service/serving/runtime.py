"""Runs an artifact's hyper-network in onnxruntime: all K centroids of a call in one session run.

The CUDA execution provider is used when onnxruntime-gpu offers it, the CPU one otherwise.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

import numpy as np

from adapter_service.core.artifact import CENTROIDS_INPUT, Artifact, ArtifactError
from adapter_service.core.compact import weighted_b

log = logging.getLogger(__name__)
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def import_onnxruntime():
    """Import onnxruntime after checking exactly one of its builds is installed (they share a folder)."""
    installed = []
    for dist in _ORT_DISTRIBUTIONS:
        try:
            importlib.metadata.version(dist)
            installed.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if not installed:
        raise RuntimeError(
            "onnxruntime is not installed; expected `pip install 'chameleon-adapters[cpu]'` "
            "(or `[gpu]` on a CUDA host)"
        )
    if len(installed) > 1:
        raise RuntimeError(
            "both onnxruntime and onnxruntime-gpu are installed and overwrite each other's files; "
            "expected exactly one: `pip uninstall -y onnxruntime onnxruntime-gpu` then reinstall one"
        )
    import onnxruntime

    return onnxruntime


def create_session(onnx_bytes: bytes, providers: list[str] | None = None, threads: int = 0):
    """An InferenceSession on the best available provider (CUDA when present, else CPU)."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers)


@dataclass(frozen=True)
class GroupOutput:
    a: np.ndarray  # [K, L, r, d_in]
    b: np.ndarray  # [K, L, d_out, r]


@dataclass(frozen=True)
class MixtureBases:
    """A mixture's shared factors per group: what the compact wire form sends once."""

    a: np.ndarray  # [L, r, d_in], the same for every cluster
    b: np.ndarray  # [L, d_out, r], every basis at weight 1


class HyperNetworkRuntime:
    """One loaded artifact; `generate` is thread-safe (onnxruntime sessions are).

    For a mixture artifact (manifest.mixture), `bases` holds its shared factors and `mixture_weights`
    gives each centroid's basis weights: the compact wire form (compact.py)."""

    def __init__(self, artifact: Artifact, providers: list[str] | None = None, threads: int = 0) -> None:
        self.artifact = artifact
        self.manifest = artifact.manifest
        import_onnxruntime()  # its errors say how to install; they are not the artifact's fault
        try:
            self.session = create_session(artifact.onnx_bytes, providers, threads)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
            raise ArtifactError(
                f"{artifact.path}: onnxruntime cannot load hypernetwork.onnx ({exc})"
            ) from exc
        self.providers = self.session.get_providers()
        self._check_signature()
        self.bases: dict[str, MixtureBases] | None = None
        self._weights_session = None
        if self.manifest.mixture is not None:
            self.bases, self._weights_session = self._load_mixture(providers, threads)

    def generate(self, centroids: np.ndarray) -> dict[str, GroupOutput]:
        """centroids [K, D] float32 -> per group name, A and B stacked over clusters and modules."""
        outputs = self.session.run(
            self._output_names, {CENTROIDS_INPUT: np.ascontiguousarray(centroids, np.float32)}
        )
        result = {}
        for i, group in enumerate(self.manifest.groups):
            result[group.name] = GroupOutput(a=outputs[2 * i], b=outputs[2 * i + 1])
        return result

    def mixture_weights(self, centroids: np.ndarray) -> np.ndarray:
        """centroids [K, D] -> [K, bases] float32 basis weights (mixture artifacts only)."""
        if self.manifest.mixture is None:
            raise ValueError(f"artifact {self.manifest.artifact_id} is not a mixture with a compact form")
        (weights,) = self._weights_session.run(
            [self.manifest.mixture.weights_output],
            {CENTROIDS_INPUT: np.ascontiguousarray(centroids, np.float32)},
        )
        return weights

    def _load_mixture(self, providers: list[str] | None, threads: int):
        """The mixture's shared factors, read once, and a session for its weights alone; refuses an
        artifact whose compact form would not rebuild exactly the adapters its graph emits.

        The weights session runs the graph cut down to the nodes the weights need: onnxruntime runs
        every node of a session, so asking the whole graph for the weights alone would still build every
        cluster's A and B (measured: 114 ms against 0.6 ms for 32 clusters at rank 48 on 60 modules)."""
        import onnx
        from onnx.utils import Extractor

        layout = self.manifest.mixture
        names = {o.name for o in self.session.get_outputs()}
        missing = [n for n in (layout.weights_output, *layout.basis_b_outputs) if n not in names]
        if missing:
            raise ArtifactError(
                f"hypernetwork.onnx: mixture outputs {missing} named in the manifest are missing"
            )
        probe = np.zeros((2, self.manifest.statistic.dim), np.float32)
        probe[1, 0] = 1.0
        wanted = [*self._output_names, layout.weights_output, *layout.basis_b_outputs]
        outputs = self.session.run(wanted, {CENTROIDS_INPUT: probe})  # one run of the whole graph
        n = len(self._output_names)
        weights, basis_b = outputs[n], outputs[n + 1 :]
        if weights.shape != (2, layout.bases):
            raise ArtifactError(
                f"hypernetwork.onnx: {layout.weights_output} is {list(weights.shape)}, "
                f"expected [K, {layout.bases}]"
            )
        bases = {}
        for i, (group, b) in enumerate(zip(self.manifest.groups, basis_b, strict=True)):
            a_out, b_out = outputs[2 * i], outputs[2 * i + 1]
            rebuilt = weighted_b(b[None], weights[:, None, :])
            scale = max(float(np.abs(b_out).max()), 1e-30)
            if (
                b.shape != b_out.shape[1:]
                or not np.array_equal(a_out[0], a_out[1])
                or float(np.abs(rebuilt - b_out).max()) / scale > 1e-5
            ):
                raise ArtifactError(
                    f"hypernetwork.onnx: group {group.name!r}: the mixture's bases and weights do not "
                    "rebuild the adapters the graph emits; the manifest's mixture layout is wrong"
                )
            bases[group.name] = MixtureBases(a=a_out[0], b=b)
        graph = onnx.load_from_string(self.artifact.onnx_bytes)
        pruned = Extractor(graph).extract_model([CENTROIDS_INPUT], [layout.weights_output])
        session = create_session(pruned.SerializeToString(), providers, threads)
        if not np.array_equal(session.run(None, {CENTROIDS_INPUT: probe})[0], weights):
            raise ArtifactError("hypernetwork.onnx: the mixture weights differ once the graph is cut down")
        return bases, session

    @property
    def _output_names(self) -> list[str]:
        return [name for g in self.manifest.groups for name in (g.output_a, g.output_b)]

    def _check_signature(self) -> None:
        """Fail at load, not at the first request, when graph and manifest disagree."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        if CENTROIDS_INPUT not in inputs or len(inputs) != 1:
            raise ArtifactError(
                f"hypernetwork.onnx: expected one input {CENTROIDS_INPUT!r}, got {list(inputs)}"
            )
        dim = inputs[CENTROIDS_INPUT].shape[-1]
        if dim != self.manifest.statistic.dim:
            raise ArtifactError(
                f"hypernetwork.onnx: input dimension {dim} does not match "
                f"statistic.dim {self.manifest.statistic.dim}"
            )
        names = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self._output_names if n not in names]
        if missing:
            raise ArtifactError(f"hypernetwork.onnx: outputs {missing} named in the manifest are missing")
        probe = self.generate(np.zeros((1, self.manifest.statistic.dim), np.float32))
        r = self.manifest.rank
        for group in self.manifest.groups:
            n = len(group.modules)
            out = probe[group.name]
            if out.a.shape != (1, n, r, group.d_in) or out.b.shape != (1, n, group.d_out, r):
                raise ArtifactError(
                    f"hypernetwork.onnx: group {group.name!r} emits A{list(out.a.shape)} "
                    f"B{list(out.b.shape)}, expected A[1, {n}, {r}, {group.d_in}] "
                    f"B[1, {n}, {group.d_out}, {r}]"
                )
