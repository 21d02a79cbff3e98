"""How many Adapt calls per second one sidecar core sustains: the number to size sidecar replicas by.

The real sidecar (`python -m adapter_service.cli serve`, a child process) has every one of its threads
pinned to one CPU core, and this process, pinned to another, sends closed-loop Adapt calls from C client
threads (C = 1, then enough to keep the core busy) for a fixed time. Per configuration it records the
calls answered per second, latency percentiles, and the sidecar's own CPU seconds per call (from the
kernel's accounting of its process): the sidecar's capacity per core is 1 / (CPU seconds per call),
whether or not the client could load it fully.

Configurations, each a batch of 32 synthetic request statistics clustered with auto k <= 8 (the
plugins' default policy):
- artifacts: the shipped demo artifact (the default recipe's shape: a mixture of 12 rank-4 bases on the
  query and value projections of SmolLM2's first 4 layers, grouped by predicted label), and a mixture of
  6 rank-8 bases on the same projections of all 30 layers (benchmarks/compact_wire.py's artifact), the
  heaviest a SmolLM2-sized model gets from the default targets' kind;
- forms: "whole" (every cluster's A and B, nothing held: a client's first calls, or a client without
  the compact form), "compact" (the bases held, weights only: chameleon_torch and the engine plugins'
  steady state).

    python benchmarks/sidecar_capacity.py [--seconds 8] [--out benchmarks/results] [--quick]

Writes OUT/sidecar_capacity.json and OUT/sidecar_capacity.png and prints a table. Needs 2 cores (one for
the sidecar, one for the client) and nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/sidecar_capacity.py` without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import synthetic_batch  # noqa: E402

from adapter_service.client import AdapterClient  # noqa: E402
from adapter_service.core.clustering import AutoK  # noqa: E402
from adapter_service.demo.sidecar import SidecarProcess  # noqa: E402

DEMO_ARTIFACT = REPO / "adapter_service" / "data" / "demo-artifact"
FORMS = ("whole", "compact")
CONCURRENCY = (1, 4)
BATCH, DIM, MAX_K = 32, 576, 8
DTYPE = "float16"
SERVER_CORE, CLIENT_CORE = 0, 1
CALL_TIMEOUT_S = 30.0
QUICK_SECONDS = 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_SECONDS} s per configuration"
    )
    args = parser.parse_args(argv)
    seconds = QUICK_SECONDS if args.quick else args.seconds
    if seconds <= 0:
        parser.error("--seconds must be positive")
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs 2 usable cores: one for the sidecar, one for the client")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        from compact_wire import make_artifact

        all_layers = Path(tmp) / "all-layers"
        make_artifact(all_layers)
        artifacts = {"demo (default recipe, 4 layers)": DEMO_ARTIFACT, "all 30 layers, rank 48": all_layers}
        for name, path in artifacts.items():
            records += measure(name, path, Path(tmp), seconds)
    result = {
        "benchmark": "sidecar_capacity",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "settings": {
            "seconds": seconds,
            "batch_rows": BATCH,
            "policy": f"auto k <= {MAX_K}",
            "dtype": DTYPE,
            "sidecar": "one core (every thread pinned), --workers 4 --ort-threads 1 --blas-threads 1",
        },
        "records": records,
        "capacity_per_core": {
            f"{r['artifact']} / {r['form']}": r["calls_per_core_second"]
            for r in records
            if r["concurrency"] == max(CONCURRENCY)
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sidecar_capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(records, args.out / "sidecar_capacity.png")
    print_table(records)
    return 0


def pin(pid: int, core: int) -> None:
    """Every thread of `pid` on `core` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {core})


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, artifact: Path, tmp: Path, seconds: float) -> list[dict]:
    from tqdm import tqdm

    batches = [synthetic_batch(BATCH, DIM, seed=seed) for seed in range(16)]
    sidecar = SidecarProcess(
        artifact,
        log_path=tmp / "sidecar.log",
        extra_args=[
            "--plain-logs", "--log-level", "warning", "--workers", "4", "--ort-threads", "1",
            "--blas-threads", "1",
        ],
    )  # fmt: skip
    records = []
    try:
        pin(sidecar.pid, SERVER_CORE)
        os.sched_setaffinity(0, {CLIENT_CORE})
        grid = [(form, c) for form in FORMS for c in CONCURRENCY]
        for form, concurrency in tqdm(grid, desc=name, unit="config"):
            records.append(load(name, form, concurrency, sidecar, batches, seconds))
    finally:
        sidecar.stop()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return records


def load(name: str, form: str, concurrency: int, sidecar: SidecarProcess, batches, seconds: float) -> dict:
    """Closed-loop calls from `concurrency` threads (one client each, as separate model servers would
    be) for `seconds`, after one untimed second."""
    compact = form == "compact"
    clients = [AdapterClient(sidecar.address, timeout=CALL_TIMEOUT_S) for _ in range(concurrency)]
    for client in clients:  # manifest and, for the compact form, the bases: held from here on
        client.adapt(batches[0], policy=AutoK(max_k=MAX_K), dtype=DTYPE, compact=compact, rebuild=False)
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    timing = threading.Event()
    stop = threading.Event()

    def worker(i: int) -> None:
        n = i
        while not stop.is_set():
            stats = batches[n % len(batches)]
            n += concurrency
            started = time.perf_counter()
            try:
                clients[i].adapt(
                    stats, policy=AutoK(max_k=MAX_K), dtype=DTYPE, compact=compact, rebuild=False
                )
            except Exception as exc:  # counted and reported, never hidden
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if timing.is_set():
                latencies[i].append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    cpu_before, started = cpu_seconds(sidecar.pid), time.perf_counter()
    timing.set()
    time.sleep(seconds)
    timing.clear()
    cpu_after, elapsed = cpu_seconds(sidecar.pid), time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join()
    for client in clients:
        client.close()
    done = np.array([x for per in latencies for x in per])
    calls = len(done)
    cpu_per_call = (cpu_after - cpu_before) / calls if calls else None
    return {
        "artifact": name,
        "form": form,
        "concurrency": concurrency,
        "calls": calls,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "calls_per_second": round(calls / elapsed, 1),
        "sidecar_core_busy": round((cpu_after - cpu_before) / elapsed, 3),
        "sidecar_cpu_ms_per_call": round(1e3 * cpu_per_call, 3) if cpu_per_call else None,
        "calls_per_core_second": round(1 / cpu_per_call, 1) if cpu_per_call else None,
        "p50_ms": round(1e3 * float(np.percentile(done, 50)), 2) if calls else None,
        "p99_ms": round(1e3 * float(np.percentile(done, 99)), 2) if calls else None,
    }


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["concurrency"] == max(CONCURRENCY)]
    labels = [f"{r['artifact']}\n{r['form']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(
        labels,
        [r["calls_per_core_second"] or 0 for r in rows],
        color="#4a7",
        label="per core (1 / CPU per call)",
    )
    ax.barh(
        labels,
        [r["calls_per_second"] for r in rows],
        color="#246",
        height=0.4,
        label="answered (one pinned core)",
    )
    ax.set_xlabel("Adapt calls per second (32 rows, auto k <= 8)")
    ax.set_title("Sidecar capacity on one core")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(records: list[dict]) -> None:
    columns = ("artifact", "form", "clients", "calls/s", "core busy", "CPU ms/call", "calls per core-second")
    columns += ("p50 ms", "p99 ms", "errors")
    print("| " + " | ".join(columns) + " |")
    print("| --- " * len(columns) + "|")
    for r in records:
        print(
            f"| {r['artifact']} | {r['form']} | {r['concurrency']} | {r['calls_per_second']} | "
            f"{r['sidecar_core_busy']} | {r['sidecar_cpu_ms_per_call']} | {r['calls_per_core_second']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
