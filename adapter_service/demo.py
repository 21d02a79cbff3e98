"""`chameleon demo`: the whole service path on an embedded default, in one command.

Makes an artifact for a SmolLM2-135M-shaped model (its config ships in the package; no weights
needed), starts the real sidecar as a child process on loopback, sends one mixed batch through the
real client, shows how the batch was grouped and what came back, and stops the sidecar with SIGTERM.

The hyper-network here is untrained (random init, so the tensors are visibly non-zero) and the
statistics are synthetic: this shows the plumbing and its cost, not a quality gain.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from adapter_service.clustering import AutoK

DEFAULT_CONFIG = Path(__file__).with_name("data") / "smollm2-135m-config.json"
DOMAINS = ("encyclopedia", "news", "scripture", "jokes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", flush=True)


def synthetic_batch(n: int = 32, dim: int = 576, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Statistics of n requests from len(DOMAINS) domains: noisy copies of one direction per domain."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(DOMAINS), dim))
    labels = rng.integers(0, len(DOMAINS), n)
    stats = centres[labels] + 0.35 * rng.standard_normal((n, dim))
    return stats.astype(np.float32), [DOMAINS[i] for i in labels]


def run_demo(workdir: Path = Path(".chameleon/demo"), batch: int = 32) -> int:
    from adapter_service.client import AdapterClient
    from adapter_service.export import make_fresh_artifact

    steps = 5
    workdir.mkdir(parents=True, exist_ok=True)
    artifact_dir = workdir / "artifact"
    _step(1, steps, f"exporting a fresh hyper-network for {DEFAULT_CONFIG.name} (q_proj, v_proj, rank 8)")
    started = time.perf_counter()
    artifact = make_fresh_artifact(DEFAULT_CONFIG, ["q_proj", "v_proj"], 8, artifact_dir, init="random")
    m = artifact.manifest
    print(
        f"      {artifact_dir}: {m.artifact_id}, {len(m.targets)} target modules, "
        f"{m.hypernetwork['parameters']:,} parameters, "
        f"ONNX parity {m.hypernetwork['onnx_parity_max_rel_error']:.1e} "
        f"({time.perf_counter() - started:.1f} s)"
    )

    port, metrics_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    _step(2, steps, f"starting the sidecar: chameleon serve --artifact {artifact_dir} --address {address}")
    log_path = workdir / "sidecar.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adapter_service.cli",
                "serve",
                "--artifact",
                str(artifact_dir),
                "--address",
                address,
                "--metrics-port",
                str(metrics_port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        with AdapterClient(address, timeout=10.0) as client:
            _wait_serving(client, proc, log_path)
            print(f"      SERVING (pid {proc.pid}); logs in {log_path}")
            _step(3, steps, f"sending one mixed batch of {batch} requests (auto k <= 8, float16)")
            stats, domains = synthetic_batch(batch, m.statistic.dim)
            ids = [f"req-{i:02d}" for i in range(batch)]
            result = client.adapt(stats, request_ids=ids, policy=AutoK(max_k=8), dtype="float16")
            _print_groups(result, domains)
            _print_adapters(result, m.scaling)
            t = result.timings
            print(
                f"      server time {t['total'] * 1e3:.1f} ms (cluster {t['cluster'] * 1e3:.1f}, "
                f"hyper-network {t['hypernetwork'] * 1e3:.1f}, encode {t['encode'] * 1e3:.1f})"
            )
            _step(4, steps, "same batch again, passing the adapter keys already held (tensors left out)")
            again = client.adapt(
                stats,
                request_ids=ids,
                policy=AutoK(max_k=8),
                dtype="float16",
                held_keys=[c.key for c in result.clusters],
            )
            same = np.array_equal(again.assignments, result.assignments)
            omitted = sum(c.omitted for c in again.clusters)
            print(
                f"      same groups: {same}; clusters sent without tensors: {omitted}/{again.k}; "
                f"server time {again.timings['total'] * 1e3:.1f} ms"
            )
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        )
        calls = [line for line in metrics.splitlines() if line.startswith("chameleon_rpcs_total")]
        print("      metrics: " + "; ".join(calls))
    finally:
        _step(5, steps, "stopping the sidecar (SIGTERM)")
        code = _terminate(proc)
    print(f"      sidecar exited with code {code}")
    print(
        "\nThis artifact is untrained: the groups are real, the adapters are not yet useful. "
        "`chameleon serve --artifact DIR` serves any artifact the same way."
    )
    return 0 if code == 0 else 1


def _wait_serving(client, proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    from adapter_service.client import AdapterServiceError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sidecar exited with code {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(AdapterServiceError):
            if client.health(timeout=1.0) == "SERVING":
                return
        time.sleep(0.2)
    raise SystemExit(f"the sidecar did not report SERVING within {timeout:.0f} s:\n{log_path.read_text()}")


def _terminate(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


def _print_groups(result, domains: list[str]) -> None:
    print(f"      {result.k} clusters:")
    for c in result.clusters:
        rows = np.flatnonzero(result.assignments == c.index)
        mix = {d: sum(domains[r] == d for r in rows) for d in DOMAINS}
        mix_text = ", ".join(f"{d} {n}" for d, n in mix.items() if n)
        print(f"        cluster {c.index}: {c.size:2d} requests ({mix_text}); key {c.key[:12]}")


def _print_adapters(result, scaling: float) -> None:
    c = result.clusters[0]
    name = next(iter(c.modules))
    delta = c.modules[name]
    a, b = delta.a.astype(np.float32), delta.b.astype(np.float32)
    norm = scaling * np.linalg.norm(b @ a)
    n_bytes = sum(d.a.nbytes + d.b.nbytes for cl in result.clusters for d in cl.modules.values())
    print(
        f"      cluster 0, {name}: A {list(a.shape)} B {list(b.shape)} {delta.a.dtype}, "
        f"||s B A|| = {norm:.4f}; {n_bytes / 1e6:.1f} MB of adapters for the batch"
    )
