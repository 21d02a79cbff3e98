"""Manifest fields added after the first artifacts: typed, validated, and absent from old artifacts
without changing their hash or their behaviour."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from adapter_service.core.artifact import Manifest, load_artifact

DEMO = Path(__file__).parents[2] / "adapter_service" / "data" / "demo-artifact"


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_old_artifacts_load_with_the_grouping_their_router_implies(artifact_dir: Path) -> None:
    """The shipped demo artifact is a predicted-label mixture written before the field existed."""
    assert "grouping" not in _manifest(DEMO)
    assert load_artifact(DEMO).manifest.grouping == "predicted-label"
    assert _manifest(artifact_dir)["grouping"] == "policy"  # new exports state it
    for data, implied in ((_manifest(DEMO), "predicted-label"), (_manifest(artifact_dir), "policy")):
        old = copy.deepcopy(data)
        old.pop("grouping", None)
        old["base_model"].pop("weights_sha256_by_dtype", None)
        manifest = Manifest.from_json(old)
        assert manifest.grouping == implied
        # Written back, an old manifest is the same, so its sha256 (what operators pin) holds.
        assert manifest.to_json() == old


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grouping": "by-label"}, "field 'grouping': expected 'policy' or 'predicted-label'"),
        ({"grouping": 1}, "field 'grouping': expected 'policy' or 'predicted-label'"),
    ],
)
def test_grouping_is_validated(change: dict, message: str) -> None:
    data = {**_manifest(DEMO), **change}
    with pytest.raises(ValueError, match=message):
        Manifest.from_json(data)


def test_predicted_label_grouping_needs_a_mixture(artifact_dir: Path) -> None:
    data = {**_manifest(artifact_dir), "grouping": "predicted-label"}
    with pytest.raises(
        ValueError, match="field 'grouping': expected 'policy' for an artifact without a mixture"
    ):
        Manifest.from_json(data)


@pytest.mark.parametrize("hashes", [{"int8": "0" * 64}, {"bfloat16": "xyz"}, ["bfloat16"], {"float16": 3}])
def test_dtype_hashes_are_validated(hashes: object) -> None:
    data = _manifest(DEMO)
    data["base_model"]["weights_sha256_by_dtype"] = hashes
    with pytest.raises(
        ValueError, match=r"field 'base_model.weights_sha256_by_dtype': expected an object mapping"
    ):
        Manifest.from_json(data)
