"""What a label router's mistakes cost (docs/research/adaptation.md, "Classifier routing" and "Routing on the
predicted label").

After `scripts/studies/routing_variant_study.sh classifier` (or `predicted-label`), for each seed: refit the
seed's label classifier exactly as training did (hypernetwork.fit_linear_probe on the standardised
training statistics), mark each test document as routed to its own label or not, and split the
per-document gain of Chameleon (per request) over the static LoRA of the same seed into the two
groups. The mean gain is then the gain on rightly routed documents plus what the misrouted ones cost.

It also asks whether the classifier knows when it is wrong: for each confidence threshold (the
classifier's top probability), the share of documents below it, how many of the misrouted ones that
catches, and the mean gain if those documents were served the static LoRA instead (their gain set to
zero; exact, since the static LoRA's per-document losses are on the same split). A diagnostic on test
documents, not a chosen setting: it says whether a fallback below a threshold is worth building.

    python benchmarks/routing_errors.py --study .chameleon/studies/early-150-b12-classifier \
        --out docs/research/results/classifier-routing

Data arguments default to the early-layer study's setting (scripts/studies/early_layer_setting.sh). Writes
OUT/routing_errors.json and prints one line per seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from adapter_service.models.loading import SMOLLM2, load_causal_lm
from adapter_service.models.statistics import compute_statistic
from adapter_service.training.hypernetwork import LABEL_ROUTINGS, fit_linear_probe, standardisation
from adapter_service.training.trainer import load_examples

# Confidence thresholds for the fallback diagnostic (the top probability of six labels is >= 1/6).
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def fallback_curve(confidence: np.ndarray, right: np.ndarray, gain: np.ndarray) -> list[dict]:
    """Per threshold: what serving the static LoRA to the documents the classifier is unsure of gives."""
    curve = []
    for threshold in THRESHOLDS:
        unsure = confidence < threshold
        curve.append(
            {
                "threshold": threshold,
                "fallen_back": float(unsure.mean()),
                "misrouted_caught": int((unsure & ~right).sum()),
                "rightly_routed_lost": int((unsure & right).sum()),
                "gain_all": float(np.where(unsure, 0.0, gain).mean()),
            }
        )
    return curve


def seed_errors(
    train: torch.Tensor,
    y_train: torch.Tensor,
    test: torch.Tensor,
    y_test: np.ndarray,
    seed: int,
    gain: np.ndarray,
) -> dict:
    """One seed's classifier (as training fits it) and the gain [test documents] split by routing."""
    mean, scale = standardisation(train)
    probe = fit_linear_probe((train - mean) / scale, y_train, int(y_train.max()) + 1, seed)
    with torch.no_grad():
        probabilities = probe((test - mean) / scale).softmax(1).numpy()
    right = probabilities.argmax(1) == y_test
    wrong = ~right
    return {
        "seed": seed,
        "test_documents": len(right),
        "misrouted": int(wrong.sum()),
        "accuracy": float(right.mean()),
        "gain_all": float(gain.mean()),
        "gain_rightly_routed": float(gain[right].mean()),
        "gain_misrouted": float(gain[wrong].mean()) if wrong.any() else None,
        # what the misrouted documents take off the mean, against gaining what the others gain
        "cost_of_misrouting": float((gain[wrong] - gain[right].mean()).sum() / len(gain)),
        "fallback": fallback_curve(probabilities.max(1), right, gain),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--study", required=True, help="a `--routing classifier|predicted-label` study directory"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--data", default="mixed")
    parser.add_argument("--max-per-label", type=int, default=300)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--continuation-tokens", type=int, default=24)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    runs = Path(args.study) / "runs"
    config = json.loads((Path(args.study) / "study.json").read_text())["config"]
    if config.get("routing") not in LABEL_ROUTINGS or config.get("statistic") != "embedding":
        raise SystemExit(
            f"--study {args.study}: expected a study routed by {' or '.join(LABEL_ROUTINGS)} on the embedding"
        )
    model, tokenizer = load_causal_lm(args.model)
    splits = load_examples(
        args.data,
        tokenizer,
        args.prompt_tokens,
        args.continuation_tokens,
        args.max_per_label,
        args.split_seed,
    )
    names = sorted({e.label for e in splits.train})

    def statistics(examples) -> torch.Tensor:
        return compute_statistic(model, None, torch.tensor([e.prompt for e in examples])).float()

    train, test = statistics(splits.train), statistics(splits.test)
    y_train = torch.tensor([names.index(e.label) for e in splits.train])
    y_test = np.array([names.index(e.label) for e in splits.test])
    rows = []
    for seed in args.seeds:
        hyper = json.loads((runs / f"hyper-seed{seed}.json").read_text())["scores"]["per request"]
        static = json.loads((runs / f"static-seed{seed}.json").read_text())["per_doc"]
        gain = np.asarray(hyper) - np.asarray(static)
        if len(gain) != len(y_test):
            raise SystemExit(f"seed {seed}: {len(gain)} scored documents, but the data gives {len(y_test)}")
        row = seed_errors(train, y_train, test, y_test, seed, gain)
        rows.append(row)
        print(
            f"seed {seed}: accuracy {row['accuracy']:.3f} ({row['misrouted']} misrouted); gain vs static "
            f"{row['gain_all']:+.4f}: rightly routed {row['gain_rightly_routed']:+.4f}, misrouted "
            f"{row['gain_misrouted']:+.4f}; misrouting costs {row['cost_of_misrouting']:+.4f}",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        key: float(np.mean([r[key] for r in rows]))
        for key in ("accuracy", "gain_all", "gain_rightly_routed", "gain_misrouted", "cost_of_misrouting")
    }
    fallback = [
        {key: float(np.mean([r["fallback"][i][key] for r in rows])) for key in point}
        for i, point in enumerate(rows[0]["fallback"])
    ]
    for point in fallback:
        print(
            f"fallback below {point['threshold']:.2f}: {point['fallen_back']:.1%} of documents, "
            f"{point['misrouted_caught']:.1f} misrouted and {point['rightly_routed_lost']:.1f} rightly "
            f"routed per seed; gain {point['gain_all']:+.4f} (none: {summary['gain_all']:+.4f})"
        )
    (out / "routing_errors.json").write_text(
        json.dumps(
            {"study": args.study, "labels": names, "seeds": rows, "mean": summary, "fallback": fallback},
            indent=1,
        )
    )
    plot_fallback(rows, summary, fallback, config["routing"], out / "routing_errors.png")
    print(f"wrote {out / 'routing_errors.json'} and routing_errors.png")
    return 0


def plot_fallback(rows: list[dict], summary: dict, fallback: list[dict], routing: str, path: Path) -> None:
    """The mean gain against the threshold below which the static LoRA would serve, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        curve = row["fallback"]
        ax.plot(
            [0.0] + [p["threshold"] for p in curve],
            [row["gain_all"]] + [p["gain_all"] for p in curve],
            marker="o",
            alpha=0.6,
            label=f"seed {row['seed']}",
        )
    ax.plot(
        [0.0] + [p["threshold"] for p in fallback],
        [summary["gain_all"]] + [p["gain_all"] for p in fallback],
        color="k",
        lw=2,
        marker="s",
        label="mean over seeds",
    )
    ax.axhline(summary["gain_all"], color="k", ls="--", lw=1, label="mean, no fallback")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("classifier confidence below which the static LoRA serves")
    ax.set_ylabel("test NLL gain vs static LoRA (lower is better)")
    ax.set_title(f"{routing} routing: a fallback for unsure requests?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
