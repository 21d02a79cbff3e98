"""chameleon_torch pointed at three sidecar processes through one `ipv4:` target.

A replica killed under load must cost the model server no adapted batch (the client's round robin and
retries move its calls to the others), and with every replica gone a batch must still fall back at
once, not after its deadline, as with a single sidecar.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch
from plugin_pki import make_pki
from secured_sidecar import SecuredSidecar

from adapter_service.client import AdapterClient, AdapterServiceError, ClientSecurity
from adapter_service.client.fallback import sidecar_fallback
from chameleon_torch import AdapterHandle, BatchAdaptation, PluginConfig, attach
from conftest import tiny_llama
from samples import audit_records, start_sidecars

DEADLINE_S = 2.0  # generous for a loaded 2-core machine: the point is that no batch falls back


def forward(handle: AdapterHandle, seed: int) -> BatchAdaptation:
    """One batch of four prompts from three token ranges through the model, as a model server runs it."""
    rng = np.random.default_rng(seed)
    ids = torch.tensor([rng.integers(lo, lo + 50, size=6).tolist() for lo in (10, 100, 190, 10)])
    mask = torch.ones_like(ids)
    with torch.no_grad(), handle.adapt(ids, mask) as result:
        handle.model(input_ids=ids, attention_mask=mask)
    return result


def test_a_replica_killed_under_load_costs_no_adapted_batch_and_none_left_falls_back_at_once(
    artifact_dir: Path, tmp_path: Path
) -> None:
    replicas = start_sidecars(artifact_dir, 3, tmp_path)
    target = "ipv4:" + ",".join(r.address for r in replicas)
    stop = threading.Event()
    load_failures: list[str] = []

    def other_model_server(seed: int) -> None:
        """Another client on the same replicas, so the plugin's calls meet queued work."""
        x = np.random.default_rng(seed).normal(size=(16, 64)).astype(np.float32)
        with AdapterClient(target, timeout=DEADLINE_S) as client:
            while not stop.is_set():
                try:
                    client.adapt(x / np.linalg.norm(x, axis=1, keepdims=True))
                except AdapterServiceError as exc:
                    load_failures.append(str(exc))

    load = [threading.Thread(target=other_model_server, args=(s,), daemon=True) for s in range(2)]
    try:
        handle = attach(tiny_llama(), AdapterClient(target, timeout=5), PluginConfig(deadline_s=DEADLINE_S))
        for thread in load:
            thread.start()
        batches: list[BatchAdaptation] = []
        killed = None
        started = time.monotonic()
        while time.monotonic() < started + 3.5:
            if killed is None and time.monotonic() > started + 1.5:
                replicas[0].kill()
                killed = time.time()
            batches.append(forward(handle, len(batches)))
        stop.set()
        for thread in load:
            thread.join(10)
        after_kill = [
            sum(r["status"] == "OK" and r["t"] > killed for r in audit_records(tmp_path, i)) for i in range(3)
        ]
        reasons = {b.fallback_reason for b in batches}
        print(
            f"{len(batches)} batches, fallbacks {handle.metrics.fallback_count()}, reasons {reasons}; "
            f"calls answered per replica after the kill {after_kill}; other clients failed "
            f"{len(load_failures)}; slowest prepare {max(b.seconds for b in batches):.3f} s"
        )
        assert handle.metrics.fallback_count() == 0
        assert reasons == {None} and all(b.adapted and b.k > 0 for b in batches)
        assert load_failures == []
        assert after_kill[0] == 0 and min(after_kill[1:]) > 0
        assert len(batches) >= 10

        for replica in replicas[1:]:
            replica.kill()
        gone = [forward(handle, seed) for seed in range(5)]
        print(f"with no replica left: prepare seconds {[round(b.seconds, 3) for b in gone]}")
        assert {b.fallback_reason for b in gone} == {"unavailable"}
        assert max(b.seconds for b in gone) < DEADLINE_S / 4  # the retries' backoff, not the deadline
        assert handle.metrics.fallback_count("unavailable") == 5
    finally:
        stop.set()
        for replica in replicas:
            replica.stop()


def test_tls_replicas_listed_by_ip_are_checked_against_the_server_name(
    artifact_dir: Path, tmp_path: Path
) -> None:
    """An `ipv4:` list carries no host name for the certificate check: without CHAMELEON_TLS_SERVER_NAME
    every handshake fails (told apart from a down sidecar); with it, both TLS replicas answer."""
    pki = make_pki(tmp_path / "pki")
    gates = [SecuredSidecar(artifact_dir, pki=pki) for _ in range(2)]
    target = "ipv4:" + ",".join(g.address for g in gates)
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    try:
        with AdapterClient(target, timeout=DEADLINE_S, security=ClientSecurity(str(pki.ca))) as client:
            try:
                client.adapt(x)
            except AdapterServiceError as exc:
                assert sidecar_fallback(exc).reason == "unauthenticated", exc
            else:
                raise AssertionError("a TLS handshake without the server name succeeded")
        named = ClientSecurity(str(pki.ca), server_name="sidecar.test")
        with AdapterClient(target, timeout=DEADLINE_S, security=named) as client:
            for _ in range(6):
                client.adapt(x)
        answered = [g.thread.server.metrics.rpcs.labels("Adapt", "OK")._value.get() for g in gates]
        assert answered == [3, 3], answered  # round robin over both
    finally:
        for gate in gates:
            gate.stop()
