"""Training and evaluation from Python: what `chameleon train` and `chameleon eval` call.

    from adapter_service.training import train_artifact, evaluate
    artifact = train_artifact("my-artifact", model="./my-model", data="my.jsonl")
    report = evaluate("my-study", recipe="my-recipe.toml", seeds=[0])

Settings come from a recipe (`recipe.py`; "default" unless given) and keyword overrides with the
recipe's key names; the result is what the CLI prints and writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adapter_service.training.recipe import DEFAULT, KEYS, RecipeError, check, load_recipe, recipe_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    artifact: Any  # core.artifact.Artifact; None on the ranks other than 0 under torchrun
    best_validation_nll: float
    best_step: int
    targets: list[str]


def resolve(recipe: str | Path = DEFAULT, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's settings with `overrides` on top; every key present (None where unset)."""
    values = load_recipe(recipe)
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise RecipeError(f"setting {key!r}: expected one of {sorted(KEYS)}")
        values[key] = None if value is None else check(key, value, "override")
    return {key: values.get(key) for key in KEYS}


@dataclass(frozen=True)
class Comparison:
    """Validation NLL per token of the base model, the static LoRA of Chameleon's size and Chameleon:
    `train` never lets Chameleon pass unnoticed when it does not beat the static LoRA by `min_gain`."""

    base: float
    static: float
    chameleon: float
    min_gain: float = 0.0

    @property
    def static_wins(self) -> bool:
        return not self.chameleon < self.static - self.min_gain

    def as_json(self) -> dict:
        return {
            "base": self.base,
            "static": self.static,
            "chameleon": self.chameleon,
            "min_gain": self.min_gain,
            "chameleon_beats_static": not self.static_wins,
        }

    def report(self, fallback: bool) -> None:
        """One line on stdout, and a warning on stderr when the static LoRA is as good or better."""
        print(
            f"validation NLL per token: base {self.base:.4f}, static LoRA {self.static:.4f}, "
            f"Chameleon {self.chameleon:.4f}",
            flush=True,
        )
        if not self.static_wins:
            return
        then = (
            "exporting the static LoRA instead (--fallback-to-static): the sidecar serves it unchanged"
            if fallback
            else "serve the static LoRA (--fallback-to-static exports it, or train with --kind static)"
        )
        message = (
            f"WARNING: Chameleon ({self.chameleon:.4f}) does not beat the static LoRA of its size "
            f"({self.static:.4f}) on validation by --min-gain {self.min_gain:g}: adapting per request does "
            f"not pay on this data; {then}"
        )
        log.warning(message)
        print(message, file=sys.stderr, flush=True)


def report_fallback(choice: Any, rank: int) -> None:
    """One line on what the fallback adapter does on validation, and what it costs in rank."""
    if not choice.gains:
        print(
            f"fallback adapter: not installed (the best confidence threshold, {choice.threshold:.3f}, "
            f"takes validation NLL {choice.routed_nll:.4f} -> {choice.nll:.4f} but gains "
            f"{choice.held_out_gain:+.4f} on held-out halves); the artifact's rank stays {rank}",
            flush=True,
        )
        return
    print(
        f"fallback adapter: requests with router confidence below {choice.threshold:.3f} "
        f"({choice.share:.0%} of validation) get the static LoRA: validation NLL {choice.routed_nll:.4f} -> "
        f"{choice.nll:.4f} ({choice.held_out_gain:+.4f} on held-out halves); the artifact's rank is {rank} "
        "(the static LoRA's bases added; --no-unsure-fallback keeps the mixture's)",
        flush=True,
    )


def recipe_name(recipe: str | Path) -> str:
    """How a manifest names the recipe: a shipped name as is, a file by its path."""
    text = str(recipe)
    return text if "/" not in text and not text.endswith(".toml") else str(recipe_path(recipe))


def train_artifact(
    out: str | Path,
    recipe: str | Path = DEFAULT,
    command: str | None = None,
    *,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    **overrides: Any,
) -> TrainOutcome:
    """Train a hyper-network (or a static LoRA: `kind="static"`) and write its artifact to `out`.

    `device`: "auto" (a GPU when there is one), "cpu" or "cuda". Under torchrun every process trains
    its share of each batch (distributed.py) and rank 0 writes the artifact. `checkpoint_dir`: save at
    every validation and resume an interrupted run from there (checkpoint.py)."""
    import torch

    from adapter_service.core.clustering import FixedK
    from adapter_service.training import distributed
    from adapter_service.training.export import export_artifact, plan_export
    from adapter_service.training.fallback_adapter import install_fallback, validation_choice
    from adapter_service.training.hypernetwork import (
        LABEL_ROUTINGS,
        MixtureHyperNetwork,
        build_network,
        emitted_rank,
    )
    from adapter_service.training.trainer import (
        PrefixCache,
        StaticLoRA,
        StatisticCache,
        TrainConfig,
        resolve_routing,
        router_labels,
        train,
        validation_nll,
    )

    s = SimpleNamespace(**resolve(recipe, overrides))
    processes = distributed.start(device)
    model, tokenizer, splits = _inputs(s, processes)
    targets = resolve_targets(s.targets, model)
    routing = resolve_routing(s.routing, s.network, splits.train)
    plan = plan_export(
        model,
        targets,
        emitted_rank(s.network, s.rank, s.bases),
        hidden=s.hidden,
        max_delta_norm=s.max_delta_norm,
        statistic=s.statistic,
        kind=s.network,
        bases=s.bases,
        routing_sharpness=s.routing_sharpness,
        routing=routing,
        labels=router_labels(routing, splits.train, s.bases - s.shared_bases),
        shared_bases=s.shared_bases,
    )
    torch.manual_seed(s.seed)
    network = (
        build_network(plan.hypernetwork_config) if s.kind == "hyper" else StaticLoRA(plan.hypernetwork_config)
    )
    prefix = PrefixCache.for_targets(model, [n for ms in plan.group_modules.values() for n in ms])
    config = TrainConfig(
        policy=_train_policy(s),
        batch_size=s.batch_size,
        lr=s.lr,
        max_steps=s.steps,
        eval_every=s.eval_every,
        patience=s.patience,
        seed=s.seed,
        batching=s.batching,
        statistic=plan.manifest_base["statistic"],
        schedule=s.schedule,
        warmup_steps=_warmup(s),
        clip_grad_norm=_clip(s),
    )
    statistics = StatisticCache(model, plan.manifest_base["statistic"], tokenizer=tokenizer)
    fit = functools.partial(
        train,
        model,
        group_modules=plan.group_modules,
        scaling=plan.manifest_base["scaling"],
        train_examples=splits.train,
        validation_examples=splits.validation,
        progress=processes.main,
        prefix=prefix,
        statistics=statistics,
        processes=processes,
    )
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result = fit(network=network, config=config, checkpoint_dir=checkpoints)
    comparison, falls_back, fallback = None, False, None
    if s.kind == "hyper" and s.baseline == "static":
        # The static LoRA of the same targets and rank, trained on the same data and budget: what
        # Chameleon has to beat on validation to be worth serving.
        torch.manual_seed(s.seed)
        static = StaticLoRA(plan.hypernetwork_config)
        static_config = dataclasses.replace(config, policy=FixedK(1))
        static_result = fit(
            network=static,
            config=static_config,
            checkpoint_dir=checkpoints / "static" if checkpoints is not None else None,
        )
        base = validation_nll(
            model, None, plan.group_modules, plan.manifest_base["scaling"], splits.validation,
            static_config, prefix, statistics, processes,
        )  # fmt: skip
        chameleon = result.best_validation_nll
        comparison = Comparison(base, static_result.best_validation_nll, chameleon, s.min_gain)
        if processes.main:
            comparison.report(s.fallback_to_static)
        falls_back = comparison.static_wins and s.fallback_to_static
        if falls_back:
            network, result = static, static_result
        elif s.unsure_fallback and routing in LABEL_ROUTINGS and isinstance(network, MixtureHyperNetwork):
            fallback = validation_choice(
                model, network, static, plan.group_modules, plan.manifest_base["scaling"],
                splits.validation, config, prefix, statistics,
            )  # fmt: skip
            if fallback.gains:
                network = install_fallback(network, static, fallback.threshold)
            if processes.main:
                report_fallback(fallback, network.config.rank)
    outcome = TrainOutcome(None, result.best_validation_nll, result.best_step, targets)
    if not processes.main:
        processes.barrier()  # returns once rank 0 has written the artifact
        return outcome
    exported = "static" if falls_back else s.kind
    facts = {
        "trained": True,
        "recipe": recipe_name(recipe),
        "kind": exported,
        "data": s.data,
        "seed": s.seed,
        "steps": result.steps,
        "best_step": result.best_step,
        "best_validation_nll": result.best_validation_nll,
        "history": result.history,
        "prompt_tokens": s.prompt_tokens,
        "continuation_tokens": s.continuation_tokens,
        "max_per_label": s.max_per_label,
        "drop_labels": s.drop_label,
        "split_seed": s.split_seed,
        "split_by": s.split_by,
        "sources": splits.sources(),
        "batching": s.batching,
        "statistic": s.statistic,
        "targets": targets,
        "max_k": s.max_k,
        "train_k": s.train_k,
        "network": s.network,
        "bases": s.bases,
        "shared_bases": s.shared_bases,
        "lr": s.lr,
        "schedule": config.schedule,
        "warmup_steps": config.warmup_steps,
        "clip_grad_norm": config.clip_grad_norm,
        "batch_size": s.batch_size,
        "processes": processes.world_size,
    }
    if comparison is not None:
        facts["validation_nll"] = comparison.as_json()
        if exported != s.kind:
            facts["exported_instead_of"] = s.kind
    if fallback is not None:
        facts["unsure_fallback"] = {**fallback.as_json(), "installed": fallback.gains}
    if command:
        facts["command"] = command
    artifact = export_artifact(network.cpu().eval(), plan, out, facts=facts)
    processes.barrier()
    return dataclasses.replace(outcome, artifact=artifact)


def evaluate(
    out: str | Path,
    recipe: str | Path = DEFAULT,
    *,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    reuse: Sequence[str | Path] = (),
    command: str | None = None,
    device: str = "auto",
    **overrides: Any,
) -> dict:
    """The fair comparison (every method, seeds, intervals) into `out`; returns the report data and
    writes report.json/md/png unless `only` computes a subset (parallel workers on one `out`).

    Under torchrun the study's runs are dealt out over the processes, each run trained by one of them
    (the same numbers as one process, and no gradient traffic: a study is many independent runs); rank
    0 then gathers the report."""
    from adapter_service.training import distributed
    from adapter_service.training.evaluation import StudyConfig, run_study
    from adapter_service.training.report import write_report
    from adapter_service.training.trainer import resolve_routing

    started = time.perf_counter()
    s = SimpleNamespace(**resolve(recipe, overrides))
    processes = distributed.start(device)
    model, tokenizer, splits = _inputs(s, processes)
    config = StudyConfig(
        targets=resolve_targets(s.targets, model),
        rank=s.rank,
        hidden=s.hidden,
        seeds=list(s.seeds),
        batch_size=s.batch_size,
        max_steps=s.steps,
        eval_every=s.eval_every,
        patience=s.patience,
        lr=s.lrs[0] if s.lrs else s.lr,
        lrs=tuple(s.lrs) if len(s.lrs) > 1 else (),
        experts=s.experts,
        expert_batch_size=s.expert_batch_size,
        expert_steps=s.expert_steps,
        max_delta_norm=s.max_delta_norm,
        statistic=s.statistic,
        batching=s.batching,
        network=s.network,
        bases=s.bases,
        routing_sharpness=s.routing_sharpness,
        # the oracle diagnostic routes on the true label itself: no classifier in front of it
        routing=resolve_routing(
            "distance" if s.oracle_statistic and s.routing == "auto" else s.routing, s.network, splits.train
        ),
        shared_bases=s.shared_bases,
        oracle_statistic=s.oracle_statistic,
        train_policy=_train_policy(s),
        schedule=s.schedule,
        warmup_steps=_warmup(s),
        clip_grad_norm=_clip(s),
    )
    out = Path(out)
    study = functools.partial(
        run_study,
        model,
        splits.train,
        splits.validation,
        splits.test,
        config,
        out,
        progress=processes.main,
        tokenizer=tokenizer,
        skip=skip,
        reuse=[Path(d) for d in reuse],
        split_by=s.split_by,
    )
    report = study(only=only, processes=processes)
    if processes.distributed:
        processes.barrier()  # every rank's runs are saved
        if not processes.main:
            return report
        if not only:
            report = study(only=None)  # every run is saved now: this only gathers them
    # A study's wall time is the sum over its invocations, parallel `only` workers included (under
    # torchrun, rank 0's: it waits for the others).
    ledger = out / "wall_seconds.json"
    spent = json.loads(ledger.read_text()) if ledger.exists() else []
    spent.append(time.perf_counter() - started)
    ledger.write_text(json.dumps(spent) + "\n")
    if not only:
        command = command or f"evaluate(recipe={recipe_name(recipe)!r})"
        write_report(report, out, command, sum(spent), invocations=len(spent))
    return report


def resolve_targets(targets: str | Sequence[str], model: Any) -> list[str]:
    """ "auto": the model's own early attention projections (models.spec.default_targets); a
    comma-separated string or a list: those names or globs."""
    if isinstance(targets, str) and targets.strip() == "auto":
        from adapter_service.models.spec import default_targets

        chosen = default_targets(model)
        log.info("targets auto: %s", ",".join(chosen))
        return chosen
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    return [t.strip() for t in names if t.strip()]


def _inputs(s: SimpleNamespace, processes: Any):
    from adapter_service.models.loading import load_causal_lm
    from adapter_service.training.trainer import load_examples

    model, tokenizer = load_causal_lm(s.model, device=str(processes.device))
    splits = load_examples(
        s.data,
        tokenizer,
        s.prompt_tokens,
        s.continuation_tokens,
        s.max_per_label,
        s.split_seed,
        s.drop_label,
        s.split_by,
    )
    if not processes.main:
        return model, tokenizer, splits
    sources = splits.sources()
    print(
        f"{s.data}: {len(splits.train)} train / {len(splits.validation)} validation / "
        f"{len(splits.test)} test examples ({s.prompt_tokens} prompt + {s.continuation_tokens} "
        f"continuation tokens), from {sources['train']} / {sources['validation']} / {sources['test']} "
        f"sources (split by {s.split_by})",
        flush=True,
    )
    return model, tokenizer, splits


def _train_policy(s: SimpleNamespace):
    """`train_k` as a clustering policy for the training batches."""
    from adapter_service.core.clustering import AutoK, FixedK

    if s.train_k == "auto":
        return AutoK(max_k=s.max_k)
    if s.train_k == "request":
        return FixedK(s.batch_size)
    try:
        return FixedK(int(s.train_k))
    except ValueError:
        raise ValueError(f"train_k: expected 'auto', 'request' or a number, got {s.train_k!r}") from None


def _warmup(s: SimpleNamespace) -> int:
    """`warmup_steps`, or a tenth of `steps` when unset."""
    return s.warmup_steps if s.warmup_steps is not None else s.steps // 10


def _clip(s: SimpleNamespace) -> float | None:
    """`clip_grad_norm`; 0 or less turns clipping off."""
    return s.clip_grad_norm if s.clip_grad_norm > 0 else None
