"""chameleon_torch through sidecar crashes (SIGKILL) and restarts on the same port, with real processes.

A model server keeps sending batches while the sidecar is down: each must fall back at once (not wait
for the deadline), and the first batch after the new sidecar answers health must be adapted within
seconds, whatever the outage lasted (gRPC's default reconnect backoff grows to 120 s). A sidecar that
comes back with another artifact, even under the same artifact_id, is checked as at attach.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from adapter_service.client import AdapterClient, AdapterServiceError
from adapter_service.core.artifact import load_artifact, write_artifact
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.training.export import make_fresh_artifact
from chameleon_torch import AdapterHandle, PluginConfig, attach
from conftest import tiny_llama

POLL_S = 0.2  # a model server's batch interval
DEADLINE_S = 2.0


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = torch.tensor([rng.integers(lo, lo + 50, size=6).tolist() for lo in (10, 100, 190, 10)])
    return ids, torch.ones_like(ids)


def step(handle: AdapterHandle) -> tuple[float, str | None, float]:
    """One batch through the model: (when it started, its fallback reason or None, its prepare seconds)."""
    ids, mask = batch()
    started = time.monotonic()
    with torch.no_grad(), handle.adapt(ids, mask) as result:
        handle.model(input_ids=ids, attention_mask=mask)
    return started, result.fallback_reason, result.seconds


def outage(handle: AdapterHandle, sidecar: SidecarProcess, artifact: Path, seconds: float):
    """SIGKILL `sidecar`, restart it on its address after `seconds` while batches keep coming every
    POLL_S; returns (the new sidecar, seconds from its first SERVING health answer to the start of the
    first adapted batch (negative: adapted before health was seen), the fallback reasons seen, the
    slowest fallback's prepare seconds)."""
    sidecar.kill()
    killed = time.monotonic()
    restarted: list[tuple[SidecarProcess, float]] = []

    serving: list[float] = []

    def restart() -> None:
        time.sleep(seconds)
        restarted.append(SidecarProcess(artifact, address=sidecar.address))

    def watch_health() -> None:
        """When the new sidecar first answers health, seen through a fresh channel each time (no
        backoff of its own), every 50 ms."""
        time.sleep(seconds)
        while not serving and time.monotonic() < killed + seconds + 60:
            with AdapterClient(sidecar.address, timeout=0.2) as probe:
                try:
                    if probe.health() == "SERVING":
                        serving.append(time.monotonic())
                except AdapterServiceError:
                    time.sleep(0.05)

    threads = [threading.Thread(target=f, daemon=True) for f in (restart, watch_health)]
    for thread in threads:
        thread.start()
    reasons: Counter[str] = Counter()
    slowest = 0.0
    while time.monotonic() < killed + seconds + 60:
        started, reason, prepare = step(handle)
        if reason is None and started > killed:
            break
        reasons[reason] += 1
        slowest = max(slowest, prepare)
        time.sleep(POLL_S)
    else:
        raise AssertionError(f"never adapted again after a {seconds} s outage: {dict(reasons)}")
    for thread in threads:
        thread.join(60)
    return restarted[0], started - serving[0], reasons, slowest


def test_adapted_again_within_seconds_of_a_restart_after_short_and_long_outages(
    llama_dir: Path, artifact_dir: Path
) -> None:
    sidecar = SidecarProcess(artifact_dir)
    try:
        handle = attach(
            tiny_llama(), AdapterClient(sidecar.address, timeout=5), PluginConfig(deadline_s=DEADLINE_S)
        )
        assert step(handle)[1] is None
        lags = {}
        for seconds in (3.0, 20.0):
            sidecar, lags[seconds], reasons, slowest = outage(handle, sidecar, artifact_dir, seconds)
            # every batch during the outage fell back, counted, and at once (not after the deadline)
            assert set(reasons) == {"unavailable"} and reasons["unavailable"] >= 5
            assert slowest < DEADLINE_S / 2
        print(f"seconds from health SERVING to the first adapted batch, by outage: {lags}")
        assert all(lag < 5.0 for lag in lags.values()), lags
        assert handle.metrics.fallback_count("unavailable") == handle.metrics.fallback_count()
        assert handle.manifest is not None and len(handle.cache)  # same artifact: the cache was kept
    finally:
        sidecar.stop()


def until_reconnected(handle: AdapterHandle) -> str | None:
    """Batches every POLL_S until one is not 'unavailable': its fallback reason or None."""
    give_up = time.monotonic() + 30
    while (reason := step(handle)[1]) == "unavailable" and time.monotonic() < give_up:
        time.sleep(POLL_S)
    return reason


def test_an_artifact_swapped_during_an_outage_is_checked_as_at_attach(
    llama_dir: Path, artifact_dir: Path, tmp_path: Path
) -> None:
    """Both swaps keep the artifact_id (so answers alone would not tell): one is made for this model
    (installed: the plugin adapts with it), one for other weights (refused until a fitting one returns)."""
    original = load_artifact(artifact_dir)

    def disguised(model: torch.nn.Module, seed: int, name: str) -> Path:
        """A new artifact whose manifest claims the original's artifact_id."""
        source = tmp_path / f"{name}-source"
        fresh = make_fresh_artifact(model, ["q_proj", "v_proj"], 4, source, init="random", seed=seed)
        manifest = replace(fresh.manifest, artifact_id=original.manifest.artifact_id)
        return write_artifact(tmp_path / name, manifest, fresh.onnx_bytes).path

    retrained = disguised(tiny_llama(), 5, "retrained")
    foreign = disguised(tiny_llama(seed=7), 1, "foreign")
    sidecar = SidecarProcess(artifact_dir)
    try:
        client = AdapterClient(sidecar.address, timeout=5)
        handle = attach(tiny_llama(), client, PluginConfig(deadline_s=2))
        assert step(handle)[1] is None
        sidecar.kill()
        sidecar = SidecarProcess(retrained, address=sidecar.address)
        assert until_reconnected(handle) is None
        assert handle.manifest.artifact_id == original.manifest.artifact_id
        assert handle.manifest.artifact_sha256 == load_artifact(retrained).sha256 != original.sha256
        sidecar.kill()
        sidecar = SidecarProcess(foreign, address=sidecar.address)
        reasons = [until_reconnected(handle)] + [step(handle)[1] for _ in range(3)]
        assert reasons == ["manifest_mismatch"] * 4  # never adapted with the foreign artifact
        assert handle.manifest is None and handle._hooks is None
        assert handle.metrics.fallback_count("manifest_mismatch") == 4
    finally:
        sidecar.stop()
