"""`chameleon demo`: the whole service path on an embedded default, in one command.

Makes an artifact for a SmolLM2-135M-shaped model (its config ships in the package; no weights
needed), starts the real sidecar as a child process on loopback, sends one mixed batch through the
real client, shows how the batch was grouped and what came back, and stops the sidecar with SIGTERM.

The hyper-network here is untrained (random init, so the tensors are visibly non-zero) and the
statistics are synthetic: this shows the plumbing and its cost, not a quality gain.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np

from adapter_service.clustering import AutoK
from adapter_service.sidecar import SidecarProcess, free_port

DEFAULT_CONFIG = Path(__file__).with_name("data") / "smollm2-135m-config.json"
DOMAINS = ("encyclopedia", "news", "scripture", "jokes")


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

    metrics_port = free_port()
    log_path = workdir / "sidecar.log"
    _step(2, steps, f"starting the sidecar: chameleon serve --artifact {artifact_dir} (loopback)")
    sidecar = SidecarProcess(artifact_dir, metrics_port=metrics_port, log_path=log_path)
    try:
        print(f"      SERVING on {sidecar.address} (pid {sidecar.pid}); logs in {log_path}")
        with AdapterClient(sidecar.address, timeout=10.0) as client:
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
        code = sidecar.stop()
    print(f"      sidecar exited with code {code}")
    print(
        "\nThis artifact is untrained: the groups are real, the adapters are not yet useful. "
        "`chameleon serve --artifact DIR` serves any artifact the same way."
    )
    return 0 if code == 0 else 1


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
