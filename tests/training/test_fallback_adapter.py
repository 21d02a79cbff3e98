"""The fallback adapter: a label router's unsure requests get the static LoRA, inside the artifact.

The threshold must be the validation optimum over cuts a threshold can make; the installed network must
give sure requests exactly the mixture's adapter and unsure ones exactly the static LoRA's; and the
artifact must export with parity and be served by the real sidecar with no change to the wire form.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluation import quick_config
from test_mixture import label_and_nuisance, mixture

from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.training.evaluation import WITH_FALLBACK, run_study
from adapter_service.training.export import export_artifact
from adapter_service.training.fallback_adapter import choose_threshold, install_fallback
from adapter_service.training.report import write_report
from adapter_service.training.trainer import StaticLoRA
from conftest import start_server, tiny_llama
from samples import synthetic


def test_the_threshold_is_the_validation_optimum_over_cuts_a_threshold_can_make() -> None:
    # The two least confident requests do better under the static LoRA, the third does not.
    choice = choose_threshold([0.9, 0.3, 0.95, 0.5], [1.0, 2.0, 1.0, 2.0], [1.2, 1.0, 1.1, 1.5])
    assert choice.threshold == pytest.approx(0.7) and choice.share == 0.5
    assert choice.routed_nll == 1.5 and choice.nll == pytest.approx((1.0 + 1.5 + 1.0 + 1.0) / 4)
    assert choice.gains
    # The static LoRA never better: no request falls back, and the artifact keeps its rank.
    never = choose_threshold([0.3, 0.9], [1.0, 1.0], [2.0, 2.0])
    assert (never.threshold, never.share, never.gains) == (0.0, 0.0, False)
    # Equal confidences cannot be told apart: falling back only one of them is not a choice, and a
    # tie goes to the fewer fallbacks.
    tied = choose_threshold([0.5, 0.5], [2.0, 1.0], [1.0, 2.0])
    assert (tied.threshold, tied.share) == (0.0, 0.0)
    # Every request better under the static LoRA: all fall back, the threshold still a probability.
    every = choose_threshold([0.4, 0.6], [2.0, 2.0], [1.0, 1.0])
    assert every.share == 1.0 and 0.6 < every.threshold <= 1.0
    with pytest.raises(ValueError, match="confidence, routed_nll, static_nll: expected three equal"):
        choose_threshold([0.5], [1.0, 2.0], [1.0])


def test_a_threshold_that_only_fits_validation_noise_is_not_installed() -> None:
    """With hundreds of cuts to choose from, some cut always looks better in-sample; only one that
    also gains on held-out halves of validation is worth the rank it adds."""
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 300)
    routed = 3.0 + rng.normal(0, 0.3, 300)
    noise = routed + rng.normal(0.05, 0.3, 300)  # the static LoRA is worse, whatever the confidence
    fitted = choose_threshold(confidence, routed, noise)
    assert fitted.nll < fitted.routed_nll and fitted.held_out_gain <= 0 and not fitted.gains
    unsure = confidence < 0.4
    signal = np.where(unsure, routed - 0.3, routed + 0.3) + rng.normal(0, 0.05, 300)
    real = choose_threshold(confidence, routed, signal)
    assert real.gains and real.held_out_gain > 0.05 and abs(real.threshold - 0.4) < 0.02


def trained_pair():
    """A predicted-label mixture fitted to labelled statistics, a static LoRA of its size (random B so
    the two differ), and statistics half of which sit between the labels (the router is unsure)."""
    plan, network = mixture(rank=4, bases=2, routing="predicted-label", labels=("news", "scripture"))
    rows, names = label_and_nuisance(120)
    rows = rows / rows.norm(dim=1, keepdim=True)
    with torch.no_grad():
        network.fit_statistics(rows[:60], labels=names[:60])
    torch.manual_seed(1)
    static = StaticLoRA(plan.hypernetwork_config)
    with torch.no_grad():
        for b in static.b:
            b.normal_(std=0.02)
    test = rows[60:92].clone()
    test[::2, 1] = rows[:60, 1].mean()  # no label signal left on the label axis
    test = test / test.norm(dim=1, keepdim=True)
    return plan, network.eval(), static.eval(), test


def deltas(outputs, group: int) -> torch.Tensor:
    """Each cluster's B A of one target group [K, L, d_out, d_in]: comparable across ranks."""
    return outputs[2 * group + 1] @ outputs[2 * group]


def test_unsure_requests_get_the_static_lora_and_sure_ones_the_mixtures_adapter(tmp_path: Path) -> None:
    plan, network, static, test = trained_pair()
    with torch.no_grad():
        confidence = network.confidence(test)
    unsure = confidence < 0.9
    assert 4 <= int(unsure.sum()) <= 28  # both kinds in the batch
    combined = install_fallback(network, static, 0.9)
    config = combined.config
    assert (config.rank, config.bases, config.fallback_bases) == (8, 4, 2)
    with torch.no_grad():
        got, routed, fixed = combined(test), network(test), static(test)
        weights = combined.weights(test)
    assert torch.equal(weights[unsure], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(int(unsure.sum()), 4))
    for g in range(len(config.groups)):
        want = torch.where(unsure[:, None, None, None], deltas(fixed, g), deltas(routed, g))
        torch.testing.assert_close(deltas(got, g), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="already has a fallback adapter"):
        install_fallback(combined, static, 0.5)

    artifact = export_artifact(combined, plan, tmp_path / "a")
    manifest = artifact.manifest
    assert manifest.rank == 8 and manifest.mixture.bases == 4 and manifest.grouping == "predicted-label"
    assert manifest.hypernetwork["config"]["fallback_threshold"] == 0.9
    onnx = HyperNetworkRuntime(artifact).generate(test.numpy())
    for g, group in enumerate(manifest.groups):
        np.testing.assert_allclose(onnx[group.name].b, got[2 * g + 1].numpy(), rtol=1e-5, atol=1e-6)

    # Served by the real sidecar over gRPC: unsure requests form one group of their own, whose adapter
    # is the static LoRA's; the others keep one group per predicted label.
    from adapter_service.client import AdapterClient
    from adapter_service.core.clustering import AutoK

    predicted = network.classifier((test - network.stat_mean) / network.stat_scale).argmax(1)
    group_of = torch.where(unsure, -1, predicted)
    server = start_server(artifact.path)
    try:
        with AdapterClient(server.address, timeout=30) as client:
            answer = client.adapt(test.numpy(), policy=AutoK(max_k=8))
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.stop()
    assert answer.grouping == "predicted-label" and answer.k == len(group_of.unique())
    # operators see how often the router is unsure
    assert f"chameleon_fallback_adapter_rows_total {float(unsure.sum())}" in metrics
    same = answer.assignments[:, None] == answer.assignments[None, :]
    assert np.array_equal(same, (group_of[:, None] == group_of[None, :]).numpy())
    row = int(unsure.nonzero()[0])
    cluster = answer.clusters[answer.assignments[row]]
    for g, group in enumerate(manifest.groups):
        for layer, name in enumerate(group.modules):
            delta = cluster.modules[name]
            served = torch.from_numpy(delta.b @ delta.a)
            torch.testing.assert_close(served, deltas(fixed, g)[row, layer], rtol=1e-4, atol=1e-6)


def test_a_router_without_a_classifier_takes_no_fallback() -> None:
    plan, network = mixture(rank=4, bases=2)  # distance routing: nothing to be unsure of
    with pytest.raises(ValueError, match="has no classifier to be sure or unsure"):
        network.confidence(torch.zeros(1, plan.hypernetwork_config.stat_dim))
    with pytest.raises(ValueError, match="fallback_bases: only a mixture with a label router"):
        install_fallback(network, StaticLoRA(plan.hypernetwork_config), 0.5)


def test_the_study_scores_the_fallback_with_its_threshold_chosen_on_validation(tmp_path: Path) -> None:
    config = quick_config(network="mixture", bases=3, routing="predicted-label", seeds=[0, 1])
    args = (tiny_llama(), synthetic(36, 1), synthetic(12, 2), synthetic(12, 3), config, tmp_path / "s")
    report = run_study(*args, progress=False)
    assert report["methods"][WITH_FALLBACK]["seeds"] == 2
    assert WITH_FALLBACK in report["validation"]
    for seed, chosen in enumerate(report["fallback"]):
        assert 0.0 <= chosen["threshold"] <= 1.0 and chosen["nll"] <= chosen["routed_nll"]
        assert 0.0 <= chosen["test_share"] <= 1.0
        # The test score is each request's, routed or static by the threshold chosen on validation.
        runs = tmp_path / "s" / "runs"
        hyper = json.loads((runs / f"hyper-seed{seed}.json").read_text())
        static = json.loads((runs / f"static-seed{seed}.json").read_text())
        threshold = chosen["threshold"] if chosen["installed"] else 0.0  # as train would serve it
        unsure = np.asarray(hyper["confidence"]["test"]) < threshold
        assert chosen["test_share"] == float(unsure.mean())
        want = np.where(unsure, static["per_doc"], hyper["scores"]["per request"])
        assert report["methods"][WITH_FALLBACK]["per_seed"][seed] == pytest.approx(float(want.mean()))
    write_report(report, tmp_path / "s", "chameleon eval ...", 1.0)
    assert (
        "Fallback adapter, per seed: requests whose router confidence is below"
        in (tmp_path / "s" / "report.md").read_text()
    )
