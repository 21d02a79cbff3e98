"""chameleon_tgi against a STAND-IN of TGI 3.3.7 (tests/plugins/tgi_standin) and a real sidecar on loopback.

TGI cannot run here (not on PyPI, needs CUDA). tests/plugins/tgi_standin re-creates, from
plugins/chameleon_tgi/TGI_INTERNALS.md, exactly the TGI modules, classes, signatures and tensor layouts
the plugin touches, with TGI's pure-torch LoRA path (and a loop re-creation of its punica kernels) as the
reference math, around a tiny flash-style Llama. These tests check the plugin's glue on that stand-in,
and compare its per-row outputs with chameleon_torch on transformers' Llama with the same weights and the
same sidecar deltas. The real-TGI check is scripts/validate_tgi_gpu.sh.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.client import AdapterClient
from adapter_service.client.settings import parse_policy
from adapter_service.core.clustering import FixedK
from adapter_service.demo.sidecar import free_port
from adapter_service.models.statistics import mean_input_embedding
from chameleon_tgi import autoload, hooks, layout, patch
from chameleon_tgi.config import TGIPluginConfig
from chameleon_tgi.registry import NAME_PREFIX
from chameleon_torch import PluginConfig, attach
from chameleon_torch.model import AdapterHandle
from conftest import start_server

STANDIN = Path(__file__).parent / "tgi_standin"
SHIM = Path(__file__).parents[2] / "plugins" / "chameleon_tgi" / "bin" / "text-generation-server"
PTH = SHIM.parent.parent / "chameleon_tgi.pth"
BASE = "__base_model__"

# Three "topics" (token ranges far apart) -> three clear clusters; two more rows opt out of Chameleon.
TOPICS = [(10, 60), (100, 150), (190, 240)]
LENGTHS = [5, 9, 7, 3, 8, 6]


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(*TOPICS[i % 3], size=LENGTHS[i]).tolist() for i in range(len(LENGTHS))]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _purge() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ("text_generation_server", "punica_sgmv")]:
        del sys.modules[name]


@pytest.fixture
def tgi(monkeypatch: pytest.MonkeyPatch):
    """The stand-in on sys.path for one test, with fresh modules and the plugin's import hook set."""
    monkeypatch.syspath_prepend(str(STANDIN))
    for var in [v for v in os.environ if v.startswith("CHAMELEON_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("CHAMELEON_TGI_ALLOW_UNTESTED", "1")  # the stand-in is not TGI 3.3.7's sources
    _purge()
    assert autoload.install_import_hook()  # TGI's models not imported yet: deferred
    yield
    patch.uninstall()
    autoload.remove_import_hook()
    if hooks.ACTIVE is not None:
        hooks.ACTIVE.close()
    hooks.ACTIVE = None
    _purge()


def serve(model_dir: Path, monkeypatch: pytest.MonkeyPatch, **env: str):
    """TGI's start-up order (server.serve): get_model_with_lora_adapters, then set_adapter_to_index."""
    for var, value in {"CHAMELEON_WIRE_DTYPE": "float32", "CHAMELEON_DEADLINE_MS": "10000", **env}.items():
        monkeypatch.setenv(var, value)
    from text_generation_server import server

    return server.serve(str(model_dir))


def plain_model(model_dir: Path):
    """The stand-in model without Chameleon (get_model is not wrapped), for base references."""
    from text_generation_server.models import get_model

    return get_model(str(model_dir), [], None, False, None, None, "float32", None, False, 4096)


def make_batch(
    model, rows: list[list[int]], adapter_ids: list[str], max_new: list[int], chunk=None, first_id=1
):
    from text_generation_server.models.flash_causal_lm import FlashCausalLMBatch
    from text_generation_server.pb.generate_pb2 import Batch, Request, StoppingCriteriaParameters

    requests = [
        Request(first_id + i, " ".join(map(str, row)), adapter_id, StoppingCriteriaParameters(n))
        for i, (row, adapter_id, n) in enumerate(zip(rows, adapter_ids, max_new, strict=True))
    ]
    return FlashCausalLMBatch.from_pb(Batch(0, requests), model.tokenizer, model.dtype, model.device, chunk)


def run(model, batch, in_event_loop: bool = False) -> dict[int, list]:
    """Prefill then decode to the end, filtering stopped requests as TGI's router does."""
    out: dict[int, list] = defaultdict(list)
    first = True
    while batch is not None:
        if first and in_event_loop:  # TGI's Prefill handler is async and calls generate_token inline

            async def prefill(b=batch):
                return model.generate_token(b)

            generations, batch, _ = asyncio.run(prefill())
        else:
            generations, batch, _ = model.generate_token(batch)
        first = False
        for g in generations:
            out[g.request_id].append(g)
        stopped = {g.request_id for g in generations if g.stopped}
        if batch is not None and stopped:
            batch = batch.filter([r.id for r in batch.requests if r.id not in stopped])
    return out


def spy_batch_data(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every AdapterBatchData generate_token builds (to check one rank group, no base segment)."""
    from text_generation_server.adapters.weights import AdapterBatchData

    original, seen = AdapterBatchData.from_meta, []

    def from_meta(meta, weights, prefill, prefill_head_indices):
        data = original(meta, weights, prefill, prefill_head_indices)
        seen.append(data)
        return data

    monkeypatch.setattr(AdapterBatchData, "from_meta", staticmethod(from_meta))
    return seen


def registered_indices(model) -> dict[str, set[int]]:
    return {lt: set(w.adapter_weights) for lt, w in model.layer_to_adapter_weights.items()}


# -- layout: pure tensor math --------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("rank", [1, 4, 8, 9, 16, 17, 33, 64])
def test_rank_padding_follows_tgi_rule(tgi, rank: int, world_size: int) -> None:
    import punica_sgmv  # the stand-in's independent re-creation of the kernel module's rule

    want = 8 * world_size if rank <= 8 * world_size else -(-rank // 16) * 16
    assert layout.padded_rank(rank, world_size) == want
    t = torch.randn(5, rank)
    ours, theirs = layout.pad_rank(t, 1, world_size), punica_sgmv.pad_rank(t, 1, world_size)
    assert ours.shape == (5, want) and torch.equal(ours, theirs)
    assert torch.equal(ours[:, :rank], t) and not ours[:, rank:].any()


def test_tgi_factors_are_chameleon_torchs_factors_padded() -> None:
    torch.manual_seed(0)
    a, b, s = torch.randn(4, 24), torch.randn(40, 4), 2.0
    a_t, b_t = layout.tgi_factors(a, b, s)
    assert a_t.shape == (24, 8) and b_t.shape == (8, 40) and a_t.is_contiguous() and b_t.is_contiguous()
    # chameleon_torch's own conversion (the path its forward hooks use), then zero padding.
    (ref_a, ref_b) = AdapterHandle._to_device(_cluster(a, b).modules, "k", "cpu", torch.float32, s)["m"]
    assert torch.equal(a_t[:, :4], ref_a) and torch.equal(b_t[:4], ref_b)
    assert not a_t[:, 4:].any() and not b_t[4:].any()
    x = torch.randn(3, 24)
    assert torch.allclose(x @ a_t @ b_t, s * x @ a.T @ b.T, rtol=1e-5, atol=1e-6)


def _cluster(a: torch.Tensor, b: torch.Tensor):
    from adapter_service.client import ClusterAdapter, ModuleDelta

    return ClusterAdapter(0, 1, "k", False, {"m": ModuleDelta(a.numpy(), b.numpy())})


def test_layer_plan_and_lists() -> None:
    targets = [("model.layers.0.self_attn.q_proj", 8, 8), ("model.layers.2.self_attn.q_proj", 8, 8)]
    plan = layout.plan_layer_types([*targets, ("model.layers.1.mlp.down_proj", 16, 8)], num_layers=3)
    assert plan["q_proj"].layers == {0, 2} and (plan["down_proj"].d_in, plan["down_proj"].d_out) == (16, 8)
    modules = {name: (torch.ones(2, 8), torch.ones(8, 2)) for name, _, _ in targets}
    lists = layout.layer_type_lists(modules, {"q_proj": plan["q_proj"]}, 3, 0.5)
    a_list, b_list = lists["q_proj"]
    assert [a.shape for a in a_list] == [(8, 8)] * 3 and [b.shape for b in b_list] == [(8, 8)] * 3
    assert not a_list[1].any() and not b_list[1].any()  # an untargeted layer: zero delta
    assert torch.equal(b_list[0][:2], torch.full((2, 8), 0.5))
    with pytest.raises(ValueError, match="TGI applies LoRA only"):
        layout.plan_layer_types([("model.layers.0.self_attn.rotary", 8, 8)], 3)
    with pytest.raises(ValueError, match="one shape per layer type"):
        layout.plan_layer_types([*targets, ("model.layers.1.self_attn.q_proj", 8, 4)], 3)


# -- the contract: same per-row outputs as chameleon_torch ---------------------------------------------
@pytest.mark.parametrize(
    ("kernel", "chunk"), [("masked-torch", None), ("punica-loop", None), ("punica-loop", 4)]
)
def test_outputs_equal_chameleon_torch_row_by_row(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, artifact_dir: Path, kernel: str, chunk
) -> None:
    """Mixed batch: 3 clusters (6 rows) + 2 rows without adapter, prefill (chunked or not) and decode."""
    server = start_server(artifact_dir)
    try:
        model = serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=server.address, CHAMELEON_POLICY="fixed:3")
        import punica_sgmv

        if kernel == "masked-torch":  # TGI's pure-torch path: taken when a rank group exceeds MAX_RANK_CUSTOM
            monkeypatch.setattr(punica_sgmv, "MAX_RANK_CUSTOM", 0)
        seen = spy_batch_data(monkeypatch)
        rows = prompts()
        opted = [[20, 30, 40, 50], [110, 111, 112, 113, 114, 115, 116]]
        order = [0, 1, "b0", 2, 3, 4, "b1", 5]  # opted-out rows in the middle: base segments would be worst
        all_rows = [opted[int(o[1])] if isinstance(o, str) else rows[o] for o in order]
        ids = [BASE if isinstance(o, str) else "" for o in order]
        max_new = [3 if isinstance(o, str) else (4 if o == 2 else 6) for o in order]
        tgi_batch = make_batch(model, all_rows, ids, max_new, chunk)
        requests = list(tgi_batch.requests)
        out = run(model, tgi_batch, in_event_loop=True)
        steps = list(seen)  # what TGI's LoRA layers saw in this run (later runs are references)

        # Reference: chameleon_torch on transformers' Llama, the adapted rows in the same order.
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
        handle = attach(
            hf,
            AdapterClient(server.address, timeout=10),
            PluginConfig(policy=FixedK(3), wire_dtype="float32", deadline_s=10),
        )
        adapted = [rows[o] for o in order if not isinstance(o, str)]
        right_ids, right_mask = _pad(adapted, "right")  # the plugin pads right: the same statistics bits
        left_ids, left_mask = _pad(adapted, "left")
        with torch.no_grad(), handle.adapt(right_ids, right_mask) as batch:
            assert batch.adapted and batch.k == 3
            ref = _generate(hf, left_ids, left_mask, steps=6)
        handle.detach()
        with torch.no_grad():
            base_ref = {i: _generate(hf, *_pad([opted[i]], "left"), steps=3) for i in range(2)}
    finally:
        server.stop()

    runtime = getattr(model, hooks.RUNTIME_ATTR)
    worst, row = 0.0, 0
    for position, o in enumerate(order):
        generations = out[position + 1]
        assert len(generations) == max_new[position]
        if isinstance(o, str):
            sequences, logits = base_ref[int(o[1])]
        else:
            sequences, logits = ref[0][row : row + 1], ref[1][row : row + 1]
            # The same cluster key, so the very same deltas, as chameleon_torch gave this row.
            assert requests[position].adapter_id == NAME_PREFIX + batch.keys[batch.assignments[row]]
            row += 1
        for step, g in enumerate(generations):
            assert g.token_id == int(sequences[0, step])
            worst = max(worst, rel_err(g.logits, logits[0, step]))
    assert worst <= 1e-5, worst
    print(f"max relative error vs chameleon_torch ({kernel}, chunk={chunk}): {worst:.2e}")

    # The deltas are real (adapted rows differ from the base model).
    base = plain_model(llama_dir)
    base_out = run(base, make_batch(base, all_rows, ids, max_new, chunk))
    assert (
        min(
            rel_err(out[i + 1][0].logits, base_out[i + 1][0].logits)
            for i, o in enumerate(order)
            if o not in ("b0", "b1")
        )
        > 1e-3
    )
    # Rows without adapter: bit-for-bit the base model (the identity adapter adds exact zeros).
    for i, o in enumerate(order):
        if isinstance(o, str):
            assert all(
                torch.equal(g.logits, b.logits) for g, b in zip(out[i + 1], base_out[i + 1], strict=True)
            )

    # Risk 4 mitigation: every step has one rank group and no base segment; decode indices all valid.
    identity = runtime.adapter_to_index()[runtime.slots.name(runtime.identity_key)]
    assert steps and all(len(d.data) == 2 for d in steps)  # q_proj and v_proj
    for data in steps:
        assert 0 not in data.meta.segment_indices
        for weights in data.data.values():
            assert list(weights.rank_data) == [8]  # rank 4 padded to TGI's 8
            indices = weights.rank_data[8].indices
            assert indices is None or bool((indices >= 0).all())
    # Everything finished: the cluster adapters were evicted, only the pinned identity stays.
    assert runtime.slots.registered() == {runtime.slots.name(runtime.identity_key): identity}
    assert registered_indices(model) == {"q_proj": {identity}, "v_proj": {identity}}
    assert runtime.metrics.requests.labels("cluster")._value.get() == 6
    assert runtime.metrics.requests.labels("base")._value.get() == 2


def _pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = [([0] * (width - len(r)) + r) if side == "left" else (r + [0] * (width - len(r))) for r in rows]
    mask = [
        ([0] * (width - len(r)) + [1] * len(r)) if side == "left" else ([1] * len(r) + [0] * (width - len(r)))
        for r in rows
    ]
    return torch.tensor(ids), torch.tensor(mask)


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, steps: int):
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
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def test_statistic_is_the_shared_function_on_the_full_prompt(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, artifact_dir: Path
) -> None:
    server = start_server(artifact_dir)
    try:
        model = serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=server.address)
        runtime = getattr(model, hooks.RUNTIME_ATTR)
        rows = prompts()
        got = runtime.statistics(rows)
        table = model.model.embed_tokens.weight[:256]  # TGI's embedding carries one extra zero row
        for i, row in enumerate(rows):
            assert torch.equal(got[i], mean_input_embedding(table, torch.tensor([row]))[0])
    finally:
        server.stop()


# -- eviction and reuse --------------------------------------------------------------------------------
def test_eviction_frees_slots_and_reuse_skips_the_transfer(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, artifact_dir: Path
) -> None:
    server = start_server(artifact_dir)
    try:
        model = serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=server.address, CHAMELEON_POLICY="fixed:3")
        from text_generation_server.models.globals import get_adapter_to_index

        runtime = getattr(model, hooks.RUNTIME_ATTR)
        identity = runtime.slots.name(runtime.identity_key)
        rows = prompts()
        batch = make_batch(model, rows, [""] * 6, [5] * 6)
        first, batch, _ = model.generate_token(batch)
        names = {r.id: r.adapter_id for r in batch.requests}
        assert len(set(names.values())) == 3 and all(n.startswith(NAME_PREFIX) for n in names.values())
        table = get_adapter_to_index()
        assert set(table) == set(names.values()) | {identity}
        assert registered_indices(model)["q_proj"] == set(table.values())

        # FilterBatch drops both requests of one cluster: that adapter alone is unregistered.
        gone_name = names[1]
        leaving = [rid for rid, n in names.items() if n == gone_name]
        gone_index = table[gone_name]
        batch = batch.filter([rid for rid in names if rid not in leaving])
        assert gone_name not in table and set(table) == set(names.values()) - {gone_name} | {identity}
        for indices in registered_indices(model).values():
            assert gone_index not in indices and indices == set(table.values())
        assert runtime.metrics.evictions._value.get() == 1

        # ClearCache: TGI drops the batch object without filtering; collecting it releases the rest.
        model.generate_token(batch)
        del batch
        gc.collect()
        assert set(table) == {identity} and registered_indices(model) == {
            "q_proj": {table[identity]},
            "v_proj": {table[identity]},
        }
        assert runtime.metrics.evictions._value.get() == 3 and runtime.metrics.slots._value.get() == 1

        # The same prompts again: the sidecar leaves the tensors out (held keys), the cached LoraWeights
        # are registered again, and the outputs are identical.
        again, _, _ = model.generate_token(make_batch(model, rows, [""] * 6, [5] * 6, first_id=101))
        adapters = runtime.metrics.adapters
        assert adapters.labels("cache")._value.get() == 3 and adapters.labels("sidecar")._value.get() == 3
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(first, again, strict=True))
    finally:
        server.stop()


# -- failures: the base model, counted ----------------------------------------------------------------
def test_sidecar_failure_runs_the_base_model_and_counts_it(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, artifact_dir: Path
) -> None:
    server = start_server(artifact_dir)
    try:
        model = serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=server.address, CHAMELEON_DEADLINE_MS="2000")
        runtime = getattr(model, hooks.RUNTIME_ATTR)
        rows = prompts()
        adapted = run(model, make_batch(model, rows, [""] * 6, [4] * 6))
    finally:
        server.stop()  # as a crash would

    batch = make_batch(model, rows, [""] * 6, [4] * 6, first_id=101)
    out = run(model, batch)
    base = plain_model(llama_dir)
    want = run(base, make_batch(base, rows, [""] * 6, [4] * 6, first_id=101))
    for rid in want:
        assert [g.token_id for g in out[rid]] == [g.token_id for g in want[rid]]
        assert all(torch.equal(g.logits, w.logits) for g, w in zip(out[rid], want[rid], strict=True))
    assert not torch.equal(adapted[1][0].logits, want[101][0].logits)
    assert {r.adapter_id for r in batch.requests} == {runtime.slots.name(runtime.identity_key)}
    assert runtime.metrics.fallback_count("unavailable") == 1 and runtime.metrics.fallback_count() == 1


def test_paused_or_refusing_sidecar_and_the_audit_log(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, artifact_dir: Path, tmp_path: Path
) -> None:
    """Against the real sidecar with a bearer token: the token from CHAMELEON_AUTH_TOKEN_FILE is sent, a
    paused sidecar (its switch flipped as SIGUSR1 does) or one restarted with another token is a counted
    fallback, and CHAMELEON_AUDIT_LOG records each prefill."""
    from secured_sidecar import SecuredSidecar

    token, audit = tmp_path / "token", tmp_path / "audit.jsonl"
    token.write_text("tgi-token\n")
    gate = SecuredSidecar(artifact_dir, token="tgi-token")
    rows = prompts()
    try:
        model = serve(
            llama_dir,
            monkeypatch,
            CHAMELEON_SIDECAR=gate.address,
            CHAMELEON_AUTH_TOKEN_FILE=str(token),
            CHAMELEON_AUDIT_LOG=str(audit),
        )
        runtime = getattr(model, hooks.RUNTIME_ATTR)
        run(model, make_batch(model, rows, [""] * 5 + [BASE], [2] * 6))
        gate.paused = True
        run(model, make_batch(model, rows, [""] * 6, [2] * 6, first_id=101))
        gate.paused = False
        gate = gate.restart(token="rotated")
        run(model, make_batch(model, rows, [""] * 6, [2] * 6, first_id=201))
    finally:
        gate.stop()
    assert runtime.metrics.fallback_count("paused") == 1
    assert runtime.metrics.fallback_count("unauthenticated") == 1
    assert runtime.metrics.fallback_count() == 2
    adapted, paused, refused = (json.loads(line) for line in audit.read_text().splitlines())
    assert adapted["artifact_sha256"] == runtime.manifest.artifact_sha256
    assert [r["request"] for r in adapted["rows"]] == [1, 2, 3, 4, 5, 6]
    assert adapted["rows"][5] == {"request": 6, "adapter": "base", "why": "opted_out"}
    keys = {r["adapter"] for r in adapted["rows"][:5]}
    assert "base" not in keys and set(adapted["adapters"]) == keys
    assert all(0 < a["delta_norm"] < 10 and a["max_module"] for a in adapted["adapters"].values())
    assert paused["rows"] == [{"request": 101 + i, "adapter": "base", "why": "paused"} for i in range(6)]
    assert {r["why"] for r in refused["rows"]} == {"unauthenticated"}


def test_sidecar_never_reached_serves_the_base_model(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    model = serve(
        llama_dir,
        monkeypatch,
        CHAMELEON_SIDECAR=address,
        CHAMELEON_MANIFEST_TIMEOUT_MS="300",
        CHAMELEON_DEADLINE_MS="300",
    )
    from text_generation_server.models.globals import get_adapter_to_index

    runtime = getattr(model, hooks.RUNTIME_ATTR)
    out = run(model, make_batch(model, prompts(), [""] * 6, [3] * 6))
    base = plain_model(llama_dir)
    want = run(base, make_batch(base, prompts(), [""] * 6, [3] * 6))
    assert all(
        torch.equal(g.logits, w.logits) for rid in want for g, w in zip(out[rid], want[rid], strict=True)
    )
    assert (
        get_adapter_to_index() == {} and registered_indices(model) == {}
    )  # risk 6: never weights without names
    assert runtime.metrics.fallback_count("no_manifest") == 1


def test_warmup_batch_is_left_alone(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, artifact_dir: Path
) -> None:
    server = start_server(artifact_dir)
    try:
        model = serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=server.address)
        batch = make_batch(model, prompts(), [""] * 6, [2] * 6)
        model.warmup(batch, None, None)
        runtime = getattr(model, hooks.RUNTIME_ATTR)
        assert {r.adapter_id for r in batch.requests} == {""} and runtime.slots.requests() == frozenset()
        assert runtime.metrics.adapters.labels("sidecar")._value.get() == 0
    finally:
        server.stop()


@pytest.mark.parametrize("setting", ["cuda_graphs", "prefix_caching"])
def test_settings_that_break_adapters_are_refused(
    tgi, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, setting: str
) -> None:
    import text_generation_server.models.globals as tgi_globals

    if setting == "cuda_graphs":
        monkeypatch.setattr(tgi_globals, "CUDA_GRAPHS", [32, 16, 8, 4, 2, 1])
        match = "--cuda-graphs 0"
    else:
        monkeypatch.setattr(tgi_globals, "PREFIX_CACHING", True)
        match = "PREFIX_CACHING=0"
    with pytest.raises(hooks.Refused, match=match):
        serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=f"127.0.0.1:{free_port()}")


def test_artifact_for_another_model_is_refused(
    tgi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, artifact_dir: Path
) -> None:
    from conftest import tiny_llama

    other = tmp_path / "other"
    tiny_llama(seed=7).save_pretrained(other)  # same shapes, other weights
    server = start_server(artifact_dir)
    try:
        with pytest.raises(hooks.ManifestMismatch, match="weights_sha256"):
            serve(other, monkeypatch, CHAMELEON_SIDECAR=server.address)
    finally:
        server.stop()


def test_artifact_with_a_statistic_this_plugin_cannot_compute_is_refused(
    tgi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, llama_dir: Path, encoder_dir: Path
) -> None:
    """chameleon_tgi computes only the input-embedding statistic (from all_input_ids before prefill);
    an artifact declaring the hidden-state or sentence-encoder statistic is refused at start, not
    served wrongly."""
    from adapter_service.training.export import make_fresh_artifact

    artifact = make_fresh_artifact(
        llama_dir, ["model.layers.1.self_attn.v_proj"], 4, tmp_path / "hidden", statistic="hidden:1"
    )
    encoder = make_fresh_artifact(
        llama_dir, ["v_proj"], 4, tmp_path / "encoder", statistic=f"encoder:{encoder_dir}"
    )
    for refused, kind in ((artifact, "mean_hidden_state"), (encoder, "sentence_encoder")):
        server = start_server(refused.path)
        try:
            with pytest.raises(hooks.ManifestMismatch, match=f"statistic '{kind}'"):
                serve(llama_dir, monkeypatch, CHAMELEON_SIDECAR=server.address)
        finally:
            server.stop()


# -- version and structure check -----------------------------------------------------------------------
def test_version_check_refuses_a_standin_missing_a_name(tgi, monkeypatch: pytest.MonkeyPatch) -> None:
    autoload.remove_import_hook()
    import text_generation_server.models  # noqa: F401  (without the hook: nothing patched)
    from text_generation_server.adapters.weights import LayerAdapterWeights

    check = patch.check_tgi()
    assert (
        check.missing == []
        and check.version is None
        and sorted(check.differing) == sorted(patch.TESTED_SOURCES)
    )
    with pytest.raises(hooks.Refused, match=r"tested with TGI 3\.3\.7.*CHAMELEON_TGI_ALLOW_UNTESTED=1"):
        patch.install(TGIPluginConfig(allow_untested=False))
    monkeypatch.delattr(LayerAdapterWeights, "remove_adapter")
    with pytest.raises(hooks.Refused, match=r"3\.3\.7.*\n.*LayerAdapterWeights\.remove_adapter \(missing\)"):
        patch.install(TGIPluginConfig(allow_untested=True))
    assert not patch.installed()


def test_version_is_recognised_by_source_hashes(tgi, monkeypatch: pytest.MonkeyPatch) -> None:
    autoload.remove_import_hook()
    import text_generation_server.models  # noqa: F401

    standin_hashes = {path: patch._source_sha256(path) for path in patch.TESTED_SOURCES}
    assert all(standin_hashes.values())
    monkeypatch.setattr(patch, "TESTED_SOURCES", standin_hashes)  # pretend these were 3.3.7's
    assert patch.check_tgi().ok
    patch.install(TGIPluginConfig(allow_untested=False))
    assert patch.installed()


# -- delivery: the shim and the .pth line ---------------------------------------------------------------
def _subprocess(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAMELEON_")}
    base["PYTHONPATH"] = os.pathsep.join([str(STANDIN), base.get("PYTHONPATH", "")])
    return subprocess.run(args, env={**base, **env}, cwd=cwd, capture_output=True, text=True, timeout=240)


def test_shim_patches_only_when_switched_on(llama_dir: Path, tmp_path: Path) -> None:
    off = _subprocess([sys.executable, str(SHIM), "serve", str(llama_dir)], {}, tmp_path)
    assert off.returncode == 0, off.stderr
    info = json.loads(off.stdout.strip().splitlines()[-1])
    assert info["wrapped"] == [] and info["model_attributes"] == []
    assert "chameleon_tgi.patch" not in info["modules"] and "chameleon_tgi.hooks" not in info["modules"]

    env = {
        "CHAMELEON_TGI": "1",
        "CHAMELEON_TGI_ALLOW_UNTESTED": "1",
        "CHAMELEON_SIDECAR": f"127.0.0.1:{free_port()}",
        "CHAMELEON_MANIFEST_TIMEOUT_MS": "300",
    }
    on = _subprocess([sys.executable, str(SHIM), "serve", str(llama_dir)], env, tmp_path)
    assert on.returncode == 0, on.stderr
    info = json.loads(on.stdout.strip().splitlines()[-1])
    # server.py bound get_model_with_lora_adapters by name after the hook patched it: the wrapped one.
    assert info["wrapped"] == ["filter", "generate_token", "get_model_with_lora_adapters", "warmup"]
    assert info["model_attributes"] == [hooks.RUNTIME_ATTR]

    refused = _subprocess(
        [sys.executable, str(SHIM), "serve", str(llama_dir)], {"CHAMELEON_TGI": "1"}, tmp_path
    )
    assert refused.returncode != 0 and "tested with TGI 3.3.7" in refused.stderr


def test_pth_line_installs_the_hook_only_when_switched_on(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "chameleon_tgi.pth").write_text(PTH.read_text())
    code = (
        f"import site, sys; site.addsitedir({str(site_dir)!r}); "
        "from chameleon_tgi import autoload; "
        "tgi = any(m.startswith('text_generation_server') for m in sys.modules); "
        "print(autoload._FINDER in sys.meta_path, tgi)"
    )
    assert _subprocess([sys.executable, "-c", code], {}, tmp_path).stdout.split() == ["False", "False"]
    assert _subprocess([sys.executable, "-c", code], {"CHAMELEON_TGI": "1"}, tmp_path).stdout.split() == [
        "True",
        "False",
    ]


def test_config_from_env() -> None:
    config = TGIPluginConfig.from_env(
        {"CHAMELEON_SIDECAR": "sidecar:50051", "CHAMELEON_DEADLINE_MS": "250", "CHAMELEON_POLICY": "fixed:3"}
    )
    assert (config.sidecar, config.deadline_s, config.policy) == ("sidecar:50051", 0.25, FixedK(3))
    assert parse_policy("auto:4").max_k == 4
    assert (
        autoload.enabled({"CHAMELEON_TGI": "1"})
        and not autoload.enabled({})
        and not autoload.enabled({"CHAMELEON_TGI": "0"})
    )
    for env, var in (
        ({"CHAMELEON_DEADLINE_MS": "-1"}, "CHAMELEON_DEADLINE_MS"),
        ({"CHAMELEON_POLICY": "k3"}, "CHAMELEON_POLICY"),
    ):
        with pytest.raises(ValueError, match=var):
            TGIPluginConfig.from_env(env)


def test_plugin_logs_reach_loguru(monkeypatch: pytest.MonkeyPatch) -> None:
    """TGI's launcher shows only the shard's loguru JSON lines: the plugin's records must go there."""
    import logging
    import types

    records = []

    class FakeLogger:
        def opt(self, exception=None):
            return self

        def log(self, level, message):
            records.append((level, message))

    monkeypatch.setitem(sys.modules, "loguru", types.SimpleNamespace(logger=FakeLogger()))
    logger = logging.getLogger("chameleon_tgi")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    try:
        patch._bridge_logging()
        logger.info("chameleon attached: test")
        logger.warning("chameleon adapters unavailable")
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    assert records == [("INFO", "chameleon attached: test"), ("WARNING", "chameleon adapters unavailable")]
