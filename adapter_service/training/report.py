"""Render a study's report.json as report.md and a plot, for people rather than programs."""

from __future__ import annotations

from pathlib import Path


def _routed_on(report: dict) -> str:
    if report.get("oracle_statistic"):
        return "each prompt's domain label (the oracle diagnostic)"
    routing = report.get("routing")
    if routing in ("classifier", "predicted-label"):
        routing = f" ({routing} routing: fitted to the training labels, served without labels)"
    elif routing == "pseudo-label":
        routing = " (pseudo-label routing: k-means groups of the training statistics, no labels used)"
    elif routing:
        routing = f" ({routing} routing)"
    else:
        routing = ""
    return f"the statistic `{report.get('statistic', 'embedding')}`{routing}"


def write_report(
    report: dict, out: Path, command: str = "", wall_seconds: float | None = None, invocations: int = 1
) -> None:
    methods = report["methods"]
    lines = [
        "# Chameleon evaluation report",
        "",
        f"Test documents: {report['test_documents']}; targets {', '.join(report['targets'])}, "
        f"rank {report['rank']}; routed on {_routed_on(report)}; "
        f"hyper-network {report['hypernetwork_params']:,} parameters "
        f"(equal-parameter static LoRA: rank {report['static_rank_equal_params']}); seeds {report['seeds']}; "
        f"at most {report['max_steps']} steps of batch {report['batch_size']}"
        + (
            f" (each per-domain expert: {report['expert_steps']} steps of batch "
            f"{report['expert_batch_size']})."
            if "expert_steps" in report
            else "."
        ),
        "",
        "Mean per-token NLL of the continuation on the test split (lower is better), averaged over seeds "
        "per document; 95% bootstrap intervals over documents. Δ = paired difference to the same-rank "
        "static LoRA. The last interval of Δ vs best static also resamples each method's seeds, so a "
        "training run's luck counts as noise (methods with one seed: -).",
        "",
        "| method | NLL | 95% CI | perplexity | Δ vs static (95% CI) | Δ vs best static (95% CI) "
        "| 95% CI over seeds and documents | share of expert headroom (95% CI) | per-seed NLL | params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def paired(delta: dict | None) -> str:
        return f"{delta['delta']:+.4f} ({delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f})" if delta else "-"

    def over_seeds(delta: dict | None) -> str:
        ci = (delta or {}).get("ci95_seeds")
        return f"{ci[0]:+.4f}, {ci[1]:+.4f}" if ci else "-"

    for name, m in sorted(methods.items(), key=lambda kv: kv[1]["mean_nll"]):
        share = m.get("share_of_expert_headroom")
        seeds = ", ".join(f"{v:.4f}" for v in m["per_seed"])
        lines.append(
            f"| {name} | {m['mean_nll']:.4f} | {m['ci95'][0]:.4f}-{m['ci95'][1]:.4f} | "
            f"{m['perplexity']:.3f} | {paired(m.get('vs_static_same_rank'))} | "
            f"{paired(m.get('vs_best_static'))} | {over_seeds(m.get('vs_best_static'))} | "
            f"{_share(share, m.get('share_of_expert_headroom_ci95'))} | "
            f"{seeds} | {m['params']:,} |"
        )
    selection = report.get("lr_selection")
    if selection:
        lines += [
            "",
            "Learning rate chosen on validation, per method and seed, from "
            + ", ".join(f"{lr:g}" for lr in selection["candidates"])
            + " (the experts: per label):",
            "",
        ]
        for name, picks in selection["picks"].items():
            lines.append(f"- {name}: " + "; ".join(_rates(pick) for pick in picks))
    if report.get("oracle_statistic"):
        lines += [
            "",
            "**A diagnostic, not a product setting:** the generator routed on each prompt's domain label "
            "(one-hot, `--oracle-statistic`) instead of a statistic, so its grouping is perfect.",
        ]
    if report.get("skipped_runs"):
        lines += ["", f"Runs left out of this study (`--skip`): {', '.join(report['skipped_runs'])}."]
    headroom = report.get("headroom")
    if headroom:
        gain = headroom["experts_gain_over_best_static"]
        lines += [
            "",
            f"Best static LoRA: {headroom['best_static']}. "
            + (
                "No experts in this study, so no headroom to share."
                if gain is None
                else f"Expert headroom (oracle per-domain experts vs the best static LoRA): {gain:+.4f} NLL"
                + ("." if gain > 0 else "; none, so shares are undefined.")
            ),
        ]
    validation = report.get("validation")
    if validation:
        lines += [
            "",
            "Mean validation NLL (what choices between methods and recipes are made on; the test "
            "columns above are never used to choose):",
            "",
            "| method | validation NLL | per seed |",
            "| --- | --- | --- |",
        ]
        for name in sorted(validation, key=lambda n: validation[n]["mean"]):
            v = validation[name]
            lines.append(f"| {name} | {v['mean']:.4f} | {', '.join(f'{x:.4f}' for x in v['per_seed'])} |")
    fallback = report.get("fallback")
    if fallback:
        chosen = "; ".join(
            f"below {f['threshold']:.3f} ({f['share']:.0%} of validation, {f['test_share']:.0%} of test)"
            if f.get("installed", True)
            else f"none (held-out gain {f['held_out_gain']:+.4f})"
            for f in fallback
        )
        lines += [
            "",
            "Fallback adapter, per seed: requests whose router confidence is below the threshold chosen "
            "on validation get the static LoRA, where it also gains on held-out halves of validation: "
            f"{chosen}. Its validation NLL is the one the threshold was chosen on, so it flatters; its "
            "test NLL does not.",
        ]
    per_label = report.get("per_label")
    if per_label:
        labels = sorted(next(iter(per_label.values())))
        lines += [
            "",
            "Mean test NLL per label (where each method gains):",
            "",
            "| method | " + " | ".join(labels) + " |",
            "| --- |" + " --- |" * len(labels),
        ]
        for name in sorted(per_label, key=lambda n: methods[n]["mean_nll"]):
            lines.append(f"| {name} | " + " | ".join(f"{per_label[name][x]:.4f}" for x in labels) + " |")
    latency = report.get("latency_per_batch")
    if latency:
        lines += [
            "",
            f"Cost per batch of {latency['batch_size']:.0f} (in-process, this machine, median over seeds): "
            f"preparing the adapters (statistics, k-means, hyper-network) {latency['prepare_ms']:.1f} ms; "
            f"a forward of {latency['tokens_per_row']:.0f} tokens per row "
            f"{latency['base_forward_ms']:.0f} ms "
            f"without and {latency['adapted_forward_ms']:.0f} ms with the adapters (the training-path "
            "hooks; the serving plugin's cost is in benchmarks/README.md).",
        ]
    grouping = report.get("grouping")
    if grouping:
        lines += [
            "",
            f"Grouping of the test prompts by the statistic ({grouping['labels']} labels; consecutive "
            f"serving batches of {report['batch_size']}): "
            f"k-NN domain accuracy {grouping['knn_accuracy']:.2f} "
            f"(majority share {grouping['majority_share']:.2f}); "
            + "; ".join(
                f"{name}: mean k {g['mean_k']:.1f}, purity {g['purity']:.2f} "
                f"(chance {g['chance_purity']:.2f}), NMI {g['nmi']:.2f} (chance {g['chance_nmi']:.2f})"
                for name, g in grouping["policies"].items()
            )
            + ".",
        ]
    if command:
        lines += ["", f"Command: `{command}`"]
    if wall_seconds is not None:
        runs = f" over {invocations} invocations (resumed)" if invocations > 1 else ""
        lines += [f"Wall time: {wall_seconds / 60:.1f} min{runs}."]
    timing = report.get("run_seconds")
    if timing and timing["runs"]:
        untimed = f"; {timing['untimed']} saved before runs were timed" if timing["untimed"] else ""
        lines += [
            f"Compute of the runs used: {timing['total'] / 60:.1f} min over {timing['runs']} runs{untimed} "
            "(counts workers stopped after saving runs, which the wall time misses)."
        ]
    lines += ["", "![report](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    title = None
    if report.get("oracle_statistic"):
        title = "Diagnostic: routed on each prompt's domain label"
    elif report.get("statistic") or report.get("routing"):
        title = f"Routed on {_routed_on(report).replace('`', '')}"
    _plot(methods, out / "report.png", title)


def _share(share: float | None, interval: list | None) -> str:
    """ "54% (31%..77%)": the share of the expert headroom, with its interval over seeds and documents
    when the study has several seeds ("undefined" bounds: some resamples left the experts no gain)."""
    if share is None:
        return "-"
    if interval is None:
        return f"{share:.0%}"
    lo, hi = interval
    if lo is None:
        return f"{share:.0%} (interval undefined)"
    return f"{share:.0%} ({lo:.0%}..{'unbounded' if hi is None else f'{hi:.0%}'})"


def _rates(pick: float | dict) -> str:
    """One seed's pick: a rate, or the experts' rate per label."""
    if isinstance(pick, dict):
        return ", ".join(f"{label} {lr:g}" for label, lr in sorted(pick.items()))
    return f"{pick:g}"


def _plot(methods: dict, path: Path, title: str | None = None) -> None:
    """Left: each method's test NLL (intervals are wide: documents differ a lot). Right: the paired
    difference to the best static LoRA, where the comparison actually lives, with the interval over
    seeds and documents where there is one (a training run's luck is part of the noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(methods.items(), key=lambda kv: kv[1]["mean_nll"])
    names = [k for k, _ in items]
    colors = [
        "#2ca02c" if n.startswith("Chameleon") else "#1f77b4" if "static" in n else "#777777" for n in names
    ]
    # The bar that matters: the best static LoRA when the study names one, else the same-rank one.
    key = "vs_best_static" if all("vs_best_static" in m for _, m in items) else "vs_static_same_rank"
    paired = all(key in m for _, m in items)
    fig, axes = plt.subplots(
        1,
        2 if paired else 1,
        figsize=(13 if paired else 8, 0.45 * len(names) + 1.6),
        sharey=True,
        squeeze=False,
    )
    ax = axes[0, 0]
    means = [m["mean_nll"] for _, m in items]
    errors = [
        [m["mean_nll"] - m["ci95"][0] for _, m in items],
        [m["ci95"][1] - m["mean_nll"] for _, m in items],
    ]
    ax.barh(names, means, xerr=errors, color=colors, capsize=3)
    low, high = min(m["ci95"][0] for _, m in items), max(m["ci95"][1] for _, m in items)
    pad = (high - low) * 0.3 + 1e-3
    ax.set_xlim(low - pad, high + pad)
    ax.invert_yaxis()
    ax.set_xlabel("test NLL per continuation token (lower is better), 95% CI")
    if paired:
        ax = axes[0, 1]
        deltas = [m[key] for _, m in items]
        values = [d["delta"] for d in deltas]
        cis = [d.get("ci95_seeds", d["ci95"]) for d in deltas]
        errs = [
            [d["delta"] - ci[0] for d, ci in zip(deltas, cis, strict=True)],
            [ci[1] - d["delta"] for d, ci in zip(deltas, cis, strict=True)],
        ]
        ax.barh(names, values, xerr=errs, color=colors, capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        what = "the best static LoRA" if key == "vs_best_static" else "the same-rank static LoRA"
        over = "seeds and documents" if any("ci95_seeds" in d for d in deltas) else "documents"
        ax.set_xlabel(f"paired difference to {what} (< 0: better)\n95% CI over {over}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
