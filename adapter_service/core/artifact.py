"""The hyper-network artifact: a directory with `hypernetwork.onnx` and `manifest.json`.

Nothing in it is executable Python or pickled: the manifest is strict JSON, the network is ONNX, and
the manifest records the sha256 of the ONNX file, so a corrupt or swapped file is refused at load.
The artifact's own sha256 is taken over the canonical manifest (which pins the ONNX hash), so one
hash names the whole artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "chameleon-hypernetwork"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "hypernetwork.onnx"
CENTROIDS_INPUT = "centroids"
INT64_MAX = 2**63 - 1  # the wire's integers (Manifest, TargetModule) are int64
FLOAT32_MAX = 3.4028234663852886e38  # Manifest.scaling is a float32 on the wire


class ArtifactError(Exception):
    """The artifact cannot be used: missing, corrupt, or not matching its manifest."""


@dataclass(frozen=True)
class Fingerprint:
    """The base model the hyper-network was made for; `weights_sha256` empty = shape only.

    `weights_sha256_by_dtype` holds the embedding table's hash after rounding to "bfloat16" and
    "float16", so a model served in those dtypes from the same weights is recognised too.
    """

    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    weights_sha256: str = ""
    weights_sha256_by_dtype: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def accepts_weights(self, sha256_as_float32: str, dtype: str) -> bool:
        """True when a model whose embedding table, upcast to float32, hashes to `sha256_as_float32`
        and is held in `dtype` ("float32", "bfloat16", "float16") has this fingerprint's weights."""
        return sha256_as_float32 == self.weights_sha256 or (
            sha256_as_float32 == self.weights_sha256_by_dtype.get(dtype, "")
        )


@dataclass(frozen=True)
class StatisticSpec:
    """How callers must compute a request's statistic (see adapter_service.models.statistics)."""

    kind: str
    dim: int
    normalization: str = "l2"
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetGroup:
    """Target modules of one type and shape; the ONNX graph emits A and B stacked over `modules`.

    Outputs: `output_a` [K, len(modules), rank, d_in], `output_b` [K, len(modules), d_out, rank].
    """

    name: str
    d_in: int
    d_out: int
    modules: tuple[str, ...]
    output_a: str
    output_b: str


@dataclass(frozen=True)
class MixtureLayout:
    """Extra ONNX outputs of a mixture generator, so the service can send it compactly: every cluster's
    A is the same, and its B is the unweighted B with column block m scaled by the cluster's weight m.

    `weights_output` [K, bases]; `basis_b_outputs`, one per group in order, [len(modules), d_out, rank].
    """

    bases: int
    weights_output: str
    basis_b_outputs: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    artifact_id: str
    base_model: Fingerprint
    statistic: StatisticSpec
    rank: int
    scaling: float
    groups: tuple[TargetGroup, ...]
    hypernetwork_sha256: str
    hypernetwork: dict[str, Any] = field(default_factory=dict)  # architecture and training facts
    created_by: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    mixture: MixtureLayout | None = None  # absent: adapters are only sent whole
    # The manifest's "grouping" field; None for artifacts written before it existed (see `grouping`).
    declared_grouping: str | None = None

    @property
    def targets(self) -> list[tuple[str, int, int]]:
        """(module name, d_in, d_out) for every target module, in output order."""
        return [(m, g.d_in, g.d_out) for g in self.groups for m in g.modules]

    @property
    def grouping(self) -> str:
        """How Adapt groups a batch: "policy" (the caller's clustering policy) or "predicted-label" (one
        group per label the artifact's router predicts, whatever the policy asks). Artifacts older than
        the field group as their router implies."""
        if self.declared_grouping is not None:
            return self.declared_grouping
        return (
            "predicted-label" if self.routing == "predicted-label" and self.mixture is not None else "policy"
        )

    @property
    def fallback_bases(self) -> int:
        """How many of the mixture's last bases hold its fallback adapter (the static LoRA a label router
        serves alone to the requests it is unsure of); 0 without one."""
        if self.mixture is None:
            return 0
        return int(self.hypernetwork.get("config", {}).get("fallback_bases", 0))

    @property
    def routing(self) -> str | None:
        """The mixture's router as trained (`hypernetwork.config.routing`); None where not recorded."""
        return self.hypernetwork.get("config", {}).get("routing")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["groups"] = [dict(g, modules=list(g["modules"])) for g in data["groups"]]
        # Fields added after format version 1 are left out at their defaults, so older artifacts keep
        # the hash they had before the fields existed.
        if self.mixture is None:
            del data["mixture"]
        else:
            data["mixture"]["basis_b_outputs"] = list(self.mixture.basis_b_outputs)
        if not self.base_model.weights_sha256_by_dtype:
            del data["base_model"]["weights_sha256_by_dtype"]
        grouping = data.pop("declared_grouping")
        if grouping is not None:
            data["grouping"] = grouping
        return data

    def sha256(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        _require(isinstance(data, dict), "manifest", "a JSON object")
        _require(data.get("format") == FORMAT, "format", repr(FORMAT))
        _require(data.get("format_version") == FORMAT_VERSION, "format_version", str(FORMAT_VERSION))
        base = _obj(data, "base_model")
        stat = _obj(data, "statistic")
        groups = data.get("groups")
        _require(isinstance(groups, list) and groups, "groups", "a non-empty list")
        manifest = cls(
            artifact_id=_str(data, "artifact_id"),
            base_model=Fingerprint(
                architecture=_str(base, "architecture", "base_model."),
                hidden_size=_pos_int(base, "hidden_size", "base_model."),
                vocab_size=_pos_int(base, "vocab_size", "base_model."),
                num_layers=_pos_int(base, "num_layers", "base_model."),
                weights_sha256=_str(base, "weights_sha256", "base_model.", allow_empty=True),
                weights_sha256_by_dtype=_dtype_hashes(base),
            ),
            statistic=StatisticSpec(
                kind=_str(stat, "kind", "statistic."),
                dim=_pos_int(stat, "dim", "statistic."),
                normalization=_str(stat, "normalization", "statistic."),
                params={str(k): str(v) for k, v in _obj(stat, "params", "statistic.").items()},
            ),
            rank=_pos_int(data, "rank"),
            scaling=_scaling(data),
            groups=tuple(_group(g, i) for i, g in enumerate(groups)),
            hypernetwork_sha256=_str(data, "hypernetwork_sha256"),
            hypernetwork=_obj(data, "hypernetwork"),
            created_by=_str(data, "created_by", allow_empty=True),
            mixture=_mixture(data["mixture"], len(groups)) if "mixture" in data else None,
            declared_grouping=_grouping(data),
        )
        _require(
            re.fullmatch(r"[0-9a-f]{64}", manifest.hypernetwork_sha256) is not None,
            "hypernetwork_sha256",
            "64 lowercase hex digits",
        )
        _require(
            manifest.grouping == "policy" or manifest.mixture is not None,
            "grouping",
            "'policy' for an artifact without a mixture (predicted-label grouping routes a mixture)",
        )
        names = [m for g in manifest.groups for m in g.modules]
        _require(len(names) == len(set(names)), "groups[].modules", "each module named once")
        if manifest.mixture is not None:
            _require(
                manifest.rank % manifest.mixture.bases == 0,
                "mixture.bases",
                f"a divisor of rank {manifest.rank}",
            )
        return manifest


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest
    onnx_bytes: bytes
    sha256: str


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Read and verify an artifact directory; raises ArtifactError saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {str(root)!r} does not exist")
    manifest_path, onnx_path = root / MANIFEST_FILE, root / ONNX_FILE
    for required in (manifest_path, onnx_path):
        if not required.is_file():
            raise ArtifactError(f"artifact {str(root)!r} has no {required.name}")
    try:
        manifest = Manifest.from_json(json.loads(manifest_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path}: {exc}") from exc
    onnx_bytes = onnx_path.read_bytes()
    actual = hashlib.sha256(onnx_bytes).hexdigest()
    if actual != manifest.hypernetwork_sha256:
        raise ArtifactError(
            f"{onnx_path}: sha256 {actual} does not match the manifest's hypernetwork_sha256 "
            f"{manifest.hypernetwork_sha256} (corrupt or replaced file)"
        )
    return Artifact(path=root, manifest=manifest, onnx_bytes=onnx_bytes, sha256=manifest.sha256())


def write_artifact(path: str | os.PathLike[str], manifest: Manifest, onnx_bytes: bytes) -> Artifact:
    """Write both files; the manifest's ONNX hash must already match `onnx_bytes`."""
    if hashlib.sha256(onnx_bytes).hexdigest() != manifest.hypernetwork_sha256:
        raise ArtifactError("manifest.hypernetwork_sha256 does not match the ONNX bytes being written")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / ONNX_FILE).write_bytes(onnx_bytes)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return load_artifact(root)


def _require(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"field {name!r}: expected {expected}")


def _obj(data: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = data.get(key)
    _require(isinstance(value, dict), prefix + key, "a JSON object")
    return value


def _str(data: dict[str, Any], key: str, prefix: str = "", allow_empty: bool = False) -> str:
    value = data.get(key)
    _require(isinstance(value, str) and (allow_empty or value), prefix + key, "a non-empty string")
    return value


def _number(data: dict[str, Any], key: str, prefix: str = "") -> float:
    value = data.get(key)
    _require(isinstance(value, int | float) and not isinstance(value, bool), prefix + key, "a number")
    return value


def _pos_int(data: dict[str, Any], key: str, prefix: str = "") -> int:
    value = data.get(key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and 0 < value <= INT64_MAX,
        prefix + key,
        f"a positive integer <= {INT64_MAX} (int64)",
    )
    return value


def _scaling(data: dict[str, Any]) -> float:
    """JSON parsing takes NaN and Infinity, and a float64 beyond float32's range is inf on the wire:
    either would turn every adapter into NaN or inf."""
    value = float(_number(data, "scaling"))
    _require(math.isfinite(value) and abs(value) <= FLOAT32_MAX, "scaling", "a finite number (float32 range)")
    return value


def _mixture(data: Any, groups: int) -> MixtureLayout:
    _require(isinstance(data, dict), "mixture", "a JSON object")
    outputs = data.get("basis_b_outputs")
    _require(
        isinstance(outputs, list)
        and len(outputs) == groups
        and all(isinstance(o, str) and o for o in outputs),
        "mixture.basis_b_outputs",
        f"a list of {groups} output names, one per group",
    )
    return MixtureLayout(
        bases=_pos_int(data, "bases", "mixture."),
        weights_output=_str(data, "weights_output", "mixture."),
        basis_b_outputs=tuple(outputs),
    )


GROUPINGS = ("policy", "predicted-label")
HASHED_DTYPES = ("bfloat16", "float16")


def _grouping(data: dict[str, Any]) -> str | None:
    if "grouping" not in data:
        return None
    value = data["grouping"]
    _require(value in GROUPINGS, "grouping", " or ".join(repr(g) for g in GROUPINGS))
    return value


def _dtype_hashes(base: dict[str, Any]) -> dict[str, str]:
    hashes = base.get("weights_sha256_by_dtype", {})
    _require(
        isinstance(hashes, dict)
        and set(hashes) <= set(HASHED_DTYPES)
        and all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in hashes.values()),
        "base_model.weights_sha256_by_dtype",
        f"an object mapping some of {list(HASHED_DTYPES)} to 64 lowercase hex digits",
    )
    return dict(hashes)


def _group(data: Any, index: int) -> TargetGroup:
    prefix = f"groups[{index}]."
    _require(isinstance(data, dict), prefix[:-1], "a JSON object")
    modules = data.get("modules")
    _require(
        isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules),
        prefix + "modules",
        "a non-empty list of module names",
    )
    return TargetGroup(
        name=_str(data, "name", prefix),
        d_in=_pos_int(data, "d_in", prefix),
        d_out=_pos_int(data, "d_out", prefix),
        modules=tuple(modules),
        output_a=_str(data, "output_a", prefix),
        output_b=_str(data, "output_b", prefix),
    )
