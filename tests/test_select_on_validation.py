"""benchmarks/select_on_validation.py: the learning rate is picked per method and seed on validation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "select_on_validation.py"


def _load():
    spec = importlib.util.spec_from_file_location("select_on_validation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(root: Path, lr: float, runs: dict[str, dict]) -> Path:
    (root / "runs").mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"config": {"lr": lr}}))
    for name, record in runs.items():
        (root / "runs" / f"{name}.json").write_text(json.dumps(record))
    return root


def test_each_seed_takes_the_run_with_the_best_validation_and_test_is_paired(tmp_path: Path) -> None:
    select = _load().select
    docs = 40
    rng = np.random.default_rng(0)
    good = rng.normal(3.0, 0.1, docs)

    def static(shift: float, val: float) -> dict:
        return {"per_doc": (good + shift).tolist(), "best_validation_nll": val}

    def hyper(shift: float, val: float) -> dict:
        scores = {"per request": (good + shift).tolist(), "k=1": (good + shift + 0.01).tolist()}
        return {"scores": scores, "best_validation_nll": val}

    fast = _study(
        tmp_path / "fast",
        2e-3,
        {
            "static-seed0": static(0.0, 3.10),
            "static-seed1": static(0.50, 3.60),  # diverged: worse on validation and on test
            "hyper-seed0": hyper(-0.02, 3.08),
            "hyper-seed1": hyper(-0.02, 3.08),
            "experts-seed0": {"per_doc": (good - 0.04).tolist()},
            "experts-seed1": {"per_doc": (good - 0.04).tolist()},
        },
    )
    slow = _study(
        tmp_path / "slow",
        1e-3,
        {
            "static-seed0": static(0.03, 3.12),
            "static-seed1": static(0.03, 3.12),
            "hyper-seed0": hyper(0.10, 3.20),
            "hyper-seed1": hyper(0.10, 3.20),
        },
    )
    result = select([fast, slow], [0, 1])
    assert [p["lr"] for p in result["picks"]["static"]] == [2e-3, 1e-3]
    assert [p["lr"] for p in result["picks"]["hyper"]] == [2e-3, 2e-3]
    rows = result["methods"]
    # static = mean of (good + 0) and (good + 0.03); Chameleon per request = good - 0.02
    assert rows["static LoRA (same rank)"]["mean_nll"] == pytest.approx(good.mean() + 0.015)
    per_request = rows["Chameleon, per request"]
    assert per_request["vs_static"]["delta"] == pytest.approx(-0.035)
    assert per_request["vs_static"]["ci95"] == pytest.approx([-0.035, -0.035])  # same shift on every doc
    assert per_request["share_of_expert_headroom"] == pytest.approx(0.035 / 0.055)
    assert rows["Chameleon, k=1"]["vs_static"]["delta"] == pytest.approx(-0.025)
    with pytest.raises(SystemExit, match=r"no static-seed2\.json"):
        select([fast, slow], [2])
