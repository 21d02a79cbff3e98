"""The mixture generator: learned LoRA bases mixed by the centroid's distance to learned prototypes.

It must export like any generator (ONNX parity, dynamic K), start at the base model, route unlike
statistics to unlike bases from the first step, and be refused when its bases do not divide the rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.training.export import export_artifact, plan_export
from adapter_service.training.hypernetwork import MixtureHyperNetwork, build_network
from conftest import tiny_llama


def two_groups(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Statistics as real ones look: one shared direction plus a small group-specific offset."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(64, generator=g) * 5
    offsets = torch.randn(2, 64, generator=g)
    rows = [common + offsets[i % 2] + 0.1 * torch.randn(64, generator=g) for i in range(n)]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def mixture(rank: int = 4, bases: int = 2, init: str = "random", **kwargs):
    model = tiny_llama()
    plan = plan_export(
        model, ["q_proj", "v_proj"], rank=rank, init=init, kind="mixture", bases=bases, **kwargs
    )
    torch.manual_seed(0)
    return plan, build_network(plan.hypernetwork_config)


def test_mixture_exports_with_parity_for_several_k(tmp_path: Path) -> None:
    plan, network = mixture()
    assert isinstance(network, MixtureHyperNetwork)
    network.fit_statistics(two_groups())
    artifact = export_artifact(network.eval(), plan, tmp_path / "a")
    assert artifact.manifest.hypernetwork["config"]["kind"] == "mixture"
    runtime = HyperNetworkRuntime(artifact)
    for k in (1, 3, 8):
        centroids = two_groups(k, seed=k)
        with torch.no_grad():
            want = [t.detach() for t in network(centroids)]
        got = runtime.generate(centroids.numpy())
        for i, group in enumerate(artifact.manifest.groups):
            assert got[group.name].a.shape == (k, 2, 4, group.d_in)  # bases side by side: rank 2 x 2
            assert got[group.name].b.shape == (k, 2, group.d_out, 4)
            for have, ref in ((got[group.name].a, want[2 * i]), (got[group.name].b, want[2 * i + 1])):
                assert float(np.abs(have - ref.numpy()).max() / np.abs(ref.numpy()).max()) <= 1e-5


def test_mixture_starts_at_zero_deltas() -> None:
    _, network = mixture(init="zero")
    network.fit_statistics(two_groups())
    outputs = network(two_groups(5))
    for b in outputs[1::2]:
        assert torch.count_nonzero(b) == 0
    for a in outputs[0::2]:
        assert a.abs().max() > 0  # A is live, so training can move B


def test_fitted_prototypes_route_unlike_statistics_to_unlike_bases() -> None:
    """Raw statistics share one dominant direction; after the fitted standardisation the two groups
    fall on different prototypes, so their adapters differ from the first step (without labels)."""
    _, network = mixture(routing_sharpness=4.0)
    _, soft = mixture(routing_sharpness=0.3)
    stats = two_groups(40)
    with torch.no_grad():
        network.fit_statistics(stats)
        weights = network.weights(stats)
        soft.fit_statistics(stats)
        soft_weights = soft.weights(stats)
    assert torch.equal(soft_weights.argmax(1), weights.argmax(1))  # same routing, softer weights
    assert float(soft_weights.max(1).values.mean()) < float(weights.max(1).values.mean())
    torch.testing.assert_close(weights.sum(1), torch.full((40,), 2.0))
    dominant = weights.argmax(1)
    assert set(dominant[0::2].tolist()) == {int(dominant[0])}
    assert set(dominant[1::2].tolist()) == {int(dominant[1])}
    assert dominant[0] != dominant[1]
    assert float(weights.max(1).values.min()) > 1.2  # clearly not uniform (uniform = 1.0 each)
    # standardisation is part of the state (saved, exported), not recomputed at serving time
    state = network.state_dict()
    assert {"stat_mean", "stat_scale", "prototypes", "log_temperature"} <= set(state)


def test_bad_bases_and_kinds_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="bases: expected a positive divisor of rank 4"):
        mixture(rank=4, bases=3)
    with pytest.raises(ValueError, match="bases"):
        mixture(rank=4, bases=0)
    with pytest.raises(ValueError, match="kind: got 'moe'"):
        plan_export(tiny_llama(), ["q_proj"], rank=4, kind="moe")
    with pytest.raises(ValueError, match="routing_sharpness: expected a positive number"):
        mixture(routing_sharpness=0.0)
    _, network = mixture()
    with pytest.raises(ValueError, match=r"stats: expected \[N, 64\]"):
        network.fit_statistics(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"at least 2 rows \(one per routed basis\)"):
        network.fit_statistics(torch.randn(1, 64))
    with pytest.raises(ValueError, match=r"shared_bases: expected an integer in 0..1 \(bases - 1\), got 2"):
        mixture(rank=4, bases=2, shared_bases=2)
    with pytest.raises(ValueError, match="shared_bases: only a mixture has bases to share"):
        plan_export(tiny_llama(), ["q_proj"], rank=4, shared_bases=1)


def test_shared_bases_are_always_on_and_the_rest_are_routed(tmp_path: Path) -> None:
    """A static LoRA inside the mixture: the shared bases keep weight 1 whatever the centroid, the
    routed ones still tell the two groups apart, and the whole thing exports with parity."""
    plan, network = mixture(rank=6, bases=3, shared_bases=1, routing_sharpness=4.0)
    stats = two_groups(40)
    with torch.no_grad():
        network.fit_statistics(stats)
        weights = network.weights(stats)
    assert network.prototypes.shape == (2, 64)
    torch.testing.assert_close(weights[:, 0], torch.ones(40))
    torch.testing.assert_close(weights[:, 1:].sum(1), torch.full((40,), 2.0))
    routed = weights[:, 1:].argmax(1)
    assert set(routed[0::2].tolist()) != set(routed[1::2].tolist())
    artifact = export_artifact(network.eval(), plan, tmp_path / "a")
    assert artifact.manifest.hypernetwork["config"]["shared_bases"] == 1
    got = HyperNetworkRuntime(artifact).generate(stats[:5].numpy())
    with torch.no_grad():
        want = network(stats[:5])
    for i, group in enumerate(artifact.manifest.groups):
        np.testing.assert_allclose(got[group.name].b, want[2 * i + 1].numpy(), rtol=1e-5, atol=1e-6)


def test_table_routing_gives_each_group_one_learned_row_of_weights(tmp_path: Path) -> None:
    """`routing="table"`: the nearest fixed prototype picks a row of learned weights, so every request
    of a group gets exactly the same weights (the label oracle's property, without labels). It starts
    as the distance router does at each prototype, learns the table only, and exports with parity."""
    plan, network = mixture(rank=6, bases=3, routing="table")
    _, distance = mixture(rank=6, bases=3)
    stats = two_groups(40)
    with torch.no_grad():
        network.fit_statistics(stats)
        distance.fit_statistics(stats)
        weights = network.weights(stats)
        # at the prototypes themselves the two routers agree: the table starts where distance routing is
        at_prototypes = network.prototypes * network.stat_scale + network.stat_mean
        torch.testing.assert_close(network.weights(at_prototypes), distance.weights(at_prototypes))
    torch.testing.assert_close(weights.sum(1), torch.full((40,), 3.0))
    x = (stats - network.stat_mean) / network.stat_scale
    codes = torch.cdist(x, network.prototypes).argmin(1)
    assert not set(codes[0::2].tolist()) & set(codes[1::2].tolist())  # k-means keeps the groups apart
    for code in codes.unique():  # one group, one row of weights, exactly
        rows = weights[codes == code]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    assert not torch.equal(weights[0], weights[1])
    network.train()
    sum(o.square().sum() for o in network(stats[:6])).backward()
    assert network.table.grad is not None and network.table.grad.abs().sum() > 0
    assert network.prototypes.grad is None and network.log_temperature.grad is None  # fixed by k-means
    artifact = export_artifact(network.eval(), plan, tmp_path / "a")
    assert artifact.manifest.hypernetwork["config"]["routing"] == "table"
    got = HyperNetworkRuntime(artifact).generate(stats[:5].numpy())
    with torch.no_grad():
        want = network(stats[:5])
    for i, group in enumerate(artifact.manifest.groups):
        np.testing.assert_allclose(got[group.name].b, want[2 * i + 1].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="routing: got 'hard', expected one of distance, table"):
        mixture(routing="hard")
    with pytest.raises(ValueError, match="routing: only a mixture routes"):
        plan_export(tiny_llama(), ["q_proj"], rank=4, routing="table")


def label_and_nuisance(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Statistics whose labels differ along one direction while an unrelated split moves every
    direction: unsupervised k-means follows the split, a classifier of the labels does not."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(64, generator=g) * 5
    nuisance = torch.randn(2, 64, generator=g)
    label_axis = torch.zeros(64)
    label_axis[1] = 1.0
    rows, labels = [], []
    for i in range(n):
        label = i % 2
        row = common + nuisance[(i // 2) % 2] + (2 * label - 1) * label_axis
        rows.append(row + 0.05 * torch.randn(64, generator=g))
        labels.append(("news", "scripture")[label])
    return torch.stack(rows), labels


@pytest.mark.parametrize("routing", ["classifier", "predicted-label"])
def test_label_routing_learns_from_labels_and_serves_from_the_statistic_alone(
    routing: str, tmp_path: Path
) -> None:
    """`routing="classifier"`: a linear classifier fitted to the training labels (then frozen) feeds
    the distance router, as the label oracle's one-hot rows did; "predicted-label" feeds it only the
    predicted label. It routes by label where k-means on the statistic follows an unrelated split; the
    exported graph takes the statistic only."""
    labels = ("news", "scripture")
    plan, network = mixture(rank=4, bases=2, routing=routing, labels=labels, routing_sharpness=4.0)
    _, distance = mixture(rank=4, bases=2, routing_sharpness=4.0)
    rows, all_names = label_and_nuisance(120)
    stats, names, test, test_names = rows[:60], all_names[:60], rows[60:], all_names[60:]
    with torch.no_grad():
        network.fit_statistics(stats, labels=names)
        distance.fit_statistics(stats)
        weights, unsupervised = network.weights(test), distance.weights(test)
    truth = torch.tensor([labels.index(name) for name in test_names])

    def agreement(w: torch.Tensor) -> float:  # with the labels, whichever basis each label took
        hits = float((w.argmax(1) == truth).float().mean())
        return max(hits, 1.0 - hits)

    assert agreement(weights) >= 0.95  # one basis per label, on held-out rows
    assert agreement(unsupervised) <= 0.65  # k-means on the statistic follows the other split
    torch.testing.assert_close(weights.sum(1), torch.full((60,), 2.0))
    assert network.prototypes.shape == (2, 2)  # the router sees label probabilities
    predicted = network.classifier((test - network.stat_mean) / network.stat_scale).argmax(1)
    same_label_same_weights = all(
        torch.equal(weights[i], weights[int((predicted == predicted[i]).nonzero()[0])]) for i in range(60)
    )
    assert same_label_same_weights == (routing == "predicted-label")  # one adapter per predicted label
    network.train()
    sum(o.square().sum() for o in network(test[:6])).backward()
    assert network.classifier.weight.grad is None  # frozen: fitted to the labels once
    assert network.prototypes.grad is not None and network.prototypes.grad.abs().sum() > 0
    artifact = export_artifact(network.eval(), plan, tmp_path / "a")
    config = artifact.manifest.hypernetwork["config"]
    assert config["routing"] == routing and config["labels"] == list(labels)
    got = HyperNetworkRuntime(artifact).generate(test[:8].numpy())
    with torch.no_grad():
        want = network(test[:8])
    for i, group in enumerate(artifact.manifest.groups):
        np.testing.assert_allclose(got[group.name].b, want[2 * i + 1].numpy(), rtol=1e-5, atol=1e-6)


def test_classifier_routing_refuses_missing_or_stray_labels() -> None:
    with pytest.raises(ValueError, match="labels: routing 'classifier' needs at least 2 distinct label"):
        mixture(routing="classifier")
    with pytest.raises(
        ValueError, match="labels: only routings classifier, predicted-label, pseudo-label use labels"
    ):
        mixture(labels=("a", "b"))
    _, network = mixture(routing="classifier", labels=("a", "b"))
    stats, _ = label_and_nuisance(10)
    with pytest.raises(ValueError, match=r"labels: routing 'classifier' needs one label from \['a', 'b'\]"):
        network.fit_statistics(stats)
    with pytest.raises(ValueError, match=r"got 10 labels with values \['a', 'c'\]"):
        network.fit_statistics(stats, labels=["a", "c"] * 5)


def test_classifier_labels_come_from_labelled_training_data() -> None:
    from adapter_service.training.trainer import Example, router_labels

    examples = [Example((1,), (2,), label) for label in ("news", "fortunes", "news")]
    assert router_labels("classifier", examples) == ("fortunes", "news")
    assert router_labels("predicted-label", examples) == ("fortunes", "news")
    assert router_labels("distance", examples) == ()
    with pytest.raises(ValueError, match="routing: 'classifier' learns from labels, but 1 of 4"):
        router_labels("classifier", [*examples, Example((1,), (2,))])


def test_pseudo_label_routing_needs_no_labels_and_serves_one_adapter_per_group(tmp_path: Path) -> None:
    """`routing="pseudo-label"`: the classes are k-means groups of the training statistics, found
    without labels; each request gets its predicted group's adapter exactly, and the artifact is
    grouped by that class when served, like a predicted-label one."""
    from adapter_service.training.hypernetwork import pseudo_labels
    from adapter_service.training.trainer import Example, router_labels

    unlabelled = [Example((1,), (2,)) for _ in range(4)]
    names = router_labels("pseudo-label", unlabelled, routed=2)
    assert names == ("group-00", "group-01")
    with pytest.raises(ValueError, match="'pseudo-label' needs at least 2 routed bases, got 1"):
        router_labels("pseudo-label", unlabelled, routed=1)
    plan, network = mixture(rank=4, bases=2, routing="pseudo-label", labels=names, routing_sharpness=4.0)
    rows, _ = label_and_nuisance(120)  # k-means follows the nuisance split: the groups to be found
    stats, test = rows[:60], rows[60:]
    with torch.no_grad():
        network.fit_statistics(stats)  # no labels
        weights = network.weights(test)
    standardised = (test - network.stat_mean) / network.stat_scale
    groups = pseudo_labels((stats - network.stat_mean) / network.stat_scale, names)
    assert sorted(set(groups)) == list(names)
    predicted = network.classifier(standardised).argmax(1)
    nuisance = torch.tensor([(i // 2) % 2 for i in range(60, 120)])
    agreement = float((predicted == nuisance).float().mean())
    assert max(agreement, 1 - agreement) >= 0.95  # the classifier learned the unsupervised groups
    for i in range(60):  # one adapter per predicted group, exactly
        j = int((predicted == predicted[i]).nonzero()[0])
        assert torch.equal(weights[i], weights[j])
    assert not torch.equal(weights[predicted == 0][0], weights[predicted == 1][0])
    artifact = export_artifact(network.eval(), plan, tmp_path / "a")
    config = artifact.manifest.hypernetwork["config"]
    assert config["routing"] == "pseudo-label" and config["labels"] == list(names)
    assert artifact.manifest.grouping == "predicted-label"
    got = HyperNetworkRuntime(artifact).generate(test[:8].numpy())
    with torch.no_grad():
        want = network(test[:8])
    for i, group in enumerate(artifact.manifest.groups):
        np.testing.assert_allclose(got[group.name].b, want[2 * i + 1].numpy(), rtol=1e-5, atol=1e-6)


def test_auto_routing_learns_from_labels_only_when_every_example_has_one() -> None:
    from adapter_service.training.trainer import Example, resolve_routing

    examples = [Example((1,), (2,), label) for label in ("news", "fortunes", "news")]
    assert resolve_routing("auto", "mixture", examples) == "predicted-label"
    assert resolve_routing("auto", "mixture", [*examples, Example((1,), (2,))]) == "distance"
    assert resolve_routing("auto", "mixture", examples[::2]) == "distance"  # one label: nothing to tell apart
    assert resolve_routing("auto", "full", examples) == "distance"  # only a mixture routes
    assert resolve_routing("table", "mixture", examples) == "table"  # a routing given is kept


def test_sidecar_groups_a_predicted_label_router_by_its_labels(tmp_path: Path) -> None:
    """Over real gRPC: whatever policy the caller asks (TGI's plugin asks AutoK), a predicted-label
    artifact's clusters are its predicted labels, each with the adapter its requests get one by one;
    the manifest and every response say so."""
    from adapter_service.client import AdapterClient
    from adapter_service.core.clustering import AutoK, FixedK, PerRequest
    from conftest import start_server

    plan, network = mixture(rank=4, bases=2, routing="predicted-label", labels=("news", "scripture"))
    rows, names = label_and_nuisance(120)
    rows = rows / rows.norm(dim=1, keepdim=True)  # as the sidecar's clustering hands them over
    with torch.no_grad():
        network.fit_statistics(rows[:60], labels=names[:60])
    artifact = export_artifact(network.eval(), plan, tmp_path / "a")
    test = rows[60:92].numpy()
    predicted = network.classifier((rows[60:92] - network.stat_mean) / network.stat_scale).argmax(1)
    server = start_server(artifact.path)
    try:
        with AdapterClient(server.address, timeout=30) as client:
            assert artifact.manifest.grouping == client.manifest().grouping == "predicted-label"
            one_by_one = client.adapt(test, policy=PerRequest())
            label_keys = {c.key for c in one_by_one.clusters}
            # a label's adapter keeps its key from batch to batch (the plugins' caches hit)
            reversed_batch = client.adapt(test[::-1].copy(), policy=PerRequest())
            assert {c.key for c in reversed_batch.clusters} == label_keys
            for policy in (AutoK(max_k=8), FixedK(1), PerRequest()):
                answer = client.adapt(test, policy=policy)
                assert answer.grouping == "predicted-label"  # the requested policy was overridden
                assert {c.key for c in answer.clusters} == label_keys
                assert answer.k == len(predicted.unique()) == 2  # one adapter per predicted label
                same = answer.assignments[:, None] == answer.assignments[None, :]
                assert np.array_equal(same, (predicted[:, None] == predicted[None, :]).numpy())
                for row in range(len(test)):
                    mine = answer.clusters[answer.assignments[row]].modules
                    alone = one_by_one.clusters[one_by_one.assignments[row]].modules
                    for name, delta in mine.items():
                        np.testing.assert_array_equal(delta.b, alone[name].b)
    finally:
        server.stop()
