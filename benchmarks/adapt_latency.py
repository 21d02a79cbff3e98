"""Adapt latency of the real sidecar, called through the real client over loopback gRPC.

Builds a rank-8 q_proj/v_proj artifact for a SmolLM2-135M-shaped model (30 layers, hidden 576, kv 192;
random init so the tensors are non-zero), starts `python -m adapter_service.cli serve` as a child process
(client and server do not share a GIL), and times `AdapterClient.adapt` for N in (8, 32, 128) rows x
dtype in (float32, float16) with AutoK(max_k=8). Each configuration is also called a second time with the
adapter keys of the call just made (`held_keys`), so the server omits every tensor: the "cached" path.

Configurations are interleaved (every iteration runs the whole grid, starting at a rotating position), so
machine noise hits all of them alike. Absolute numbers depend on the machine; compare rows, not hosts.

    python benchmarks/adapt_latency.py [--iters 200] [--warmup 20] [--out benchmarks/results] [--quick]

Writes OUT/adapt_latency.json (machine, artifact, settings, one record per configuration and path) and
OUT/adapt_latency.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/adapt_latency.py` without installing
    sys.path.insert(0, str(REPO))

from adapter_service.client import AdapterClient, build_adapt_request  # noqa: E402
from adapter_service.core.clustering import AutoK  # noqa: E402
from adapter_service.demo.sidecar import SidecarProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import synthetic_batch  # noqa: E402

CONFIG_PATH = REPO / "adapter_service" / "data" / "smollm2-135m-config.json"
TARGETS = ("q_proj", "v_proj")
RANK = 8
DIM = 576
SIZES = (8, 32, 128)
DTYPES = ("float32", "float16")
MAX_K = 8
SEEDS = tuple(range(1000, 1016))  # statistics seed of iteration i: SEEDS[i % len(SEEDS)]
STAGES = ("decode", "cluster", "hypernetwork", "encode", "total")
PATHS = ("fresh", "cached")
CALL_TIMEOUT_S = 30.0
QUICK_ITERS, QUICK_WARMUP = 10, 2


@dataclass
class Samples:
    """What one (N, dtype, path) configuration collected over the timed iterations."""

    wall: list[float] = field(default_factory=list)  # seconds, around client.adapt
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    k: list[int] = field(default_factory=list)
    omitted: list[int] = field(default_factory=list)
    tensor_bytes: list[int] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--iters", type=int, default=200, help="timed rounds over the whole grid")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds over the whole grid first")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_ITERS} iters, {QUICK_WARMUP} warmup rounds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = QUICK_ITERS, QUICK_WARMUP
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="adapt-latency-") as tmp:
        tmpdir = Path(tmp)
        artifact_facts = make_artifact(tmpdir / "artifact")
        samples, wire, exit_code = run_sidecar_benchmark(tmpdir, args.iters, args.warmup)

    records = [
        summarise(n, dtype, path, samples[n, dtype, path], wire[n, dtype, path])
        for n in SIZES
        for dtype in DTYPES
        for path in PATHS
    ]
    report = {
        "benchmark": "adapt_latency",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "artifact": artifact_facts,
        "settings": {
            "iters": args.iters,
            "warmup": args.warmup,
            "quick": args.quick,
            "sizes": list(SIZES),
            "dtypes": list(DTYPES),
            "dim": DIM,
            "policy": {"auto": {"max_k": MAX_K, "min_cluster_size": 1}},
            "statistics": "benchmarks/synthetic.py synthetic_batch(N, 576, seed) (4 domains)",
            "seeds": list(SEEDS),
            "order": "interleaved: each iteration runs every (N, dtype) once, starting at a rotating "
            "position; each fresh call is followed by a cached call (held_keys = its keys)",
            "transport": "loopback TCP gRPC, sidecar in a child process, blocking AdapterClient",
            "server_command": "python -m adapter_service.cli serve --artifact DIR --address 127.0.0.1:PORT "
            "--metrics-port -1 --plain-logs --log-level warning",
            "server_exit_code": exit_code,
            "latency": "wall time around AdapterClient.adapt (encode request, RPC, decode + check response)",
        },
        "records": records,
    }
    json_path = args.out / "adapt_latency.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = args.out / "adapt_latency.png"
    plot(records, png_path, report)
    print_table(records)
    print(f"\nwrote {json_path} and {png_path}")
    if exit_code != 0:
        print(f"error: the sidecar exited with code {exit_code} after SIGTERM (expected 0)", file=sys.stderr)
        return 1
    return 0


def make_artifact(path: Path) -> dict:
    from adapter_service.training.export import make_fresh_artifact

    started = time.perf_counter()
    artifact = make_fresh_artifact(CONFIG_PATH, list(TARGETS), RANK, path, init="random")
    m = artifact.manifest
    return {
        "config": CONFIG_PATH.name,
        "artifact_id": m.artifact_id,
        "sha256": artifact.sha256,
        "targets": list(TARGETS),
        "target_modules": len(m.targets),
        "groups": [
            {"name": g.name, "d_in": g.d_in, "d_out": g.d_out, "modules": len(g.modules)} for g in m.groups
        ],
        "rank": m.rank,
        "hypernetwork_parameters": m.hypernetwork["parameters"],
        "hypernetwork_hidden": m.hypernetwork["config"]["hidden"],
        "init": "random",
        "onnx_bytes": len(artifact.onnx_bytes),
        "adapter_values_per_cluster": sum(RANK * (d_in + d_out) for _, d_in, d_out in m.targets),
        "export_seconds": round(time.perf_counter() - started, 2),
    }


def run_sidecar_benchmark(tmpdir: Path, iters: int, warmup: int):
    """Start the sidecar, run the interleaved grid, always stop it; returns samples, wire sizes, exit code."""
    from tqdm import tqdm

    log_path = tmpdir / "sidecar.log"
    # The sidecar child must import this checkout even when it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    grid = [(n, dtype) for n in SIZES for dtype in DTYPES]
    batches = {(n, seed): synthetic_batch(n, DIM, seed=seed) for n in SIZES for seed in SEEDS}
    policy = AutoK(max_k=MAX_K)
    samples = {(n, dtype, path): Samples() for n, dtype in grid for path in PATHS}
    wire: dict[tuple[int, str, str], dict] = {}
    exit_code: int | None = None
    sidecar = SidecarProcess(
        tmpdir / "artifact", log_path=log_path, extra_args=["--plain-logs", "--log-level", "warning"]
    )
    try:
        with AdapterClient(sidecar.address, timeout=CALL_TIMEOUT_S) as client:
            client.manifest()
            for n, dtype in grid:  # serialized response size, once per config, from the raw stub
                wire.update(wire_sizes(client, batches[n, SEEDS[0]], n, dtype, policy))
            rounds = warmup + iters
            with tqdm(total=rounds * len(grid) * 2, desc="adapt calls", unit="call", smoothing=0.05) as bar:
                for i in range(rounds):
                    timed = i >= warmup
                    seed = SEEDS[i % len(SEEDS)]
                    start = i % len(grid)
                    for n, dtype in grid[start:] + grid[:start]:
                        stats = batches[n, seed]
                        fresh = timed_adapt(client, stats, policy, dtype, ())
                        cached = timed_adapt(client, stats, policy, dtype, [c.key for c in fresh[1].clusters])
                        if cached[1].k != fresh[1].k or not all(c.omitted for c in cached[1].clusters):
                            raise SystemExit(
                                f"N={n} {dtype} seed {seed}: the repeated call with held keys did not omit "
                                f"every adapter (k {fresh[1].k} -> {cached[1].k}, omitted "
                                f"{sum(c.omitted for c in cached[1].clusters)})"
                            )
                        if timed:
                            record(samples[n, dtype, "fresh"], *fresh)
                            record(samples[n, dtype, "cached"], *cached)
                        bar.update(2)
    finally:
        exit_code = sidecar.stop()
        if exit_code != 0:
            print(f"sidecar log ({log_path}):\n{log_path.read_text()}", file=sys.stderr)
    return samples, wire, exit_code


def timed_adapt(client: AdapterClient, stats: np.ndarray, policy: AutoK, dtype: str, held: list | tuple):
    started = time.perf_counter()
    result = client.adapt(stats, policy=policy, dtype=dtype, held_keys=held)
    return time.perf_counter() - started, result


def record(s: Samples, wall: float, result) -> None:
    s.wall.append(wall)
    for stage in STAGES:
        s.stages[stage].append(result.timings[stage])
    s.k.append(result.k)
    s.omitted.append(sum(c.omitted for c in result.clusters))
    s.tensor_bytes.append(sum(d.a.nbytes + d.b.nbytes for c in result.clusters for d in c.modules.values()))


def wire_sizes(client: AdapterClient, stats: np.ndarray, n: int, dtype: str, policy: AutoK) -> dict:
    """Serialized AdaptResponse size for one reference batch, fresh and with all keys held."""
    fresh = client.stub.Adapt(build_adapt_request(stats, policy=policy, dtype=dtype), timeout=CALL_TIMEOUT_S)
    keys = [c.adapter_key for c in fresh.clusters]
    cached = client.stub.Adapt(
        build_adapt_request(stats, policy=policy, dtype=dtype, held_keys=keys), timeout=CALL_TIMEOUT_S
    )
    reference = {"seed": SEEDS[0], "k": len(fresh.clusters)}
    return {
        (n, dtype, "fresh"): {**reference, "serialized_bytes": fresh.ByteSize()},
        (n, dtype, "cached"): {**reference, "serialized_bytes": cached.ByteSize()},
    }


def summarise(n: int, dtype: str, path: str, s: Samples, wire: dict) -> dict:
    wall_ms = np.asarray(s.wall) * 1e3
    total_ms = np.asarray(s.stages["total"]) * 1e3
    k_values, k_counts = np.unique(s.k, return_counts=True)
    return {
        "n": n,
        "dtype": dtype,
        "path": path,
        "calls": len(s.wall),
        "latency_ms": {
            "p50": pct(wall_ms, 50),
            "p90": pct(wall_ms, 90),
            "p99": pct(wall_ms, 99),
            "mean": r3(wall_ms.mean()),
            "min": r3(wall_ms.min()),
            "max": r3(wall_ms.max()),
        },
        "server_stage_ms": {
            stage: {"p50": pct(np.asarray(v) * 1e3, 50), "mean": r3(np.mean(v) * 1e3)}
            for stage, v in s.stages.items()
        },
        # Everything outside the server's own measured work: request encode, gRPC both ways, response
        # parse and checks in the client, scheduling. Per call wall - server total, then summarised.
        "outside_server_ms": {"p50": pct(wall_ms - total_ms, 50), "mean": r3((wall_ms - total_ms).mean())},
        "k_mean": r3(np.mean(s.k)),
        "k_counts": {str(int(k)): int(c) for k, c in zip(k_values, k_counts, strict=True)},
        "omitted_mean": r3(np.mean(s.omitted)),
        "response_tensor_bytes_mean": r3(np.mean(s.tensor_bytes)),
        "response_serialized_bytes": wire["serialized_bytes"],
        "serialized_reference": {"seed": wire["seed"], "k": wire["k"]},
    }


def pct(values: np.ndarray, q: float) -> float:
    return r3(np.percentile(values, q))


def r3(x: float) -> float:
    return round(float(x), 3)


def machine_info() -> dict:
    import grpc

    from adapter_service.serving.runtime import import_onnxruntime

    ort = import_onnxruntime()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
    }


def plot(records: list[dict], out_path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["n"], r["dtype"], r["path"]): r for r in records}
    colours = {"float32": "tab:blue", "float16": "tab:orange"}
    fig, (ax_lat, ax_stage) = plt.subplots(1, 2, figsize=(15, 5.8), gridspec_kw={"width_ratios": [1, 1.5]})

    for dtype in DTYPES:
        for path, style in (("fresh", "-"), ("cached", ":")):
            for q, marker in (("p50", "o"), ("p99", "^")):
                ys = [by[n, dtype, path]["latency_ms"][q] for n in SIZES]
                ax_lat.plot(
                    SIZES,
                    ys,
                    style,
                    marker=marker,
                    color=colours[dtype],
                    alpha=1.0 if path == "fresh" else 0.7,
                    label=f"{dtype} {path} {q}",
                )
    ax_lat.set_xscale("log", base=2)
    ax_lat.set_yscale("log")
    ax_lat.set_xticks(SIZES, [str(n) for n in SIZES])
    ax_lat.set_xlabel("N (rows in the batch)")
    ax_lat.set_ylabel("client-observed latency (ms)")
    ax_lat.set_title("Adapt latency vs batch size")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=7.5, ncol=2, loc="best")

    stage_colours = {
        "decode": "tab:gray",
        "cluster": "tab:green",
        "hypernetwork": "tab:purple",
        "encode": "tab:red",
    }
    labels, x, width = [], [], 0.8
    bars = [(n, dtype, path) for n in SIZES for path in PATHS for dtype in DTYPES]
    for i, key in enumerate(bars):
        xi = i + (i // 4) * 0.8  # gap between N groups
        x.append(xi)
        n, dtype, path = key
        labels.append(f"N={n}\n{dtype.replace('float', 'f')}\n{path}")
        rec = by[key]
        bottom = 0.0
        for stage, colour in stage_colours.items():
            v = rec["server_stage_ms"][stage]["mean"]
            ax_stage.bar(
                xi,
                v,
                width,
                bottom=bottom,
                color=colour,
                hatch="//" if path == "cached" else None,
                edgecolor="white",
                linewidth=0.5,
                label=stage if i == 0 else None,
            )
            bottom += v
        outside = rec["outside_server_ms"]["mean"]
        ax_stage.bar(
            xi,
            outside,
            width,
            bottom=bottom,
            color="lightgray",
            edgecolor="black",
            linewidth=0.3,
            label="outside server (client + gRPC)" if i == 0 else None,
        )
        ax_stage.text(
            xi, bottom + outside, f"{rec['latency_ms']['mean']:.1f}", ha="center", va="bottom", fontsize=7
        )
    ax_stage.set_xticks(x, labels, fontsize=7)
    ax_stage.set_ylabel("mean ms per call (stacked)")
    ax_stage.set_title("Server stage breakdown (mean; bar top = mean client latency; hatched = cached)")
    ax_stage.legend(fontsize=8, loc="upper left")
    ax_stage.grid(True, axis="y", alpha=0.3)

    m, a = report["machine"], report["artifact"]
    fig.suptitle(
        f"{a['artifact_id']}: rank {a['rank']}, {a['target_modules']} modules, "
        f"{a['hypernetwork_parameters']:,} params | AutoK(max_k={MAX_K}) | "
        f"{report['settings']['iters']} iters, interleaved | {m['cpu_count']} CPUs, ort {m['onnxruntime']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)


def print_table(records: list[dict]) -> None:
    header = (
        f"{'N':>4} {'dtype':<8} {'path':<7} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8} | "
        f"{'decode':>7} {'cluster':>8} {'hypernet':>8} {'encode':>7} {'total':>7} | "
        f"{'outside':>7} {'k':>5} {'tensor B':>12} {'wire B':>11}"
    )
    print(
        "\nlatency ms (client wall) | server stage ms (p50) | outside = client wall - server total (p50); "
        f"tensor B = mean A+B nbytes per call; wire B = serialized AdaptResponse for seed {SEEDS[0]}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        lat, st = r["latency_ms"], r["server_stage_ms"]
        print(
            f"{r['n']:>4} {r['dtype']:<8} {r['path']:<7} "
            f"{lat['p50']:>8.2f} {lat['p90']:>8.2f} {lat['p99']:>8.2f} "
            f"{lat['mean']:>8.2f} | {st['decode']['p50']:>7.3f} {st['cluster']['p50']:>8.2f} "
            f"{st['hypernetwork']['p50']:>8.2f} {st['encode']['p50']:>7.2f} {st['total']['p50']:>7.2f} | "
            f"{r['outside_server_ms']['p50']:>7.2f} {r['k_mean']:>5.2f} "
            f"{r['response_tensor_bytes_mean']:>12,.0f} {r['response_serialized_bytes']:>11,}"
        )


if __name__ == "__main__":
    sys.exit(main())
