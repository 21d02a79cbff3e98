"""chameleon_torch against a real sidecar: exactness, detach, fallback, caching, manifest checks."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.client import AdapterClient
from adapter_service.core.artifact import load_artifact, write_artifact
from adapter_service.core.clustering import FixedK
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.models.spec import linear_shape
from adapter_service.models.statistics import mean_input_embedding
from adapter_service.training.export import export_artifact, make_fresh_artifact, plan_export, to_onnx
from adapter_service.training.hypernetwork import HyperNetwork, build_network
from chameleon_torch import ManifestMismatch, PluginConfig, attach
from conftest import start_server, tiny_gpt2, tiny_llama

# Three "topics": token ranges far apart, so the statistics form three clear clusters.
TOPICS = [(10, 60), (100, 150), (190, 240)]
LENGTHS = [5, 9, 7, 3, 8, 6]


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(*TOPICS[i % 3], size=LENGTHS[i]).tolist() for i in range(len(LENGTHS))]


def pad(rows: list[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = [pad_id] * (width - len(row))
        ids.append(fill + row if side == "left" else row + fill)
        mask.append([0] * len(fill) + [1] * len(row) if side == "left" else [1] * len(row) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int = 16):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, steps, V]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def merged_copy(model: torch.nn.Module, deltas: dict[str, tuple[np.ndarray, np.ndarray]], scaling: float):
    """The reference: a copy of the model with W <- W + s B A merged into each target's weight."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, (a, b) in deltas.items():
            module = modules[name]
            delta = scaling * torch.from_numpy(b.astype(np.float32)) @ torch.from_numpy(a.astype(np.float32))
            if isinstance(module, torch.nn.Linear):
                module.weight += delta
            else:  # GPT-2 Conv1D stores [d_in, d_out]
                assert linear_shape(module) is not None
                module.weight += delta.T
    return merged


@pytest.fixture(scope="module")
def gpt2_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model_dir = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("gpt2-artifact")
    make_fresh_artifact(model_dir, ["c_attn", "c_fc"], 4, out, init="random", seed=2, hidden=32)
    return model_dir, out


@pytest.fixture(scope="module")
def mixture_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixture (3 bases, rank 6) for the tiny Llama: the sidecar answers it in the compact form."""
    model = tiny_llama()
    plan = plan_export(model, ["q_proj", "v_proj"], rank=6, init="random", kind="mixture", bases=3)
    torch.manual_seed(0)
    network = build_network(plan.hypernetwork_config)
    ids, mask = pad(prompts(1) + prompts(2), "left")
    network.fit_statistics(mean_input_embedding(model.get_input_embeddings().weight, ids, mask))
    out = tmp_path_factory.mktemp("mixture-artifact")
    export_artifact(network.eval(), plan, out)
    return out


def _load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-mixture"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_plugin_equals_merged_weights_row_by_row(
    arch: str, side: str, llama_dir: Path, artifact_dir: Path, gpt2_artifact, mixture_artifact: Path
) -> None:
    """For the mixture, the plugin applies the compact form (one rank-r bank, per-row weights); the
    reference merges the whole adapters the sidecar sends when asked for them."""
    model_dir, art = {
        "llama": (llama_dir, artifact_dir),
        "gpt2": gpt2_artifact,
        "llama-mixture": (llama_dir, mixture_artifact),
    }[arch]
    model = _load(model_dir)
    base = copy.deepcopy(model)
    server = start_server(art)
    try:
        client = AdapterClient(server.address, timeout=10)
        handle = attach(model, client, PluginConfig(policy=FixedK(3), wire_dtype="float32", deadline_s=10))
        ids, mask = pad(prompts(), side)
        with torch.no_grad(), handle.adapt(ids, mask) as batch:
            assert batch.adapted and batch.fallback_reason is None
            assert batch.k == 3 and len(set(batch.assignments.tolist())) == 3
            bank = handle._hooks.bank
            compact = arch == "llama-mixture"
            rank = client.manifest().rank
            assert all(a.shape[1] == (rank if compact else 3 * rank) for a, _ in bank.factors.values())
            prefill = model(input_ids=ids, attention_mask=mask).logits
            sequences, logits = generate(model, ids, mask)

        # The same statistics give the same clusters and tensors (the service is deterministic).
        stats = mean_input_embedding(model.get_input_embeddings().weight, ids, mask)
        answer = client.adapt(stats, policy=FixedK(3), dtype="float32", compact=False)
        assert np.array_equal(answer.assignments, batch.assignments)
        scaling = client.manifest().scaling
        merged = {
            c.index: merged_copy(base, {n: (d.a, d.b) for n, d in c.modules.items()}, scaling)
            for c in answer.clusters
        }
        base_prefill = base(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad():
            for row, cluster in enumerate(answer.assignments.tolist()):
                ref = merged[cluster]
                r_ids, r_mask = ids[row : row + 1], mask[row : row + 1]
                real = r_mask[0].bool()
                ref_prefill = ref(input_ids=r_ids, attention_mask=r_mask).logits
                assert rel_err(prefill[row][real], ref_prefill[0][real]) <= 1e-5
                # Decoding right-padded rows continues after the pads (as generate does for any
                # right-padded batch); the comparison holds the same way for both sides.
                ref_sequences, ref_logits = generate(ref, r_ids, r_mask)
                assert torch.equal(sequences[row], ref_sequences[0])
                assert rel_err(logits[row], ref_logits[0]) <= 1e-5
                # The adapters really change the output (the comparison above is not vacuous).
                assert rel_err(prefill[row][real], base_prefill[row][real]) > 1e-3
        client.close()
    finally:
        server.stop()


def test_detach_restores_the_model_bit_for_bit(llama_dir: Path, server) -> None:
    model = _load(llama_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = pad(prompts(), "left")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        handle = attach(model, AdapterClient(server.address, timeout=10), PluginConfig(deadline_s=10))
        with handle.adapt(ids, mask) as batch:
            adapted = model(input_ids=ids, attention_mask=mask).logits
        outside = model(input_ids=ids, attention_mask=mask).logits  # hooks idle outside adapt()
        handle.detach()
        after = model(input_ids=ids, attention_mask=mask).logits
    assert batch.adapted and not torch.equal(adapted, before)
    assert torch.equal(outside, before) and torch.equal(after, before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_attach_refuses_a_model_the_artifact_was_not_made_for(artifact_dir: Path, server) -> None:
    client = AdapterClient(server.address, timeout=10)
    with pytest.raises(ManifestMismatch, match=r"base_model.architecture: model has 'GPT2LMHeadModel'"):
        attach(tiny_gpt2(), client)
    other_weights = tiny_llama(seed=7)  # same shapes, different weights
    with pytest.raises(ManifestMismatch, match="weights_sha256"):
        attach(other_weights, client)
    attach(other_weights, client, PluginConfig(check_weights=False)).detach()


def test_compact_bases_and_weights_are_cached_across_batches(llama_dir: Path, mixture_artifact: Path) -> None:
    model = _load(llama_dir)
    server = start_server(mixture_artifact)
    try:
        client = AdapterClient(server.address, timeout=10)
        handle = attach(model, client, PluginConfig(policy=FixedK(3), deadline_s=10))
        ids, mask = pad(prompts(), "left")
        outputs = []
        for _ in range(2):
            with torch.no_grad(), handle.adapt(ids, mask) as batch:
                outputs.append(model(input_ids=ids, attention_mask=mask).logits)
            assert batch.adapted and batch.k == 3
        m = handle.metrics.registry
        # first batch: the bases and 3 sets of weights from the sidecar; second: all from the cache
        assert m.get_sample_value("chameleon_plugin_adapters_total", {"source": "sidecar"}) == 4
        assert m.get_sample_value("chameleon_plugin_adapters_total", {"source": "cache"}) == 4
        assert torch.equal(outputs[0], outputs[1])
        # A cache the plugin dropped is refilled: it, not the client, says which bases it holds.
        handle.cache.clear()
        with torch.no_grad(), handle.adapt(ids, mask) as batch:
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
        assert batch.adapted and batch.fallback_reason is None
        assert m.get_sample_value("chameleon_plugin_adapters_total", {"source": "sidecar"}) == 8
        assert torch.equal(outputs[0], outputs[2])
        handle.detach()
        client.close()
    finally:
        server.stop()


def test_default_policy_is_per_request_for_a_mixture_and_auto_k_otherwise(
    llama_dir: Path, mixture_artifact: Path, server
) -> None:
    ids, mask = pad(prompts(), "left")
    mixture_server = start_server(mixture_artifact)
    try:
        for address, per_request in ((mixture_server.address, True), (server.address, False)):
            client = AdapterClient(address, timeout=10)
            handle = attach(_load(llama_dir), client, PluginConfig(deadline_s=10))
            with torch.no_grad(), handle.adapt(ids, mask) as batch:
                pass
            assert batch.adapted
            if per_request:  # six distinct prompts, six adapters, at the cost of one (compact form)
                assert batch.k == 6 and batch.assignments.tolist() == list(range(6))
            else:
                assert batch.k <= 3  # AutoK(max_k=8) on three topics
            handle.detach()
            client.close()
    finally:
        mixture_server.stop()


def test_repeated_batch_uses_the_cache_and_the_service_leaves_tensors_out(llama_dir: Path, server) -> None:
    model = _load(llama_dir)
    handle = attach(model, AdapterClient(server.address, timeout=10), PluginConfig(deadline_s=10))
    ids, mask = pad(prompts(), "left")
    outputs = []
    for _ in range(2):
        with torch.no_grad(), handle.adapt(ids, mask) as batch:
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
        assert batch.adapted
    m = handle.metrics.registry
    assert m.get_sample_value("chameleon_plugin_adapters_total", {"source": "sidecar"}) == batch.k
    assert m.get_sample_value("chameleon_plugin_adapters_total", {"source": "cache"}) == batch.k
    assert torch.equal(outputs[0], outputs[1])
    handle.detach()


def _base_outputs(model_dir: Path, ids: torch.Tensor, mask: torch.Tensor):
    with torch.no_grad():
        return generate(_load(model_dir), ids, mask, steps=8)


def test_fallback_when_the_sidecar_stops_during_a_run(llama_dir: Path, artifact_dir: Path) -> None:
    ids, mask = pad(prompts(), "left")
    base_sequences, base_logits = _base_outputs(llama_dir, ids, mask)
    model = _load(llama_dir)
    sidecar = SidecarProcess(artifact_dir)
    try:
        handle = attach(model, AdapterClient(sidecar.address, timeout=5), PluginConfig(deadline_s=2))
        reasons = []
        for step in range(4):
            if step == 2:
                sidecar.kill()  # as a crash would
            with torch.no_grad(), handle.adapt(ids, mask) as batch:
                sequences, logits = generate(model, ids, mask, steps=8)
            reasons.append(batch.fallback_reason)
            if batch.adapted:
                assert not torch.equal(logits, base_logits)
            else:
                assert torch.equal(sequences, base_sequences) and torch.equal(logits, base_logits)
    finally:
        sidecar.stop()
    assert reasons == [None, None, "unavailable", "unavailable"]
    assert handle.metrics.fallback_count("unavailable") == 2
    assert (
        handle.metrics.registry.get_sample_value("chameleon_plugin_batches_total", {"outcome": "adapted"})
        == 2
    )


def test_fallback_when_the_sidecar_is_slower_than_the_deadline(llama_dir: Path, artifact_dir: Path) -> None:
    ids, mask = pad(prompts(), "left")
    base_sequences, base_logits = _base_outputs(llama_dir, ids, mask)
    model = _load(llama_dir)
    sidecar = SidecarProcess(artifact_dir)
    try:
        handle = attach(model, AdapterClient(sidecar.address, timeout=5), PluginConfig(deadline_s=0.3))
        sidecar.proc.send_signal(signal.SIGSTOP)  # frozen: every call now outlives the deadline
        try:
            with torch.no_grad(), handle.adapt(ids, mask) as batch:
                sequences, logits = generate(model, ids, mask, steps=8)
        finally:
            sidecar.proc.send_signal(signal.SIGCONT)
        assert batch.fallback_reason == "deadline" and 0.25 < batch.seconds < 5
        assert torch.equal(sequences, base_sequences) and torch.equal(logits, base_logits)
        with torch.no_grad(), handle.adapt(ids, mask) as batch:  # responsive again: adapted again
            assert batch.adapted
    finally:
        sidecar.stop()
    assert handle.metrics.fallback_count("deadline") == 1


def test_sidecar_down_at_attach_then_up(llama_dir: Path, artifact_dir: Path) -> None:
    from adapter_service.demo.sidecar import free_port

    address = f"127.0.0.1:{free_port()}"
    model = _load(llama_dir)
    handle = attach(
        model, AdapterClient(address, timeout=1), PluginConfig(deadline_s=1, manifest_timeout_s=1)
    )
    ids, mask = pad(prompts(), "left")
    with handle.adapt(ids, mask) as batch:
        assert batch.fallback_reason == "no_manifest"
    with SidecarProcess(artifact_dir, address=address), handle.adapt(ids, mask) as batch:
        assert batch.adapted
    assert handle.metrics.fallback_count() == 1


def test_non_finite_adapters_are_refused(llama_dir: Path, tmp_path: Path) -> None:
    """A broken artifact emitting NaN (export would refuse it; built by hand here) never reaches the model."""
    model = _load(llama_dir)
    plan = plan_export(model, ["q_proj"], rank=2, init="random")
    network = HyperNetwork(plan.hypernetwork_config).eval()
    with torch.no_grad():
        network.heads_b[0].bias[3] = float("nan")
    good = make_fresh_artifact(model, ["q_proj"], 2, tmp_path / "good", init="random")
    onnx_bytes = to_onnx(network)
    import hashlib
    from dataclasses import replace

    manifest = replace(good.manifest, hypernetwork_sha256=hashlib.sha256(onnx_bytes).hexdigest())
    write_artifact(tmp_path / "nan", manifest, onnx_bytes)
    server = start_server(tmp_path / "nan")
    try:
        handle = attach(model, AdapterClient(server.address, timeout=10), PluginConfig(deadline_s=10))
        ids, mask = pad(prompts(), "left")
        with torch.no_grad():
            base = model(input_ids=ids, attention_mask=mask).logits
            with handle.adapt(ids, mask) as batch:
                logits = model(input_ids=ids, attention_mask=mask).logits
        assert batch.fallback_reason == "invalid_response"
        assert torch.equal(logits, base)
    finally:
        server.stop()
    assert load_artifact(tmp_path / "nan").manifest.targets == good.manifest.targets


def test_num_return_sequences_expands_the_row_mask(llama_dir: Path, server) -> None:
    model = _load(llama_dir)
    handle = attach(
        model, AdapterClient(server.address, timeout=10), PluginConfig(policy=FixedK(3), deadline_s=10)
    )
    ids, mask = pad(prompts(), "left")
    with torch.no_grad(), handle.adapt(ids, mask) as batch:
        single = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        double = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            num_beams=2,
            num_return_sequences=2,
        )
    assert batch.adapted and double.shape[0] == 2 * single.shape[0]
