"""The reliability drill: load, fuzz, faults, drains and hijack attempts against real processes on loopback.

    python benchmarks/drill.py [--quick] [--out benchmarks/results]

Every part starts its own `chameleon serve` (and, for the HTTP parts, `chameleon serve-model` with a tiny
Llama made here) as child processes, drives them with the project's real clients or raw sockets, and
writes what it saw to OUT/drill.json and OUT/drill.png:

- load: clients x seconds of Adapt calls on the demo artifact, compact and whole forms: calls/s, p50/p99,
  errors by status, the sidecar's RSS after warm-up, at its peak and at the end.
- fuzz: seeded malformed requests (bad shapes, overflowing dimensions, NaN, unknown enums, duplicate or
  huge ids, truncated and random bytes) sent as raw bytes: status counts; INTERNAL/UNKNOWN must be 0.
- faults: generating HTTP clients while the sidecar is killed (SIGKILL) and restarted: failed generations
  and the seconds from the new sidecar serving to the first adapted batch.
- drains: SIGTERM of the sidecar with Adapt calls in flight (CANCELLED must be 0 within the grace), and
  of the model server with a generation in flight (a 503 or stream error event, exit code 0).
- hijack: a second sidecar on the same TCP port and on the same unix socket (both must be refused).
- connections: many concurrent HTTP clients against the model server (429s allowed, no resets).

Absolute numbers depend on the machine; the invariants (zeros) do not.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/drill.py` without installing
    sys.path.insert(0, str(REPO))

from adapter_service.client import AdapterClient, AdapterServiceError  # noqa: E402
from adapter_service.core.clustering import AutoK, FixedK  # noqa: E402
from adapter_service.demo.sidecar import SidecarProcess, free_port  # noqa: E402
from adapter_service.proto import adapter_service_pb2 as pb  # noqa: E402

DEMO = REPO / "adapter_service" / "data" / "demo-artifact"
ADAPT = "/chameleon.v1.AdapterService/Adapt"
CHAMELEON = [sys.executable, "-m", "adapter_service.cli"]


def rss_sampler(pid: int, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            samples.append((time.monotonic(), proc.memory_info().rss))
        stop.wait(0.25)


def load(clients: int, seconds: float, compact: bool) -> dict:
    """`clients` threads, each with its own channel, calling Adapt back to back for `seconds`."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    with SidecarProcess(DEMO) as sidecar:
        dim = AdapterClient(sidecar.address, timeout=5).manifest().statistic.dim
        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=rss_sampler, args=(sidecar.pid, stop, samples), daemon=True)
        sampler.start()
        started = time.monotonic()
        warm_until = started + min(5.0, seconds / 5)

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with AdapterClient(sidecar.address, timeout=10) as client:
                while time.monotonic() < started + seconds:
                    stats = rng.standard_normal((32, dim)).astype(np.float32)
                    t0 = time.perf_counter()
                    try:
                        client.adapt(stats, policy=AutoK(max_k=8), dtype="float16", compact=compact)
                        with lock:
                            latencies.append(time.perf_counter() - t0)
                    except AdapterServiceError as exc:
                        with lock:
                            errors[str(exc.code.name if exc.code else exc)] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
    warm = [rss for t, rss in samples if t >= warm_until] or [rss for _, rss in samples]
    ms = np.array(latencies) * 1000
    return {
        "form": "compact" if compact else "whole",
        "clients": clients,
        "seconds": round(elapsed, 1),
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "errors": dict(errors),
        "rss_mb": {
            "after_warmup": round(warm[0] / 2**20, 1),
            "peak": round(max(warm) / 2**20, 1),
            "end": round(warm[-1] / 2**20, 1),
        },
        "rss_end_vs_warmup": round(warm[-1] / warm[0], 3),
    }


def fuzz_requests(n: int, seed: int, dim: int) -> list[bytes]:
    """Malformed (and some valid) AdaptRequests as wire bytes."""
    rng = random.Random(seed)
    dims = [0, 1, 2, 8, dim, dim + 1, -1, 2**31, 2**62, 2**63 - 1]
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # random bytes
            out.append(rng.randbytes(rng.randrange(0, 64)))
            continue
        shape = [rng.choice(dims) for _ in range(rng.choice([0, 1, 2, 2, 2, 3]))]
        if kind == 1:  # well-formed statistics; the rest of the request may still be wrong
            shape = [rng.randrange(1, 9), dim]
        count = max(0, min(int(np.prod([max(d, 0) for d in shape], dtype=object) or 0), 8192))
        values = np.random.default_rng(i).standard_normal(count).astype(np.float32)
        if rng.random() < 0.2 and count and kind != 1:
            values[rng.randrange(count)] = rng.choice([np.nan, np.inf, -np.inf])
        data = values.tobytes()
        if rng.random() < 0.2 and kind != 1:
            data = data[: rng.randrange(len(data) + 1)]
        request = pb.AdaptRequest(
            statistics=pb.Tensor(
                dtype=1 if kind == 1 else rng.choice([0, 1, 2, 3, 7, -5]), shape=shape, data=data
            ),
            dtype=rng.choice([0, 1, 2, 3] if kind == 1 else [0, 1, 2, 3, 9]),
            compact=rng.random() < 0.5,
        )
        rows = shape[0] if shape and 0 <= shape[0] <= 64 else 3
        if rng.random() < 0.3:
            request.request_ids.extend(
                rng.choice([["a"] * rows, ["x" * 100_000] * 2, [str(j) for j in range(rows)]])
            )
        choice = rng.randrange(4)
        if choice == 0:
            request.clustering.fixed.k = rng.choice([-1, 0, 1, 3, 10**6, 2**31 - 1])
        elif choice == 1:
            request.clustering.auto.max_k = rng.choice([-3, 0, 1, 8, 2**31 - 1])
            request.clustering.auto.min_cluster_size = rng.choice([-1, 0, 1, 10**9])
        elif choice == 2:
            request.clustering.per_request.SetInParent()
        if rng.random() < 0.2:
            request.held_adapter_keys.extend(["", "k" * 10_000, "\x00"])
        raw = request.SerializeToString()
        if kind == 4:  # truncated or bit-flipped wire bytes
            raw = bytearray(raw[: rng.randrange(len(raw) + 1)])
            if raw:
                raw[rng.randrange(len(raw))] ^= 0xFF
            raw = bytes(raw)
        out.append(raw)
    return out


def fuzz(n: int, seed: int) -> dict:
    codes: Counter[str] = Counter()
    with SidecarProcess(DEMO) as sidecar:
        dim = AdapterClient(sidecar.address, timeout=5).manifest().statistic.dim
        with grpc.insecure_channel(sidecar.address) as channel:
            call = channel.unary_unary(ADAPT)  # bytes in, bytes out: corrupt messages reach the server
            for raw in fuzz_requests(n, seed, dim):
                try:
                    call(raw, timeout=10)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
        alive = AdapterClient(sidecar.address, timeout=5).health()
    return {
        "requests": n,
        "codes": dict(codes),
        "internal_or_unknown": codes["INTERNAL"] + codes["UNKNOWN"],
        "serving_after": alive,
    }


def tiny_model_dir(root: Path) -> tuple[Path, Path]:
    """A tiny Llama with a byte-level tokenizer and a random (non-zero) artifact for it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from adapter_service.training.export import make_fresh_artifact

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_dir, artifact = root / "model", root / "artifact"
    LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    make_fresh_artifact(model_dir, ["q_proj", "v_proj"], 4, artifact, init="random", seed=1)
    return model_dir, artifact


class ModelServer:
    """`chameleon serve-model` as a child process."""

    def __init__(self, model_dir: Path, sidecar: str | None, *extra: str) -> None:
        self.port = free_port()
        args = ["serve-model", "--model", str(model_dir), "--port", str(self.port), "--plain-logs", *extra]
        if sidecar:
            args += ["--sidecar", sidecar]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([*CHAMELEON, *args], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"serve-model exited {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}"
                )
            with contextlib.suppress(OSError):
                if self.request("GET", "/health")[0] == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("serve-model did not become healthy")

    def request(
        self, method: str, path: str, body: dict | None = None, timeout: float = 60
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metric(self, name: str, labels: str) -> float:
        text = self.request("GET", "/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and labels in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def faults(model_dir: Path, artifact: Path, clients: int, outage_s: float) -> dict:
    """Generating clients while the sidecar is killed and restarted on the same address."""
    address = f"127.0.0.1:{free_port()}"
    sidecar = SidecarProcess(artifact, address=address)
    server = ModelServer(model_dir, address, "--deadline-ms", "500")
    statuses: Counter[str] = Counter()
    stop = threading.Event()

    def generate() -> None:
        while not stop.is_set():
            try:
                status, _ = server.request(
                    "POST",
                    "/generate",
                    {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 4}},
                )
                statuses[str(status)] += 1
            except OSError as exc:
                statuses[type(exc).__name__] += 1

    threads = [threading.Thread(target=generate) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        adapted_before = server.metric("chameleon_plugin_batches_total", 'outcome="adapted"')
        sidecar.kill()
        time.sleep(outage_s)
        fallback_during = server.metric("chameleon_plugin_batches_total", 'outcome="fallback"')
        sidecar = SidecarProcess(artifact, address=address)
        serving_at = time.monotonic()
        baseline = server.metric("chameleon_plugin_batches_total", 'outcome="adapted"')
        resumed = None
        while time.monotonic() < serving_at + 60:
            if server.metric("chameleon_plugin_batches_total", 'outcome="adapted"') > baseline:
                resumed = time.monotonic() - serving_at
                break
            time.sleep(0.05)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server_exit = server.stop()
        sidecar.stop()
    failed = sum(n for s, n in statuses.items() if s != "200")
    return {
        "clients": clients,
        "outage_s": outage_s,
        "generations": dict(statuses),
        "failed_generations": failed,
        "adapted_batches_before_kill": adapted_before,
        "fallback_batches_by_end_of_outage": fallback_during,
        "seconds_to_adapt_after_sidecar_serving": None if resumed is None else round(resumed, 2),
        "model_server_exit_code": server_exit,
    }


def drain_sidecar(calls: int, grace: float) -> dict:
    """SIGTERM with `calls` big Adapt calls in flight; none may be cancelled within the grace."""
    codes: Counter[str] = Counter()
    with SidecarProcess(DEMO, extra_args=["--grace", str(grace), "--max-clusters", "64"]) as sidecar:
        dim = AdapterClient(sidecar.address, timeout=5).manifest().statistic.dim
        started = threading.Barrier(calls + 1)

        def call(seed: int) -> None:
            stats = np.random.default_rng(seed).standard_normal((1024, dim)).astype(np.float32)
            with AdapterClient(sidecar.address, timeout=60) as client:
                started.wait()
                try:
                    client.adapt(stats, policy=FixedK(64), dtype="float32", compact=False)
                    codes["OK"] += 1
                except AdapterServiceError as exc:
                    codes[exc.code.name if exc.code else "client"] += 1

        threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.3)
        t0 = time.monotonic()
        code = sidecar.stop(timeout=grace + 30)
        exited_after = time.monotonic() - t0
        for t in threads:
            t.join()
    return {
        "in_flight_calls": calls,
        "grace_s": grace,
        "codes": dict(codes),
        "cancelled": codes["CANCELLED"],
        "exit_code": code,
        "exit_seconds": round(exited_after, 2),
    }


def drain_model_server(model_dir: Path) -> dict:
    """SIGTERM with a long generation in flight and a 0.2 s grace: a 503 (or, had it finished within the
    grace, its answer), and exit code 0."""
    server = ModelServer(model_dir, None, "--grace", "0.2")
    result: dict = {}

    def long_generation() -> None:
        try:
            result["status"], body = server.request(
                "POST", "/generate", {"inputs": "the", "parameters": {"max_new_tokens": 480}}, timeout=120
            )
            result["body"] = body[:200].decode(errors="replace")
        except OSError as exc:
            result["status"] = type(exc).__name__

    thread = threading.Thread(target=long_generation)
    thread.start()
    time.sleep(0.5)
    code = server.stop()
    thread.join()
    return {"client": result, "exit_code": code}


def hijack(artifact: Path) -> dict:
    """A second sidecar on a live sidecar's TCP port and unix socket must be refused."""
    out = {}
    with SidecarProcess(artifact) as first:
        second = subprocess.run(
            [
                *CHAMELEON,
                "serve",
                "--artifact",
                str(artifact),
                "--address",
                first.address,
                "--metrics-port",
                "-1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out["tcp"] = {
            "second_exit_code": second.returncode,
            "first_still_serving": AdapterClient(first.address, timeout=5).health(),
        }
    with tempfile.TemporaryDirectory() as tmp:
        path = f"unix:{tmp}/sidecar.sock"
        with SidecarProcess(artifact, address=path) as first:
            second = subprocess.run(
                [*CHAMELEON, "serve", "--artifact", str(artifact), "--address", path, "--metrics-port", "-1"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            out["unix"] = {
                "second_exit_code": second.returncode,
                "first_still_serving": AdapterClient(path, timeout=5).health(),
                "socket_mode": oct(os.stat(path[5:]).st_mode & 0o777),
            }
    return out


def connections(model_dir: Path, clients: int) -> dict:
    """`clients` concurrent requests at once against a small concurrency cap."""
    server = ModelServer(model_dir, None, "--max-concurrent-requests", "16")
    statuses: Counter[str] = Counter()
    barrier = threading.Barrier(clients)

    def one() -> None:
        barrier.wait()
        try:
            status, _ = server.request(
                "POST", "/generate", {"inputs": "the quick", "parameters": {"max_new_tokens": 2}}
            )
            statuses[str(status)] += 1
        except OSError as exc:
            statuses[type(exc).__name__] += 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.stop()
    return {
        "clients": clients,
        "statuses": dict(statuses),
        "resets_or_refused": sum(n for s, n in statuses.items() if not s.isdigit()),
        "server_errors": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    forms = report["load"]
    left.bar([f["form"] for f in forms], [f["calls_per_s"] for f in forms], color="#4c72b0")
    for i, f in enumerate(forms):
        label = f"p99 {f['p99_ms']} ms\nerrors {sum(f['errors'].values())}"
        left.text(i, f["calls_per_s"], label, ha="center", va="bottom", fontsize=8)
    left.set_ylim(0, 1.3 * max(f["calls_per_s"] for f in forms))
    left.set_ylabel("Adapt calls/s")
    left.set_title(f"load: {forms[0]['clients']} clients x {forms[0]['seconds']} s")
    codes = report["fuzz"]["codes"]
    right.barh(list(codes), list(codes.values()), color="#dd8452")
    right.set_title(f"fuzz: {report['fuzz']['requests']} requests by status")
    fig.suptitle(f"Chameleon reliability drill ({report['machine']['cpu_count']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, for the tests (about a minute)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument(
        "--parts", nargs="+", default=["load", "fuzz", "faults", "drain", "hijack", "connections"]
    )
    args = parser.parse_args(argv)
    quick = args.quick
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "quick": quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = artifact = None
        if {"faults", "drain", "hijack", "connections"} & set(args.parts):
            model_dir, artifact = tiny_model_dir(Path(tmp))
        for part in args.parts:
            print(f"drill: {part} ...", flush=True)
            if part == "load":
                clients, seconds = (8, 4.0) if quick else (64, 60.0)
                report["load"] = [load(clients, seconds, compact=c) for c in (True, False)]
            elif part == "fuzz":
                report["fuzz"] = fuzz(300 if quick else 2500, seed=0)
            elif part == "faults":
                report["faults"] = faults(model_dir, artifact, clients=8, outage_s=2.0 if quick else 15.0)
            elif part == "drain":
                report["drain"] = {
                    "sidecar": drain_sidecar(calls=8 if quick else 24, grace=30.0),
                    "model_server": drain_model_server(model_dir),
                }
            elif part == "hijack":
                report["hijack"] = hijack(artifact)
            elif part == "connections":
                report["connections"] = connections(model_dir, clients=60 if quick else 200)
            print(json.dumps(report[part], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "drill_quick" if quick else "drill"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if "load" in report and "fuzz" in report:
        plot(report, out / f"{name}.png")
    print(f"wrote {out / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
