"""chameleon_torch's drift guard and audit log, against a real sidecar.

The misbehaving adapters are made on the client side of a real answer (the sidecar's tensors scaled
after they arrive), so one batch holds a huge adapter, an overflowing one and a sound one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.client import AdapterClient, ModuleDelta
from adapter_service.core.clustering import FixedK
from adapter_service.models.statistics import mean_input_embedding
from adapter_service.training.export import export_artifact, plan_export
from adapter_service.training.hypernetwork import build_network
from chameleon_torch import PluginConfig, attach
from conftest import start_server, tiny_llama

TOPICS = [(10, 60), (100, 150), (190, 240)]
LENGTHS = [5, 9, 7, 3, 8, 6]
STEPS = 6


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Six left-padded prompts in three topics (three clear clusters)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(*TOPICS[i % 3], size=LENGTHS[i]).tolist() for i in range(len(LENGTHS))]
    width = max(LENGTHS)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def tamper(client: AdapterClient, scales: dict[int, tuple[float, float]]) -> None:
    """Make `client.adapt` scale the (A, B) of the answer's cluster c by scales[c] in every module, as a
    broken artifact would send them."""
    original = client.adapt

    def adapt(*args, **kwargs):
        answer = original(*args, **kwargs)
        for index, (sa, sb) in scales.items():
            modules = answer.clusters[index].modules
            for name, delta in list(modules.items()):
                modules[name] = ModuleDelta(delta.a * np.float32(sa), delta.b * np.float32(sb))
        return answer

    client.adapt = adapt


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_guard_serves_misbehaving_adapters_rows_exactly_as_base(llama_dir: Path, server) -> None:
    """Cluster 0's delta is 1e4 times too large (far above max_delta_ratio), cluster 1's overflows to
    inf (finite factors, 1e20 each): their rows get the base model's logits bit for bit, at prefill and
    every decode step; cluster 2's rows keep their adapter; the counter moves once per row."""
    ids, mask = batch()
    base = tiny_llama()
    with torch.no_grad():
        base_prefill = base(input_ids=ids, attention_mask=mask).logits
        base_sequences, base_logits = generate(base, ids, mask)

    def run(scales: dict[int, tuple[float, float]]):
        model = tiny_llama()
        client = AdapterClient(server.address, timeout=10)
        tamper(client, scales)
        handle = attach(model, client, PluginConfig(policy=FixedK(3), wire_dtype="float32", deadline_s=10))
        with torch.no_grad(), handle.adapt(ids, mask) as result:
            prefill = model(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad(), handle.adapt(ids, mask) as again:  # the adapters now come from the cache
            sequences, logits = generate(model, ids, mask)
        client.close()
        return handle, result, again, prefill, sequences, logits

    handle, result, again, prefill, sequences, logits = run({0: (1.0, 1e4), 1: (1e20, 1e20)})
    _, sound, _, sound_prefill, sound_sequences, sound_logits = run({})
    assert result.adapted and again.adapted and np.array_equal(result.assignments, sound.assignments)
    clusters = result.assignments.tolist()
    want = {row: "delta_ratio" if c == 0 else "non_finite" for row, c in enumerate(clusters) if c < 2}
    assert result.guarded == want and again.guarded == want and sound.guarded == {}
    for row, c in enumerate(clusters):
        real = mask[row].bool()
        if c < 2:  # served as base, exactly
            assert torch.equal(prefill[row], base_prefill[row])
            assert torch.equal(sequences[row], base_sequences[row]) and torch.equal(
                logits[row], base_logits[row]
            )
        else:  # its adapter, as in a batch without misbehaving neighbours
            assert rel_err(prefill[row][real], sound_prefill[row][real]) <= 1e-5
            assert torch.equal(sequences[row], sound_sequences[row])
            assert rel_err(logits[row], sound_logits[row]) <= 1e-5
            assert rel_err(prefill[row][real], base_prefill[row][real]) > 1e-3
    metrics = handle.metrics
    assert metrics.guarded_count("delta_ratio") == 2 * clusters.count(0)
    assert metrics.guarded_count("non_finite") == 2 * clusters.count(1)
    assert metrics.fallback_count() == 0


def test_max_delta_ratio_none_bounds_nothing_but_non_finite_rows(llama_dir: Path, server) -> None:
    ids, mask = batch()
    client = AdapterClient(server.address, timeout=10)
    tamper(client, {0: (1.0, 1e4), 1: (1e20, 1e20)})
    config = PluginConfig(policy=FixedK(3), wire_dtype="float32", deadline_s=10, max_delta_ratio=None)
    handle = attach(tiny_llama(), client, config)
    with torch.no_grad(), handle.adapt(ids, mask) as result:
        handle.model(input_ids=ids, attention_mask=mask)
    clusters = result.assignments.tolist()
    assert result.guarded == {row: "non_finite" for row, c in enumerate(clusters) if c == 1}
    with pytest.raises(ValueError, match="max_delta_ratio"):
        PluginConfig(max_delta_ratio=0)
    client.close()


def test_guard_follows_rows_expanded_by_generate(llama_dir: Path, server) -> None:
    """num_return_sequences=2: each request's two rows are guarded together, counted once."""
    ids, mask = batch()
    client = AdapterClient(server.address, timeout=10)
    tamper(client, {0: (1.0, 1e4)})
    handle = attach(tiny_llama(), client, PluginConfig(policy=FixedK(3), deadline_s=10))
    with torch.no_grad(), handle.adapt(ids, mask) as result:
        handle.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
            num_beams=2, num_return_sequences=2,
        )  # fmt: skip
    clusters = result.assignments.tolist()
    assert result.guarded == {row: "delta_ratio" for row, c in enumerate(clusters) if c == 0}
    assert handle.metrics.guarded_count() == clusters.count(0)
    client.close()


def _frobenius_ratio(client: AdapterClient, model: torch.nn.Module, modules: dict[str, ModuleDelta]) -> float:
    scaling = client.manifest().scaling
    weights = dict(model.named_modules())
    delta_sq = weight_sq = 0.0
    for name, d in modules.items():
        delta = scaling * d.b.astype(np.float64) @ d.a.astype(np.float64)
        delta_sq += float(np.square(delta).sum())
        weight_sq += float(weights[name].weight.detach().double().square().sum())
    return (delta_sq / weight_sq) ** 0.5


def test_audit_log_says_which_adapter_served_each_row_and_why(
    llama_dir: Path, artifact_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "logs" / "audit.jsonl"
    ids, mask = batch()
    server = start_server(artifact_dir)
    model = tiny_llama()
    client = AdapterClient(server.address, timeout=10)
    tamper(client, {0: (1.0, 1e4)})
    config = PluginConfig(policy=FixedK(3), wire_dtype="float32", deadline_s=2, audit_log=audit)
    handle = attach(model, client, config)
    names = [f"req-{i}" for i in range(6)]
    try:
        with torch.no_grad(), handle.adapt(ids, mask, request_ids=names) as first:
            model(input_ids=ids, attention_mask=mask)
        with torch.no_grad(), handle.adapt(ids, mask) as second:  # no ids: rows by index
            model(input_ids=ids, attention_mask=mask)
    finally:
        server.stop()
    with torch.no_grad(), handle.adapt(ids, mask) as third:  # the sidecar is gone
        pass
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 3 and third.fallback_reason == "unavailable"
    manifest = client.manifest()
    for line in lines:
        assert set(line) == {"time", "artifact_id", "artifact_sha256", "outcome", "rows", "adapters"}
        assert (line["artifact_id"], line["artifact_sha256"]) == (
            manifest.artifact_id,
            manifest.artifact_sha256,
        )
        assert line["time"].endswith("+00:00")
    one, two, three = lines
    assert one["outcome"] == "adapted" and three["outcome"] == "fallback"
    clusters = first.assignments.tolist()
    assert one["rows"] == [
        {"request": names[i], "adapter": "base", "why": "guarded:delta_ratio"}
        if c == 0
        else {"request": names[i], "adapter": first.keys[c]}
        for i, c in enumerate(clusters)
    ]
    assert [r["request"] for r in two["rows"]] == list(range(6)) and second.guarded == first.guarded
    assert three["rows"] == [{"request": i, "adapter": "base", "why": "unavailable"} for i in range(6)]
    assert three["adapters"] == {}
    # per adapter used: ||s B A||_F / ||W||_F over its modules, and its largest module
    assert set(one["adapters"]) == {first.keys[c] for c in set(clusters) if c != 0}
    server = start_server(artifact_dir)
    try:
        plain = AdapterClient(server.address, timeout=10)
        stats = mean_input_embedding(model.get_input_embeddings().weight, ids, mask)
        answer = plain.adapt(stats, policy=FixedK(3), dtype="float32")
        for cluster in answer.clusters:
            if cluster.key in one["adapters"]:
                entry = one["adapters"][cluster.key]
                assert entry["delta_norm"] == pytest.approx(
                    _frobenius_ratio(plain, model, cluster.modules), 1e-4
                )
                assert entry["max_module"] in cluster.modules and entry["max_module_delta_norm"] > 0
        plain.close()
    finally:
        server.stop()
    client.close()


def test_audit_norms_of_the_compact_form_equal_the_whole_adapters(llama_dir: Path, tmp_path: Path) -> None:
    """A mixture in the compact form: each cluster's norm comes from the bases and its weights."""
    model = tiny_llama()
    plan = plan_export(model, ["q_proj", "v_proj"], rank=6, init="random", kind="mixture", bases=3)
    torch.manual_seed(0)
    network = build_network(plan.hypernetwork_config)
    ids, mask = batch()
    network.fit_statistics(mean_input_embedding(model.get_input_embeddings().weight, ids, mask))
    export_artifact(network.eval(), plan, tmp_path / "mixture")
    server = start_server(tmp_path / "mixture")
    try:
        client = AdapterClient(server.address, timeout=10)
        config = PluginConfig(policy=FixedK(3), deadline_s=10, audit_log=tmp_path / "audit.jsonl")
        handle = attach(model, client, config)
        with torch.no_grad(), handle.adapt(ids, mask) as result:
            pass
        line = json.loads((tmp_path / "audit.jsonl").read_text())
        assert result.adapted and len(line["adapters"]) == 3
        stats = mean_input_embedding(model.get_input_embeddings().weight, ids, mask)
        whole = client.adapt(stats, policy=FixedK(3), dtype="float32", compact=False)
        assert np.array_equal(whole.assignments, result.assignments)
        for c, key in enumerate(result.keys):
            want = _frobenius_ratio(client, model, whole.clusters[c].modules)
            assert line["adapters"][key]["delta_norm"] == pytest.approx(want, rel=1e-2)  # float16 wire
        client.close()
    finally:
        server.stop()
