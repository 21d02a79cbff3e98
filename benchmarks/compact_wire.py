"""Whole adapters against the mixture's compact form, through the real sidecar and client.

A mixture artifact (6 bases of rank 8 = rank 48, q_proj and v_proj of all 30 layers of a SmolLM2-135M-
shaped model, random init so every tensor is non-zero) is served by `python -m adapter_service.cli serve
--max-clusters 32` in a child process. For a batch of 32 synthetic statistics and k = 1, 4, 8, 16, 32
clusters (32 = one adapter per request), it measures, in float16:

- whole: every cluster's A and B (`compact=False`), as before the compact form existed;
- compact, first call: the bases (one rank-48 adapter) plus 6 weights per cluster;
- compact: the bases held by the client, so only the weights travel; the client rebuilds every
  cluster's whole A and B (`rebuild=True`, what a caller that wants whole adapters pays);
- compact, weights only: the same answer left as weights (`rebuild=False`), what chameleon_torch pays
  (it applies the bases and per-row weights directly).

Per form and k: the serialized AdaptResponse size, and the median wall time of `AdapterClient.adapt`
(request, RPC, checks and, for compact, rebuilding every cluster's B). Rounds are interleaved over the
grid. It also checks that the compact form rebuilds the whole form's tensors.

    python benchmarks/compact_wire.py [--iters 10] [--out benchmarks/results] [--quick]

Writes OUT/compact_wire.json and OUT/compact_wire.png and prints a table. Absolute times depend on the
machine; compare forms within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/compact_wire.py` without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import synthetic_batch  # noqa: E402

from adapter_service.client import AdapterClient, AdapterServiceError, BasesCache, build_adapt_request  # noqa: E402
from adapter_service.core.clustering import FixedK  # noqa: E402
from adapter_service.demo.sidecar import SidecarProcess  # noqa: E402

CONFIG_PATH = REPO / "adapter_service" / "data" / "smollm2-135m-config.json"
TARGETS = ("q_proj", "v_proj")
BASES, BASIS_RANK = 6, 8
BATCH, DIM = 32, 576
KS = (1, 4, 8, 16, 32)
DTYPE = "float16"
FORMS = ("whole", "compact, first call", "compact", "compact, weights only")
CALL_TIMEOUT_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds over the whole grid")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, k = 1 and 32")
    args = parser.parse_args(argv)
    ks = (1, 32) if args.quick else KS
    iters = 2 if args.quick else args.iters
    if iters < 1:
        parser.error("--iters must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compact-wire-") as tmp:
        artifact = make_artifact(Path(tmp) / "artifact")
        records, parity, exit_code = run(Path(tmp), ks, iters)
    report = {
        "benchmark": "compact_wire",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_count": os.cpu_count()},
        "artifact": artifact,
        "settings": {
            "batch": BATCH,
            "ks": list(ks),
            "dtype": DTYPE,
            "iters": iters,
            "policy": "FixedK(k)",
            "statistics": "benchmarks/synthetic.py synthetic_batch(32, 576, seed)",
            "server": "python -m adapter_service.cli serve --max-clusters 32 (64 MiB message limit)",
            "latency": "median wall time around AdapterClient.adapt",
            "server_exit_code": exit_code,
        },
        "compact_rebuilds_whole_max_rel_error": parity,
        "records": records,
    }
    (args.out / "compact_wire.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(records, args.out / "compact_wire.png")
    print_table(records)
    print(f"compact rebuilds the whole form to {parity:.1e} (max relative error, {DTYPE})")
    print(f"wrote {args.out / 'compact_wire.json'} and {args.out / 'compact_wire.png'}")
    return 0 if exit_code == 0 else 1


def make_artifact(path: Path) -> dict:
    import torch

    from adapter_service.training.export import export_artifact, load_model, plan_export
    from adapter_service.training.hypernetwork import build_network

    model = load_model(CONFIG_PATH)
    plan = plan_export(model, list(TARGETS), BASES * BASIS_RANK, init="random", kind="mixture", bases=BASES)
    torch.manual_seed(0)
    network = build_network(plan.hypernetwork_config)
    network.fit_statistics(torch.from_numpy(synthetic_batch(256, DIM, seed=7)))
    artifact = export_artifact(network.eval(), plan, path)
    m = artifact.manifest
    return {
        "artifact_id": m.artifact_id,
        "targets": len(m.targets),
        "rank": m.rank,
        "bases": BASES,
        "adapter_values_per_cluster": sum(m.rank * (d_in + d_out) for _, d_in, d_out in m.targets),
    }


def run(tmpdir: Path, ks: tuple[int, ...], iters: int) -> tuple[list[dict], float, int | None]:
    from tqdm import tqdm

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    stats = synthetic_batch(BATCH, DIM, seed=1)
    wall: dict[tuple[int, str], list[float]] = {(k, f): [] for k in ks for f in FORMS}
    sizes: dict[tuple[int, str], int | None] = {}
    refused: dict[tuple[int, str], str] = {}
    parity = 0.0
    sidecar = SidecarProcess(
        tmpdir / "artifact",
        log_path=tmpdir / "sidecar.log",
        extra_args=["--plain-logs", "--log-level", "warning", "--max-clusters", "32"],
    )
    try:
        with AdapterClient(sidecar.address, timeout=CALL_TIMEOUT_S) as client:
            for k in ks:
                sizes.update(wire_sizes(client, stats, k, refused))
            with tqdm(total=iters * len(ks) * len(FORMS), desc="adapt calls", unit="call") as bar:
                for i in range(iters):
                    for k in ks[i % len(ks) :] + ks[: i % len(ks)]:
                        whole = timed(client, stats, k, "whole", wall, refused)
                        client.bases = BasesCache()  # forget the bases: the first call of a new client
                        timed(client, stats, k, "compact, first call", wall, refused)
                        compact = timed(client, stats, k, "compact", wall, refused)
                        timed(client, stats, k, "compact, weights only", wall, refused)
                        if whole is not None:
                            parity = max(parity, rebuild_error(whole, compact))
                        bar.update(len(FORMS))
    finally:
        exit_code = sidecar.stop()
    records = []
    for k in ks:
        for form in FORMS:
            times = wall[k, form]
            records.append(
                {
                    "k": k,
                    "form": form,
                    "serialized_bytes": sizes.get((k, form)),
                    "refused": refused.get((k, form)),
                    "median_ms": round(1e3 * float(np.median(times)), 2) if times else None,
                    "calls": len(times),
                }
            )
    return records, parity, exit_code


def wire_sizes(client: AdapterClient, stats: np.ndarray, k: int, refused: dict) -> dict:
    """Serialized response sizes from the raw stub (what crosses the wire)."""
    out = {}
    requests = {
        "whole": build_adapt_request(stats, policy=FixedK(k), dtype=DTYPE),
        "compact, first call": build_adapt_request(stats, policy=FixedK(k), dtype=DTYPE, compact=True),
    }
    for form, request in requests.items():
        try:
            response = client.stub.Adapt(request, timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # grpc.RpcError: recorded, the whole form may exceed the limit
            refused[k, form] = f"{exc.code().name}: {exc.details()}"
            out[k, form] = None
            continue
        out[k, form] = response.ByteSize()
        if form == "compact, first call":
            held = build_adapt_request(
                stats, policy=FixedK(k), dtype=DTYPE, compact=True, held_keys=[response.bases_key]
            )
            out[k, "compact"] = client.stub.Adapt(held, timeout=CALL_TIMEOUT_S).ByteSize()
            out[k, "compact, weights only"] = out[k, "compact"]
    return out


def timed(client: AdapterClient, stats: np.ndarray, k: int, form: str, wall: dict, refused: dict):
    if (k, form) in refused:
        return None
    started = time.perf_counter()
    try:
        weights_only = form == "compact, weights only"
        result = client.adapt(
            stats,
            policy=FixedK(k),
            dtype=DTYPE,
            compact=form != "whole",
            rebuild=not weights_only,
            # as chameleon_torch: it holds the bases in its own cache and says so
            held_keys=client.bases.keys() if weights_only else (),
        )
    except AdapterServiceError as exc:
        refused[k, form] = f"{exc.code.name}: {exc.details}"
        return None
    wall[k, form].append(time.perf_counter() - started)
    return result


def rebuild_error(whole, compact) -> float:
    worst = 0.0
    for w, c in zip(whole.clusters, compact.clusters, strict=True):
        for name, delta in w.modules.items():
            for x, y in ((delta.a, c.modules[name].a), (delta.b, c.modules[name].b)):
                x, y = x.astype(np.float32), y.astype(np.float32)
                worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_ms) = plt.subplots(1, 2, figsize=(12, 4.5))
    for form, marker in zip(FORMS, "osd^", strict=True):
        rows = [r for r in records if r["form"] == form]
        ks = [r["k"] for r in rows if r["serialized_bytes"]]
        ax_bytes.plot(
            ks,
            [r["serialized_bytes"] / 1e6 for r in rows if r["serialized_bytes"]],
            marker=marker,
            label=form,
        )
        ks = [r["k"] for r in rows if r["median_ms"] is not None]
        ax_ms.plot(
            ks, [r["median_ms"] for r in rows if r["median_ms"] is not None], marker=marker, label=form
        )
    ax_bytes.axhline(64 * 1024 * 1024 / 1e6, color="grey", linestyle="--", label="64 MiB message limit")
    for ax, label in ((ax_bytes, "AdaptResponse size (MB)"), (ax_ms, "client.adapt, median (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clusters k in a batch of 32 (32 = per request)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Rank-48 mixture (6 x r8) on q/v of 30 layers, float16: whole adapters vs the compact form")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(records: list[dict]) -> None:
    print(f"{'k':>3}  {'form':<20} {'response bytes':>15} {'median ms':>10}")
    for r in records:
        size = f"{r['serialized_bytes']:,}" if r["serialized_bytes"] else "refused"
        ms = f"{r['median_ms']:.1f}" if r["median_ms"] is not None else "-"
        print(f"{r['k']:>3}  {r['form']:<20} {size:>15} {ms:>10}")


if __name__ == "__main__":
    raise SystemExit(main())
