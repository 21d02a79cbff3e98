"""Generation throughput of chameleon_torch against the base model and PEFT's static LoRA.

    python benchmarks/plugin_throughput.py [--rounds 4] [--batch 32] [--new-tokens 32] [--out DIR]
    python benchmarks/plugin_throughput.py --rank 48 --ks 1 4 8 32 --tag rank48   # the mixture's rank
    python benchmarks/plugin_throughput.py --rank 48 --mixture 6 --ks 1 8 32 --whole-ks 1 8 --tag mixture48

SmolLM2-135M-Instruct (the PyPI GGUF, see adapter_service.models.loading), a batch of mixed prompts,
greedy decoding with exactly `--new-tokens` new tokens per row. Variants, interleaved round by round
(the order rotates each round) so machine noise hits all alike:
  base         the model as loaded
  peft         PEFT LoRA, unmerged, rank --rank (8) on q_proj and v_proj (one static adapter)
  plugin k=K   chameleon_torch with a real sidecar process, FixedK(K) for K in --ks (1 4 8), rank --rank on
               q_proj and v_proj; the timed region includes the per-batch preparation (statistic,
               Adapt call, installing the factors), as a server would pay it.
               With --mixture M the artifact is a mixture of M bases (the default generator), which
               the plugin receives and applies in the compact form; --whole-ks adds "plugin k=K
               whole" variants that ask for whole adapters instead (PluginConfig(compact=False)).
The FLOP floor is base FLOPs / (base + one rank-r LoRA's FLOPs) per generated token: the best ratio
any LoRA can reach if its extra work cost no more per FLOP than the base model's.
Writes OUT/plugin_throughput[_TAG].json and .png.

OpenMP settings are left as the environment gives them, and recorded. OMP_WAIT_POLICY=PASSIVE is a
common remedy for occasional 7x slowdowns of two torch threads; measured here, it makes
every small matmul pay a thread wake-up (about 10 us -> 95 us for x[32, 576] @ A[576, 8]), which
triples the cost of any LoRA, PEFT's and ours alike. Set it in the environment to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from adapter_service.client import AdapterClient  # noqa: E402
from adapter_service.core.clustering import FixedK  # noqa: E402
from adapter_service.demo.sidecar import SidecarProcess  # noqa: E402
from adapter_service.models.loading import SMOLLM2, load_causal_lm  # noqa: E402
from adapter_service.models.spec import find_targets  # noqa: E402
from adapter_service.training.export import export_artifact, make_fresh_artifact, plan_export  # noqa: E402
from adapter_service.training.hypernetwork import build_network  # noqa: E402

TARGETS = ["q_proj", "v_proj"]

PROMPTS = [
    # encyclopedia
    "The Amazon River flows through",
    "Photosynthesis is the process by which",
    "The Roman Empire was founded",
    "Mount Everest is located in",
    "The periodic table organizes",
    "Jupiter is the largest planet",
    "The French Revolution began in",
    "DNA is a molecule that",
    # news
    "Shares of the company fell sharply after",
    "The government announced on Tuesday that",
    "The striker scored twice as his team",
    "Interest rates were raised by the central bank",
    "Election officials said the turnout",
    "The minister resigned following reports",
    "Oil prices climbed for a third day",
    "The film topped the box office this weekend",
    # code and instructions
    "Write a Python function that reverses a string.",
    "Explain what a hash table is.",
    "How do I sort a list of dictionaries by a key?",
    "What is the difference between a process and a thread?",
    "Give me three tips for writing unit tests.",
    "Translate 'good morning' into Spanish.",
    "Summarize the plot of Hamlet in two sentences.",
    "List the steps to boil an egg.",
    # scripture and verse
    "In the beginning God created",
    "And the LORD spake unto Moses, saying,",
    "Blessed are the meek: for they",
    "The LORD is my shepherd; I shall not",
    "Shall I compare thee to a summer's day?",
    "Two roads diverged in a yellow wood,",
    "Once upon a midnight dreary,",
    "Tyger Tyger, burning bright,",
]


def flop_floor(model: torch.nn.Module, rank: int) -> dict:
    """MACs per token of every Linear (incl. the LM head) versus one rank-r LoRA on the targets."""
    base = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    lora = sum(rank * (t.d_in + t.d_out) for t in find_targets(model, TARGETS))
    return {"base_macs_per_token": base, "lora_macs_per_token": lora, "floor_ratio": base / (base + lora)}


def batch_inputs(tokenizer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def timed_generate(
    model, ids, mask, new_tokens: int, pad_id: int, prepare=None
) -> tuple[float, float, object]:
    """Seconds for one generate call, including the plugin's per-batch preparation when given."""
    started = time.perf_counter()
    context = prepare(ids, mask) if prepare is not None else contextlib.nullcontext()
    with torch.inference_mode(), context as info:
        prep = time.perf_counter() - started if prepare is not None else 0.0
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - ids.shape[1] == new_tokens
    return elapsed, prep, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of PEFT and of the plugin's adapters")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8], help="clusters per batch")
    parser.add_argument("--tag", default="", help="file name suffix, e.g. rank48")
    parser.add_argument("--mixture", type=int, default=0, help="bases of a mixture artifact (0: the paper's)")
    parser.add_argument(
        "--whole-ks", type=int, nargs="*", default=[], help="mixture: also these k with whole adapters"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from chameleon_torch import PluginConfig, attach

    print(f"loading {args.model} ...", flush=True)
    base, tokenizer = load_causal_lm(args.model)
    pad_id = tokenizer.pad_token_id
    ids, mask = batch_inputs(tokenizer, args.batch)
    floor = flop_floor(base, args.rank)

    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=TARGETS,
            lora_dropout=0.0,
            init_lora_weights=False,
        ),
    ).eval()
    plugin_model = copy.deepcopy(base)

    with tempfile.TemporaryDirectory() as tmp:
        if args.mixture:
            artifact = mixture_artifact(
                plugin_model, ids, mask, args.rank, args.mixture, Path(tmp) / "artifact"
            )
        else:
            artifact = make_fresh_artifact(
                plugin_model, TARGETS, args.rank, Path(tmp) / "artifact", init="random"
            )
        with SidecarProcess(
            artifact.path, log_path=Path(tmp) / "sidecar.log", extra_args=["--max-clusters", str(args.batch)]
        ) as sidecar:
            client = AdapterClient(sidecar.address, timeout=10)
            handle = attach(plugin_model, client, PluginConfig(deadline_s=10))
            variants = {"base": (base, None, None), "peft": (peft_model, None, None)}
            for k in args.ks:
                variants[f"plugin k={k}"] = (plugin_model, k, None)
            for k in args.whole_ks if args.mixture else []:
                variants[f"plugin k={k} whole"] = (plugin_model, k, False)
            names = list(variants)
            samples: dict[str, list[dict]] = {n: [] for n in names}
            total = (args.rounds + 1) * len(names)
            with tqdm(total=total, desc="generate calls", unit="call") as bar:
                for rnd in range(args.rounds + 1):  # round 0 is warm-up
                    order = names[rnd % len(names) :] + names[: rnd % len(names)]
                    for name in order:
                        model, k, compact = variants[name]
                        prepare = None
                        if k is not None:
                            handle.config = PluginConfig(policy=FixedK(k), deadline_s=10, compact=compact)
                            handle.cache.clear()  # measure the uncached path: every batch is new
                            prepare = handle.adapt
                        elapsed, prep, info = timed_generate(
                            model, ids, mask, args.new_tokens, pad_id, prepare
                        )
                        if info is not None and not info.adapted:
                            raise SystemExit(f"{name}: batch fell back ({info.fallback_reason})")
                        if rnd > 0:
                            samples[name].append(
                                {
                                    "seconds": elapsed,
                                    "prepare_seconds": prep,
                                    "k": None if info is None else info.k,
                                }
                            )
                        bar.update()
            client.close()

    tokens = args.batch * args.new_tokens
    base_tps = np.array([tokens / s["seconds"] for s in samples["base"]])
    records = []
    for name in names:
        tps = [tokens / s["seconds"] for s in samples[name]]
        paired = np.array(tps) / base_tps  # each round against the base run of the same round
        records.append(
            {
                "variant": name,
                "tokens_per_s_median": float(np.median(tps)),
                "tokens_per_s": tps,
                "ratio_to_base": float(np.median(paired)),
                "ratio_to_base_per_round": paired.tolist(),
                "floor_ratio": 1.0 if name == "base" else floor["floor_ratio"],
                "prepare_ms_median": float(np.median([s["prepare_seconds"] for s in samples[name]]) * 1e3),
                "k": samples[name][0]["k"],
            }
        )
    report = {
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "targets": TARGETS,
            "rank": args.rank,
            "generator": f"mixture of {args.mixture} bases (compact form)" if args.mixture else "paper's",
            "threads": args.threads,
            "greedy": True,
            "prompt_tokens": int(mask.sum()),
            "padded_width": int(ids.shape[1]),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "omp_env": {
                k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_NUM_THREADS")
            },
        },
        "flops": floor,
        "results": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "plugin_throughput" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(records, floor["floor_ratio"], report["settings"], args.out / f"{stem}.png")
    print(f"\n{'variant':<14}{'tokens/s':>10}{'ratio':>8}{'floor':>8}{'prepare ms':>12}")
    for r in records:
        print(
            f"{r['variant']:<14}{r['tokens_per_s_median']:>10.1f}{r['ratio_to_base']:>8.3f}"
            f"{r['floor_ratio']:>8.3f}{r['prepare_ms_median']:>12.1f}"
        )
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


def mixture_artifact(model, ids: torch.Tensor, mask: torch.Tensor, rank: int, bases: int, out: Path):
    """A mixture artifact of `bases` bases (emitted rank `rank`), random B so the deltas are non-zero,
    its prototypes fitted on the benchmark's own prompts."""
    from adapter_service.models.statistics import mean_input_embedding

    plan = plan_export(model, TARGETS, rank, init="random", kind="mixture", bases=bases)
    torch.manual_seed(0)
    network = build_network(plan.hypernetwork_config)
    network.fit_statistics(mean_input_embedding(model.get_input_embeddings().weight, ids, mask))
    return export_artifact(network.eval(), plan, out)


def plot(records: list[dict], floor: float, settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(records)), 4.5))
    names = [r["variant"] for r in records]
    ratios = [r["ratio_to_base"] for r in records]
    spread = [
        [r["ratio_to_base"] - min(r["ratio_to_base_per_round"]) for r in records],
        [max(r["ratio_to_base_per_round"]) - r["ratio_to_base"] for r in records],
    ]
    colors = ["#777777", "#1f77b4"] + [
        "#ff7f0e" if r["variant"].endswith("whole") else "#2ca02c" for r in records[2:]
    ]
    ax.bar(names, ratios, color=colors, yerr=spread, capsize=4)
    ax.axhline(floor, color="red", linestyle="--", label=f"FLOP floor {floor:.4f}")
    ax.axhline(floor - 0.05, color="red", linestyle=":", label="floor - 5 points (goal)")
    for i, r in enumerate(records):
        ax.text(
            i,
            0.04,
            f"{r['ratio_to_base']:.3f}\n{r['tokens_per_s_median']:.0f} tok/s",
            ha="center",
            va="bottom",
            fontsize=8,
            color="white",
        )
    ax.set_ylim(0, 1.4)
    ax.set_ylabel("tokens/s / base tokens/s of the same round\n(median; whiskers = min..max over rounds)")
    ax.set_title(
        f"{settings['model']}: batch {settings['batch']}, {settings['new_tokens']} new tokens, greedy, "
        f"rank {settings['rank']} on {'+'.join(settings['targets'])}; generator: {settings['generator']}",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
