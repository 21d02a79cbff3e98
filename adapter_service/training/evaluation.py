"""The fair comparison: base, static LoRAs, Chameleon per cluster and per request,
per-domain experts, on the test split, with bootstrap 95% intervals over documents and several seeds.

Every method is trained by `training.train` on the same examples, scored on the same continuation
tokens with the same loss, and evaluated in serving-like batches of mixed test prompts. Results of
each (seed, method) are written as they finish, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK
from adapter_service.training.diagnostics import grouping_diagnostics
from adapter_service.training.distributed import Processes
from adapter_service.training.export import plan_export
from adapter_service.training.fallback_adapter import choose_threshold
from adapter_service.training.hypernetwork import HyperNetworkConfig, build_network, emitted_rank
from adapter_service.training.trainer import (
    DeltaApplier,
    Example,
    ExampleSplits,
    PrefixCache,
    StaticLoRA,
    StatisticCache,
    TrainConfig,
    adapters_for_batch,
    batch_statistics,
    mean_nll,
    router_labels,
    train,
)

log = logging.getLogger(__name__)


def headroom_share_ci(
    runs: np.ndarray, best_static: np.ndarray, experts: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float | None, float | None] | None:
    """The share of the experts' gain over the best static LoRA that a method takes,
    (static - method) / (static - experts) on mean NLL, with a 95% interval resampling documents (paired,
    the same for all three) and each method's seeds (independently), all [seeds, documents] arrays of
    one study. The bounds are None when over 2.5% of resamples leave the experts no gain (the share is
    undefined there, so no 95% interval exists; the upper bound alone when the few that do reach it);
    None in all when a method has a single seed."""
    arrays = [np.asarray(a, dtype=np.float64) for a in (runs, best_static, experts)]
    if any(a.ndim != 2 or a.shape[1] != arrays[0].shape[1] for a in arrays):
        raise ValueError(
            "runs, best_static, experts: expected [seeds, documents] arrays over the same documents, got "
            + ", ".join(str(list(a.shape)) for a in arrays)
        )
    if any(len(a) < 2 for a in arrays):
        return None
    method, static, oracle = arrays
    gain = static.mean() - oracle.mean()
    share = float((static.mean() - method.mean()) / gain) if gain > 0 else float("nan")
    rng = np.random.default_rng(seed)
    documents = method.shape[1]
    shares = np.empty(n_boot)
    for i in range(n_boot):
        docs = rng.integers(0, documents, documents)
        means = [a[rng.integers(0, len(a), len(a))][:, docs].mean() for a in arrays]
        headroom = means[1] - means[2]
        shares[i] = (means[1] - means[0]) / headroom if headroom > 0 else np.nan
    if np.isnan(shares).mean() > 0.025:
        return share, None, None
    shares = np.where(np.isnan(shares), np.inf, shares)  # the few undefined resamples: the upper tail
    lo, hi = np.percentile(shares, [2.5, 97.5])
    return share, float(lo), float(hi) if np.isfinite(hi) else None


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-document values and its 95% percentile interval, resampling documents."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def seed_bootstrap_ci(
    runs: np.ndarray, reference: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float] | None:
    """Mean difference of two methods ([seeds, documents] NLL each) and its 95% interval, resampling
    documents (paired) and each method's seeds (independently): a training run's luck is part of the
    noise, which a document-only interval ignores. None when either method has a single seed."""
    runs, reference = np.asarray(runs, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if runs.ndim != 2 or reference.ndim != 2 or runs.shape[1] != reference.shape[1]:
        raise ValueError(
            f"runs, reference: expected [seeds, documents] arrays over the same documents, got "
            f"{list(runs.shape)} and {list(reference.shape)}"
        )
    if len(runs) < 2 or len(reference) < 2:
        return None
    rng = np.random.default_rng(seed)
    documents = runs.shape[1]
    deltas = np.empty(n_boot)
    for i in range(n_boot):
        docs = rng.integers(0, documents, documents)
        mine = runs[rng.integers(0, len(runs), len(runs))][:, docs].mean()
        theirs = reference[rng.integers(0, len(reference), len(reference))][:, docs].mean()
        deltas[i] = mine - theirs
    delta = float(runs.mean() - reference.mean())
    return delta, float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))


@dataclass
class StudyConfig:
    targets: list[str]
    rank: int = 8
    hidden: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 32
    max_steps: int = 100
    eval_every: int = 10
    patience: int = 3
    lr: float = 1e-3
    # Several learning rates: every trained method is trained at each, and per seed the run with the best
    # validation NLL is the one scored (the experts choose per label). Empty: `lr` alone.
    lrs: tuple[float, ...] = ()
    train_policy: ClusteringPolicy = field(default_factory=lambda: AutoK(max_k=8))
    eval_ks: tuple[int, ...] = (1, 4, 8)
    experts: bool = True
    # Each expert sees only its label's share of the data: a smaller batch gives it as many updates
    # as the shared LoRAs get, at a fraction of their cost (experts dominated the study's wall time).
    expert_batch_size: int = 8
    # Steps of each expert (None: max_steps). The shared methods see batch_size * max_steps documents in
    # all, the experts expert_batch_size * expert_steps each: this lets the two budgets be set apart.
    expert_steps: int | None = None
    max_delta_norm: float | None = None  # cap on ||s B A||_F / ||W||_F for every method (None = off)
    statistic: str = "embedding"  # or "hidden:L" (statistics.parse_statistic)
    # "mixed" (serving-like) or "coherent" (one label per batch, the paper's training); for every method
    batching: str = "mixed"
    # The generator (hypernetwork.KINDS). "mixture": `bases` LoRAs of rank `rank` each, so it emits rank
    # rank * bases and has the parameters of the static LoRA of that rank (and of the experts together).
    network: str = "full"
    bases: int = 1
    routing_sharpness: float = 0.3  # mixture only (HyperNetworkConfig.routing_sharpness)
    routing: str = "distance"  # mixture only (HyperNetworkConfig.routing)
    shared_bases: int = 0  # mixture only: bases always on (HyperNetworkConfig.shared_bases)
    # A diagnostic, never a product setting: every prompt's statistic is its domain label (one-hot), so
    # the generator routes on perfect information. It splits a gap to the experts into what the
    # statistic's grouping costs and what sharing one generator costs.
    oracle_statistic: bool = False
    # Optimisation, for every method (training.TrainConfig)
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_grad_norm: float | None = None


def batch_latency(
    model: torch.nn.Module,
    network: torch.nn.Module,
    group_modules: dict[str, list[str]],
    scaling: float,
    examples: Sequence[Example],
    policy: ClusteringPolicy,
    batch_size: int,
    repeats: int = 3,
    statistic=None,
    tokenizer: Any = None,
) -> dict:
    """Milliseconds per serving-sized batch: preparing its adapters (statistics, k-means, the network
    on the centroids) and one full forward of prompt + continuation without and with them (medians).

    In-process torch: the serving path adds the sidecar round trip (see benchmarks/)."""
    chunk = list(examples[:batch_size])
    tokens = torch.tensor([e.prompt + e.continuation for e in chunk])
    prompts = torch.tensor([e.prompt for e in chunk])
    names = [n for ms in group_modules.values() for n in ms]
    applier = DeltaApplier(model, names, scaling)
    prepare, base, adapted = [], [], []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                stats = batch_statistics(model, prompts, statistic, tokenizer)
                adapters = adapters_for_batch(network, group_modules, stats, policy)
                t1 = time.perf_counter()
                model(input_ids=tokens)
                t2 = time.perf_counter()
                applier.rows = adapters.rows
                model(input_ids=tokens)
                applier.rows = None
                t3 = time.perf_counter()
                prepare.append(t1 - t0)
                base.append(t2 - t1)
                adapted.append(t3 - t2)
    finally:
        applier.remove()
    return {
        "batch_size": len(chunk),
        "tokens_per_row": tokens.shape[1],
        "prepare_ms": 1e3 * float(np.median(prepare)),
        "base_forward_ms": 1e3 * float(np.median(base)),
        "adapted_forward_ms": 1e3 * float(np.median(adapted)),
    }


def label_statistics(examples: Sequence[Example], dim: int) -> dict[tuple[int, ...], torch.Tensor]:
    """Each prompt's domain label as a one-hot row of the statistic's width (the oracle diagnostic)."""
    labels = sorted({e.label for e in examples if e.label is not None})
    if not labels or any(e.label is None for e in examples):
        raise ValueError(
            "oracle_statistic: expected labelled examples (a labelled corpus such as --data mixed)"
        )
    if len(labels) > dim:
        raise ValueError(
            f"oracle_statistic: expected at most {dim} labels (the statistic's width), got {len(labels)}"
        )
    rows: dict[tuple[int, ...], torch.Tensor] = {}
    for e in examples:
        row = torch.zeros(dim)
        row[labels.index(e.label)] = 1.0
        if e.prompt in rows and not torch.equal(rows[e.prompt], row):
            raise ValueError(f"oracle_statistic: prompt of {e.doc_id!r} occurs under two labels")
        rows[e.prompt] = row
    return rows


def static_rank_for(params: int, config: HyperNetworkConfig) -> int:
    """The static-LoRA rank whose parameter count is closest to `params`."""
    per_rank = sum(g.num_modules * (g.d_in + g.d_out) for g in config.groups)
    return max(1, round(params / per_rank))


def run_study(
    model: torch.nn.Module,
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    test_examples: Sequence[Example],
    config: StudyConfig,
    out: Path,
    progress: bool = True,
    only: Sequence[str] | None = None,
    tokenizer: Any = None,
    skip: Sequence[str] = (),
    reuse: Sequence[Path] = (),
    processes: Processes | None = None,
    split_by: str | None = None,
) -> dict:
    """Train and score every method for every seed; returns (and writes) the report data.

    `only` (run names: base, static, static-basis, static-big, hyper, experts) computes just those runs
    and writes no report: several processes can then share one study directory, each on its own runs,
    and a last call without `only` gathers everything. `skip` (run names) leaves runs out: neither
    computed nor reported, and the report lists them. `tokenizer`: the model's, for a sentence-encoder
    statistic (statistics.py).

    With `config.lrs`, each trained run is saved per rate (`static-lr0.004-seed0.json`) and chosen on
    validation, so no method is compared at a rate that suits another. `reuse`: single-rate study
    directories (same data, a rate this study uses) whose runs are taken instead of retrained wherever
    every setting the run depends on matches (`_trained_with`).

    `split_by`: how the splits were made ("source" or "document"), reported with the examples and
    sources of each split.

    `processes` (torchrun, distributed.py): the runs are dealt out over the ranks in turn, each trained
    whole by one process, so the numbers are those of one process; like `only`, no report is written
    (a last call without `processes` gathers it)."""
    shared = processes is not None and processes.distributed
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    if shared and not processes.main:
        processes.barrier()  # rank 0 claims the directory and copies reused runs first
    identity = _claim(out, config, train_examples, validation_examples, test_examples)
    if not shared or processes.main:
        for source in reuse:
            _reuse(source, identity, config, runs)
    if shared and processes.main:
        processes.barrier()
    adapter_rank = emitted_rank(config.network, config.rank, config.bases)
    plan = plan_export(
        model,
        config.targets,
        adapter_rank,
        hidden=config.hidden,
        max_delta_norm=config.max_delta_norm,
        statistic=config.statistic,
        kind=config.network,
        bases=config.bases,
        routing_sharpness=config.routing_sharpness,
        routing=config.routing,
        labels=router_labels(config.routing, train_examples, config.bases - config.shared_bases),
        shared_bases=config.shared_bases,
    )
    spec = plan.manifest_base["statistic"]
    statistics = StatisticCache(model, spec, tokenizer=tokenizer)
    if config.oracle_statistic:
        statistics.pin(
            label_statistics(
                [*train_examples, *validation_examples, *test_examples], plan.hypernetwork_config.stat_dim
            )
        )
    names = [n for ms in plan.group_modules.values() for n in ms]
    scaling = plan.manifest_base["scaling"]
    prefix = PrefixCache.for_targets(model, names)
    if prefix is not None:
        prefix.add([*train_examples, *validation_examples, *test_examples], config.batch_size, progress)
    hyper_params = build_network(plan.hypernetwork_config).num_parameters()
    big_rank = static_rank_for(hyper_params, plan.hypernetwork_config)

    def score(
        network, policy: ClusteringPolicy, examples: Sequence[Example] = test_examples, shuffle: bool = False
    ) -> np.ndarray:
        applier = DeltaApplier(model, names, scaling)
        try:
            sums, length = mean_nll(
                model,
                applier,
                network,
                plan.group_modules,
                examples,
                policy,
                config.batch_size,
                0,
                prefix,
                spec,
                statistics,
                shuffle,
            )
        finally:
            applier.remove()
        return sums / length  # per-token mean NLL of each test document

    def fit(
        network,
        examples,
        validation,
        seed: int,
        policy: ClusteringPolicy,
        batch_size=None,
        lr=None,
        max_steps=None,
    ) -> dict:
        tc = TrainConfig(
            policy=policy,
            batch_size=min(batch_size or config.batch_size, len(examples)),
            lr=config.lr if lr is None else lr,
            max_steps=max_steps or config.max_steps,
            eval_every=config.eval_every,
            patience=config.patience,
            seed=seed,
            statistic=spec,
            batching=config.batching,
            schedule=config.schedule,
            warmup_steps=config.warmup_steps,
            clip_grad_norm=config.clip_grad_norm,
        )
        started = time.perf_counter()
        checkpoints = None
        if "partial" in computing:  # each training of the run its own checkpoint (experts: one per label)
            computing["fits"] += 1
            checkpoints = computing["partial"] / f"fit{computing['fits']}"
        result = train(
            model,
            network,
            plan.group_modules,
            scaling,
            examples,
            validation,
            tc,
            progress,
            prefix,
            statistics,
            checkpoint_dir=checkpoints,
        )
        return {
            "best_step": result.best_step,
            "steps": result.steps,
            "seconds": time.perf_counter() - started,
            "best_validation_nll": result.best_validation_nll,
        }

    run_seconds: dict[str, float | None] = {}  # per saved run: the compute it took (None: not recorded)
    # The run being computed: its trainings checkpoint under runs/partial/<run>/, so a study killed
    # mid-run (a job's time limit, a preempted node) resumes that run where it stopped, not from scratch.
    computing: dict[str, Any] = {}
    order = itertools.count()  # every rank meets the runs in the same order

    def cached(name: str, seed: int, compute, lr: float | None = None) -> dict | None:
        path = runs / (f"{name}-seed{seed}.json" if lr is None else f"{name}-lr{lr:g}-seed{seed}.json")
        index = next(order)
        if name in skip:
            return None
        if path.exists():
            record = json.loads(path.read_text())
        elif (only is not None and name not in only) or (shared and not processes.owns(index)):
            return None
        else:
            partial = runs / "partial" / path.stem
            resumed = partial.is_dir()
            computing.update(partial=partial, fits=0)
            started = time.perf_counter()
            try:
                record = compute()
            finally:
                computing.clear()
            # Kept in the run itself: a worker killed after writing some runs leaves no invocation time.
            # A resumed run's earlier pieces were not timed, so its time is not recorded (the report
            # counts it as untimed) rather than understated.
            record["run_seconds"] = None if resumed else time.perf_counter() - started
            path.write_text(json.dumps(record) + "\n")
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):  # runs/ then holds saved runs only, once none is partial
                partial.parent.rmdir()
        run_seconds[path.stem] = record.get("run_seconds")
        return record

    lrs = tuple(config.lrs)
    test_labels = [e.label for e in test_examples]
    lr_picks: dict[str, list] = {}  # per method, per seed: the rate taken on validation

    def tuned(name: str, seed: int, compute) -> dict | None:
        """`compute(lr)`: at `config.lr`, or at each of `config.lrs` (each saved) and the best on
        validation."""
        if not lrs:
            return cached(name, seed, lambda: compute(config.lr))
        candidates = {lr: cached(name, seed, lambda lr=lr: compute(lr), lr=lr) for lr in lrs}
        if any(run is None for run in candidates.values()):
            return None
        if name == "experts":
            return _pick_experts(candidates, test_labels)
        lr = min(candidates, key=lambda lr: candidates[lr]["best_validation_nll"])
        return {**candidates[lr], "lr": lr}

    records: dict[str, list[dict]] = {}

    def add(method: str, record: dict | None) -> None:
        if record is not None:
            records.setdefault(method, []).append(record)
            if "lr" in record:
                lr_picks.setdefault(method, []).append(record["lr"])

    add("base", cached("base", 0, lambda: {"per_doc": score(None, FixedK(1)).tolist()}))
    rank_config = plan.hypernetwork_config  # the emitted rank

    def with_rank(rank: int) -> HyperNetworkConfig:
        return HyperNetworkConfig(**{**asdict(rank_config), "groups": rank_config.groups, "rank": rank})

    big_config = with_rank(big_rank)
    basis_config = with_rank(config.rank)  # a mixture's bases have the study's rank
    labels = sorted({e.label for e in train_examples if e.label is not None})
    # The experts together have the mixture's parameters: its emitted rank shared out over the labels
    # (a basis's rank when there is one basis per label). Otherwise each expert has the study's rank.
    expert_rank = adapter_rank // len(labels) if config.network == "mixture" and labels else config.rank
    expert_config = with_rank(max(1, expert_rank))
    hyper_runs: list[dict] = []
    for seed in config.seeds:

        def static_run(lr: float, cfg=rank_config, seed=seed) -> dict:
            torch.manual_seed(seed)
            network = StaticLoRA(cfg)
            facts = fit(network, train_examples, validation_examples, seed, FixedK(1), lr=lr)
            return {
                "per_doc": score(network, FixedK(1)).tolist(),
                # what a fallback adapter's threshold is chosen on (fallback_adapter.py)
                "validation_per_doc": score(network, FixedK(1), validation_examples).tolist(),
                "params": network.num_parameters(),
                **facts,
            }

        static = tuned("static", seed, static_run)
        add("static LoRA (same rank)", static)
        if adapter_rank != config.rank:  # a mixture: also the static LoRA of one basis's rank
            one = tuned("static-basis", seed, lambda lr, seed=seed: static_run(lr, basis_config, seed))
            add(f"static LoRA (rank {config.rank}, one basis)", one)
        if big_rank != adapter_rank:
            big = tuned("static-big", seed, lambda lr, seed=seed: static_run(lr, big_config, seed))
            add(f"static LoRA (rank {big_rank}, ~hyper params)", big)

        def hyper_run(lr: float, seed=seed) -> dict:
            torch.manual_seed(seed)
            network = build_network(rank_config)
            facts = fit(network, train_examples, validation_examples, seed, config.train_policy, lr=lr)
            scores = {"auto k": score(network, AutoK(max_k=8)).tolist()}
            for k in config.eval_ks:
                scores[f"k={k}"] = score(network, FixedK(k)).tolist()
            per_request = FixedK(config.batch_size)
            scores["per request"] = score(network, per_request).tolist()
            # The same servings on validation: what a choice between recipes is made on, as each engine
            # would serve it (vLLM and TGI bound the adapters per batch, chameleon_torch need not).
            policies = {"auto k": AutoK(max_k=8), **{f"k={k}": FixedK(k) for k in config.eval_ks}}
            validation = {
                name: float(score(network, policy, validation_examples).mean())
                for name, policy in policies.items()
            }
            validation_per_doc = score(network, per_request, validation_examples)
            validation["per request"] = float(validation_per_doc.mean())
            confidence = {}
            if getattr(network, "classifier", None) is not None:  # a label router: how sure, per request
                with torch.no_grad():
                    confidence = {
                        split: network.confidence(statistics([e.prompt for e in examples], network)).tolist()
                        for split, examples in (("validation", validation_examples), ("test", test_examples))
                    }
            # Control: each request served with another request's statistic.
            scores["per request, shuffled statistic"] = score(network, per_request, shuffle=True).tolist()
            latency = batch_latency(
                model,
                network,
                plan.group_modules,
                scaling,
                test_examples,
                AutoK(max_k=8),
                config.batch_size,
                statistic=spec,
                tokenizer=tokenizer,
            )
            return {
                "scores": scores,
                "validation": validation,
                "validation_per_doc": validation_per_doc.tolist(),
                **({"confidence": confidence} if confidence else {}),
                "params": network.num_parameters(),
                "latency": latency,
                **facts,
            }

        hyper = tuned("hyper", seed, hyper_run) or {"scores": {}}
        if hyper["scores"]:
            hyper_runs.append(hyper)
            if "lr" in hyper:
                lr_picks.setdefault("Chameleon (every policy)", []).append(hyper["lr"])
        for policy_name, per_doc in hyper["scores"].items():
            records.setdefault(f"Chameleon, {policy_name}", []).append(
                {"per_doc": per_doc, "params": hyper["params"], "best_step": hyper["best_step"]}
            )
        add(WITH_FALLBACK, with_fallback(hyper, static))
        if config.experts and labels:
            add(
                "per-domain experts",
                tuned(
                    "experts",
                    seed,
                    lambda lr, seed=seed: _experts(
                        labels,
                        train_examples,
                        validation_examples,
                        test_examples,
                        expert_config,
                        seed,
                        lambda *a: fit(
                            *a,
                            batch_size=config.expert_batch_size,
                            lr=lr,
                            max_steps=config.expert_steps,
                        ),
                        score,
                    ),
                ),
            )
    if only is not None or shared:
        return {"computed_only": sorted(only or ())}
    report = summarise(records, len(test_examples), config, hyper_params, big_rank)
    if split_by is not None:
        splits = ExampleSplits(list(train_examples), list(validation_examples), list(test_examples))
        report["splits"] = {"by": split_by, "examples": splits.sizes(), "sources": splits.sources()}
    if skip:
        report["skipped_runs"] = sorted(skip)
    if config.oracle_statistic:
        report["oracle_statistic"] = True
    elif config.statistic != "embedding":
        report["statistic"] = config.statistic
    if config.network == "mixture" and config.routing != "distance":
        report["routing"] = config.routing
    if lrs:
        report["lr_selection"] = {"candidates": list(lrs), "picks": lr_picks}
    timed = [t for t in run_seconds.values() if t is not None]
    report["run_seconds"] = {
        "total": float(sum(timed)),
        "runs": len(run_seconds),
        "untimed": len(run_seconds) - len(timed),
    }
    if all(e.label is not None for e in test_examples):  # where each method gains: mean NLL per label
        labels_of = np.array([e.label for e in test_examples])
        per_doc = {name: _seed_mean(runs) for name, runs in records.items()}
        report["per_label"] = {
            name: {label: float(values[labels_of == label].mean()) for label in sorted(set(labels_of))}
            for name, values in per_doc.items()
        }
    report["validation"] = validation_table(records, hyper_runs)
    if WITH_FALLBACK in records:
        report["fallback"] = [run["fallback"] for run in records[WITH_FALLBACK]]
    latencies = [run["latency"] for run in hyper_runs if run.get("latency")]
    if latencies:
        report["latency_per_batch"] = {
            key: float(np.median([x[key] for x in latencies])) for key in latencies[0]
        }
    if all(e.label is not None for e in test_examples):  # does the statistic group by domain?
        stats = statistics([e.prompt for e in test_examples]).numpy()  # cached while scoring
        report["grouping"] = grouping_diagnostics(stats, [e.label for e in test_examples], config.batch_size)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


WITH_FALLBACK = "Chameleon + fallback, per request"


def with_fallback(hyper: dict, static: dict | None) -> dict | None:
    """Chameleon per request with the fallback adapter (fallback_adapter.py) of one seed: the threshold
    chosen on that seed's validation split, then applied to its test requests. None for a router with
    no classifier, or runs saved before they recorded what the choice needs."""
    confidence = hyper.get("confidence")
    if not confidence or "validation_per_doc" not in hyper or not (static or {}).get("validation_per_doc"):
        return None
    choice = choose_threshold(
        confidence["validation"], hyper["validation_per_doc"], static["validation_per_doc"]
    )
    # as train would serve it: no fallback unless it gains on held-out halves of validation too
    unsure = np.asarray(confidence["test"]) < (choice.threshold if choice.gains else 0.0)
    per_doc = np.where(unsure, np.asarray(static["per_doc"]), np.asarray(hyper["scores"]["per request"]))
    return {
        "per_doc": per_doc.tolist(),
        "params": hyper["params"] + static["params"],
        "best_validation_nll": choice.nll,
        "fallback": {**choice.as_json(), "installed": choice.gains, "test_share": float(unsure.mean())},
    }


def validation_table(records: dict[str, list[dict]], hyper_runs: Sequence[dict]) -> dict[str, dict]:
    """Mean validation NLL per method over its seeds, {"mean": ..., "per_seed": [...]}: the numbers a
    choice between methods or recipes is made on, never the test split's. Trained baselines give their
    best validation NLL (the step exported); Chameleon gives one entry per serving policy (runs saved
    before these were recorded give none)."""
    table: dict[str, dict] = {}

    def put(name: str, values: list[float]) -> None:
        if values:
            table[name] = {"mean": float(np.mean(values)), "per_seed": [float(v) for v in values]}

    for name, runs in records.items():
        if name.startswith("Chameleon, ") or name == "base":
            continue
        put(name, [r["best_validation_nll"] for r in runs if r.get("best_validation_nll") is not None])
    served = [run["validation"] for run in hyper_runs if run.get("validation")]
    for policy in served[0] if served else ():
        put(f"Chameleon, {policy}", [v[policy] for v in served if policy in v])
    put("Chameleon, as trained (best step)", [r["best_validation_nll"] for r in hyper_runs])
    return table


def _as_json(config: StudyConfig) -> dict:
    """A config as study.json stores it (policies and tuples in their JSON form)."""
    return json.loads(json.dumps(asdict(config), default=repr))


def _claim(out: Path, config: StudyConfig, *splits: Sequence[Example]) -> dict:
    """Resume only the same study: saved runs are reused by (seed, method) name, so a directory holding
    runs of another configuration or other data must be refused, not silently mixed in."""
    import hashlib

    identity = {
        # seeds may be added to a finished study; everything else must match
        "config": {**_as_json(config), "seeds": None},
        "data": hashlib.sha256(
            json.dumps(
                [[(e.doc_id, e.label, e.prompt, e.continuation) for e in split] for split in splits]
            ).encode()
        ).hexdigest(),
    }
    path = out / "study.json"
    if path.exists():
        saved = json.loads(path.read_text())
        defaults = _as_json(StudyConfig(targets=config.targets))
        for key, value in identity["config"].items():  # a field added since: its default is what ran
            if key not in saved["config"] and value == defaults[key]:
                saved["config"][key] = value
        if saved != identity:
            changed = [
                key for key in identity["config"] if saved["config"].get(key) != identity["config"][key]
            ]
            if saved["data"] != identity["data"]:
                changed.append("data")
            raise ValueError(
                f"out: {out} holds runs of another study (different {', '.join(changed)}); "
                "use a new directory, or delete it to start over"
            )
    else:
        path.write_text(json.dumps(identity, indent=2) + "\n")
    return identity


# Settings only the generator sees: a static LoRA, an expert or the base model trains and scores the
# same whatever they are (baselines get a constant statistic row, and LoRA scaling is 2 at every rank).
_GENERATOR_ONLY = (
    "network",
    "bases",
    "routing_sharpness",
    "routing",
    "shared_bases",
    "train_policy",
    "eval_ks",
    "hidden",
    "statistic",
    "oracle_statistic",
)


def _trained_with(name: str, config: dict) -> dict:
    """The settings a method's runs depend on (a study config in its JSON form, rates aside): the
    experts train for their own step budget, the shared methods never see the experts' settings, and
    the LoRAs of fixed rank never see the generator's, so a routing variant retrains only the generator.
    The static LoRA of the hyper-network's parameter count depends on everything the generator does."""
    settings = {k: v for k, v in config.items() if k not in ("lr", "lrs", "seeds")}
    if name == "experts":
        settings["max_steps"] = settings.pop("expert_steps") or settings["max_steps"]
    else:
        del settings["expert_steps"], settings["expert_batch_size"]
    if name in ("static", "static-basis", "experts"):
        # One basis has the study's rank; the static LoRA has the emitted rank, and the experts share it
        # out over the data's labels.
        rank = settings["rank"]
        if name != "static-basis":
            rank = emitted_rank(settings["network"], rank, settings["bases"])
        settings = {k: v for k, v in settings.items() if k not in _GENERATOR_ONLY}
        settings["rank"] = rank
    return settings


def _reuse(source: Path, identity: dict, config: StudyConfig, runs: Path) -> None:
    """Take another study's runs that this study would train identically (same data, a rate it uses,
    every setting the run depends on): checking more rates, a longer budget for some methods only, or
    another routing then costs only the runs that differ. A run that differs is left to be trained. A
    study of several rates gives its runs rate by rate to a study of several rates."""
    saved = json.loads((source / "study.json").read_text())
    lr = float(saved["config"]["lr"])
    several = bool(saved["config"].get("lrs"))  # its runs are saved per rate: taken rate by rate
    rates = config.lrs or (config.lr,)
    if several and not config.lrs:
        raise ValueError(f"reuse: {source} is a study of several learning rates; this study has one (lrs)")
    if not several and lr not in rates:
        raise ValueError(f"reuse: {source} ran at lr {lr:g}, not one of this study's {list(rates)}")
    if saved.get("data") != identity["data"]:
        raise ValueError(f"reuse: {source} ran on other data (another corpus, split or token counts)")
    defaults = _as_json(StudyConfig(targets=config.targets))
    theirs = {**defaults, **saved["config"]}  # a field added since: its default is what ran
    changed: dict[str, list[str]] = {}
    for path in sorted((source / "runs").glob("*-seed*.json")):
        name, seed = path.stem.rsplit("-seed", 1)
        if name == "base":
            continue
        run_lr = lr
        if several:
            name, _, rate = name.rpartition("-lr")
            run_lr = float(rate)
            if run_lr not in rates:
                continue
        mine, other = _trained_with(name, identity["config"]), _trained_with(name, theirs)
        changed[name] = [key for key in mine if other.get(key) != mine[key]]
        target = runs / (f"{name}-lr{run_lr:g}-seed{seed}.json" if config.lrs else path.name)
        if changed[name] or target.exists():
            continue
        record = json.loads(path.read_text())
        if name == "experts" and "validation" not in record:
            log.info("reuse: %s has no per-label validation NLL; its experts are retrained", path)
            continue
        target.write_text(json.dumps(record) + "\n")
    if changed and all(changed.values()):
        keys = sorted({key for keys in changed.values() for key in keys})
        raise ValueError(f"reuse: {source} is another study (different {', '.join(keys)})")
    for name, keys in changed.items():
        if keys:
            log.info("reuse: %s runs of %s differ in %s; they are trained here", name, source, keys)


def _experts(labels, train_examples, validation_examples, test_examples, cfg, seed, fit, score) -> dict:
    """One static LoRA per label, trained on that label only; each test document scored by its own
    (an oracle: it is told every test document's label)."""
    per_doc = np.full(len(test_examples), np.nan)
    params = 0
    steps, validation = {}, {}
    for label in labels:
        torch.manual_seed(seed)
        network = StaticLoRA(cfg)
        own_train = [e for e in train_examples if e.label == label]
        own_val = [e for e in validation_examples if e.label == label] or list(validation_examples)
        facts = fit(network, own_train, own_val, seed, FixedK(1))
        steps[label] = facts["best_step"]
        validation[label] = facts["best_validation_nll"]
        params += network.num_parameters()
        rows = [i for i, e in enumerate(test_examples) if e.label == label]
        if rows:
            per_doc[rows] = score(network, FixedK(1), [test_examples[i] for i in rows])
    if np.isnan(per_doc).any():  # a test label with no training data: no expert to score it
        missing = sorted({test_examples[i].label for i in np.flatnonzero(np.isnan(per_doc))})
        raise ValueError(f"no expert for test labels {missing}: they have no training documents")
    return {"per_doc": per_doc.tolist(), "params": params, "best_steps": steps, "validation": validation}


def _pick_experts(candidates: dict[float, dict], test_labels: Sequence[Any]) -> dict:
    """Each label's expert at the rate where its own validation NLL is lowest: the experts are separate
    models, so each gets its own choice, as the shared methods do."""
    for lr, run in candidates.items():
        if "validation" not in run:
            raise ValueError(
                f"the experts run at lr {lr:g} has no per-label validation NLL (saved before experts "
                "recorded it): delete it to recompute, or leave the experts out (--skip experts)"
            )
    rows_of = np.asarray(test_labels)
    first = next(iter(candidates.values()))
    per_doc = np.asarray(first["per_doc"], dtype=np.float64)
    picked = {}
    for label in first["validation"]:
        lr = min(candidates, key=lambda lr: candidates[lr]["validation"][label])
        rows = rows_of == label
        per_doc[rows] = np.asarray(candidates[lr]["per_doc"])[rows]
        picked[label] = lr
    return {**first, "per_doc": per_doc.tolist(), "lr": picked}


def _per_seed(runs: Sequence[dict]) -> np.ndarray:
    """A method's test NLL per seed and document [seeds, documents]."""
    return np.array([r["per_doc"] for r in runs], dtype=np.float64)


def _seed_mean(runs: Sequence[dict]) -> np.ndarray:
    """Each test document's NLL averaged over a method's seeds."""
    return _per_seed(runs).mean(axis=0)


def summarise(
    records: dict[str, list[dict]], n_test: int, config: StudyConfig, hyper_params: int, big_rank: int
) -> dict:
    """Per method: mean test NLL over seeds with a document-bootstrap CI, per-seed means, and the
    paired difference to the same-rank static LoRA (the baseline the method has to beat)."""
    methods = {}
    reference = records.get("static LoRA (same rank)")
    ref = _seed_mean(reference) if reference else None
    for name, runs in records.items():
        per_doc = _seed_mean(runs)
        mean, lo, hi = bootstrap_ci(per_doc)
        entry = {
            "mean_nll": mean,
            "ci95": [lo, hi],
            "perplexity": math.exp(mean),
            "per_seed": [float(np.mean(r["per_doc"])) for r in runs],
            "seeds": len(runs),
            "params": runs[0].get("params", 0),
        }
        if ref is not None:
            delta, dlo, dhi = bootstrap_ci(per_doc - ref)
            entry["vs_static_same_rank"] = {"delta": delta, "ci95": [dlo, dhi]}
        methods[name] = entry
    headroom = _headroom(records, methods)
    return {
        "test_documents": n_test,
        "targets": config.targets,
        "rank": config.rank,
        "static_rank_equal_params": big_rank,
        "hypernetwork_params": hyper_params,
        "seeds": config.seeds,
        "max_steps": config.max_steps,
        "batch_size": config.batch_size,
        **(
            {
                "expert_steps": config.expert_steps or config.max_steps,
                "expert_batch_size": config.expert_batch_size,
            }
            if "per-domain experts" in records
            else {}
        ),
        "methods": methods,
        **({"headroom": headroom} if headroom else {}),
    }


def _headroom(records: dict[str, list[dict]], methods: dict[str, dict]) -> dict | None:
    """How much the oracle experts beat the best static LoRA, and each method's paired difference to
    that best static LoRA (the bar a dynamic method must clear) and share of the experts' gain."""
    statics = [name for name in methods if name.startswith("static LoRA")]
    if not statics:
        return None
    best = min(statics, key=lambda name: methods[name]["mean_nll"])
    best_runs = _per_seed(records[best])
    for name, entry in methods.items():
        runs = _per_seed(records[name])
        delta, lo, hi = bootstrap_ci(runs.mean(axis=0) - best_runs.mean(axis=0))
        entry["vs_best_static"] = {"delta": delta, "ci95": [lo, hi]}
        over_seeds = seed_bootstrap_ci(runs, best_runs)
        if over_seeds is not None:
            entry["vs_best_static"]["ci95_seeds"] = list(over_seeds[1:])
    experts = methods.get("per-domain experts")
    gain = methods[best]["mean_nll"] - experts["mean_nll"] if experts else None
    if gain is not None and gain > 0:
        expert_runs = _per_seed(records["per-domain experts"])
        for name, entry in methods.items():
            entry["share_of_expert_headroom"] = -entry["vs_best_static"]["delta"] / gain
            with_interval = headroom_share_ci(_per_seed(records[name]), best_runs, expert_runs)
            if with_interval is not None:
                entry["share_of_expert_headroom_ci95"] = list(with_interval[1:])
    return {"best_static": best, "experts_gain_over_best_static": gain}
