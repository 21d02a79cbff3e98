"""Learning rate chosen on validation: combine `chameleon eval` studies that differ only in `--lr`.

A study trains every method at one learning rate. When a baseline goes unstable at that rate on some
seed, the comparison is unfair to it. The fair rule (model selection on validation only) is to pick the
rate per method and seed by validation NLL, then report test. This reads the studies' saved runs
(`runs/{static,hyper}-seed{S}.json`), picks per seed the run with the lowest `best_validation_nll` for
the static LoRA of the mixture's rank and for Chameleon (every serving policy follows its network's
pick), and reports the paired test difference with a bootstrap 95% CI over documents.

    python benchmarks/select_on_validation.py .chameleon/studies/early-layers \
        .chameleon/studies/early-layers-lr1e-3 --out docs/results/early-layers/lr_selection.json

The experts are taken from the first study as they are (their validation is per label).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from adapter_service.evaluation import bootstrap_ci


def _run(study: Path, name: str, seed: int) -> dict | None:
    path = study / "runs" / f"{name}-seed{seed}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _lr(study: Path) -> float:
    return float(json.loads((study / "study.json").read_text())["config"]["lr"])


def select(studies: list[Path], seeds: list[int]) -> dict:
    """Per seed, the run with the lowest validation NLL for `static` and `hyper`; test NLL per doc."""
    chosen: dict[str, list[dict]] = {"static": [], "hyper": []}
    for seed in seeds:
        for name in chosen:
            runs = [(study, _run(study, name, seed)) for study in studies]
            runs = [(study, run) for study, run in runs if run is not None]
            if not runs:
                raise SystemExit(f"no {name}-seed{seed}.json in {', '.join(map(str, studies))}")
            study, best = min(runs, key=lambda item: item[1]["best_validation_nll"])
            chosen[name].append(
                {
                    "seed": seed,
                    "lr": _lr(study),
                    "best_validation_nll": best["best_validation_nll"],
                    "candidates": {str(_lr(s)): r["best_validation_nll"] for s, r in runs},
                    "run": best,
                }
            )
    static = np.mean([c["run"]["per_doc"] for c in chosen["static"]], axis=0)
    methods = {"static LoRA (same rank)": static}
    for policy in chosen["hyper"][0]["run"]["scores"]:
        scores = [c["run"]["scores"][policy] for c in chosen["hyper"]]
        methods[f"Chameleon, {policy}"] = np.mean(scores, axis=0)
    experts = [_run(studies[0], "experts", seed) for seed in seeds]
    if all(e is not None for e in experts):
        methods["per-domain experts (first study's lr)"] = np.mean([e["per_doc"] for e in experts], axis=0)
    headroom = None
    if "per-domain experts (first study's lr)" in methods:
        headroom = float(static.mean() - methods["per-domain experts (first study's lr)"].mean())
    table = {}
    for name, values in methods.items():
        delta, lo, hi = bootstrap_ci(values - static)
        table[name] = {
            "mean_nll": float(values.mean()),
            "vs_static": {"delta": delta, "ci95": [lo, hi]},
            "share_of_expert_headroom": (-delta / headroom) if headroom else None,
        }
    picks = {
        name: [{k: v for k, v in c.items() if k != "run"} for c in runs] for name, runs in chosen.items()
    }
    return {"studies": [str(s) for s in studies], "seeds": seeds, "picks": picks, "methods": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("studies", nargs="+", type=Path, help="study directories (same split, other lr)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = select(args.studies, args.seeds)
    for name, runs in result["picks"].items():
        print(name, "lr per seed:", [(r["seed"], r["lr"], round(r["best_validation_nll"], 4)) for r in runs])
    for name, row in result["methods"].items():
        delta, (lo, hi) = row["vs_static"]["delta"], row["vs_static"]["ci95"]
        share = row["share_of_expert_headroom"]
        print(
            f"{name:45s} {row['mean_nll']:.4f}  Δ {delta:+.4f} ({lo:+.4f}..{hi:+.4f})"
            + (f"  share {share:.0%}" if share is not None else "")
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
