"""The grouping benchmarks' scoring functions, on data whose answer is known: they share the router's
own fitting code (hypernetwork.py), so what they report is what a router would do."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def two_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    centres = np.array([[3.0] * 4 + [0.0] * 4, [0.0] * 4 + [3.0] * 4])
    return (centres[y] + 0.3 * rng.standard_normal((n, 8))).astype(np.float32), y


def test_probe_and_prototypes_find_separable_labels() -> None:
    grouping = _load("statistic_grouping")
    train, y_train = two_classes(40, 0)
    test, y_test = two_classes(20, 1)
    assert grouping.probe_accuracy(train, y_train, test, y_test) == 1.0
    assert grouping.prototype_purity(train, test, y_test, bases=2) == 1.0
    assert grouping.purity(np.zeros(20, dtype=int), y_test) == 0.5  # one group: the majority share


def test_routing_errors_split_the_gain_by_whether_a_document_was_routed_right() -> None:
    errors = _load("routing_errors")
    train, y_train = two_classes(40, 0)
    test, y_test = two_classes(20, 1)
    test[:2] = test[:2][:, ::-1]  # two documents that look like the other label
    gain = np.where(np.arange(20) < 2, 0.5, -0.1)
    row = errors.seed_errors(
        torch.from_numpy(train), torch.from_numpy(y_train), torch.from_numpy(test), y_test, 0, gain
    )
    assert row["misrouted"] == 2 and row["accuracy"] == pytest.approx(0.9)
    assert row["gain_rightly_routed"] == pytest.approx(-0.1) and row["gain_misrouted"] == pytest.approx(0.5)
    assert row["gain_all"] == pytest.approx(0.9 * -0.1 + 0.1 * 0.5)
    assert row["cost_of_misrouting"] == pytest.approx(2 * 0.6 / 20)  # 0.5 instead of -0.1, twice


def test_the_fallback_curve_serves_the_static_lora_below_the_threshold() -> None:
    errors = _load("routing_errors")
    confidence = np.array([0.3, 0.55, 0.97, 0.99])
    right = np.array([False, True, True, True])
    gain = np.array([0.4, -0.2, -0.1, -0.1])
    curve = {p["threshold"]: p for p in errors.fallback_curve(confidence, right, gain)}
    # below 0.5 only the misrouted document falls back: its loss becomes the static LoRA's
    assert curve[0.5]["misrouted_caught"] == 1 and curve[0.5]["rightly_routed_lost"] == 0
    assert curve[0.5]["gain_all"] == pytest.approx((-0.2 - 0.1 - 0.1) / 4)
    # below 0.6 a rightly routed one falls back too, and its gain is lost
    assert curve[0.6]["fallen_back"] == pytest.approx(0.5)
    assert curve[0.6]["gain_all"] == pytest.approx((-0.1 - 0.1) / 4)
    # strictly below: a document exactly at the threshold keeps its adapter
    assert curve[0.99]["fallen_back"] == pytest.approx(0.75)
    assert curve[0.99]["gain_all"] == pytest.approx(-0.1 / 4)
