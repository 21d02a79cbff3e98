"""`chameleon`: the command line of the sidecar and its tools.

chameleon serve  --artifact DIR [--address 127.0.0.1:50051 | unix:PATH] [--metrics-port 9464]
                 [--tls-cert F --tls-key F [--tls-client-ca F]] [--auth-token-file F] [--pause-file F]
chameleon export --model DIR|config.json|X.gguf|HUB_ID|PRESET --targets q_proj,v_proj --rank 8 --out DIR
chameleon export-peft --artifact DIR --model M --prompts FILE --out DIR   (one cluster -> PEFT dir)
chameleon train --model M --data my.jsonl --out DIR   (the default recipe; --config FILE, --print-config)
chameleon eval  --config RECIPE --out DIR              (the fair comparison; flags override the recipe)
chameleon demo   (the main job: SmolLM2, the shipped trained artifact, sidecar + model server, a mixed batch)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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


def _targets(text: str) -> list[str]:
    """`--targets a,b , c` -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _serve(args: argparse.Namespace) -> int:
    _limit_blas_threads(args.blas_threads)
    from adapter_service.core import logs
    from adapter_service.core.artifact import ArtifactError
    from adapter_service.serving.security import read_token_file
    from adapter_service.serving.server import ServerConfig, ServiceError, run
    from adapter_service.serving.validation import Limits

    logs.configure(args.log_level, json_format=not args.plain_logs)

    def optional_path(value: str | None) -> Path | None:
        return Path(value) if value else None

    try:
        config = ServerConfig(
            artifact=Path(args.artifact),
            address=args.address,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            metrics_address=args.metrics_address,
            limits=Limits(
                max_rows=args.max_rows,
                max_clusters=args.max_clusters,
                max_message_bytes=args.max_message_bytes,
            ),
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            workers=args.workers,
            ort_threads=args.ort_threads,
            seed=args.seed,
            grace_seconds=args.grace,
            max_connection_age_s=args.max_connection_age,
            expect_sha256=args.expect_sha256,
            tls_cert=optional_path(args.tls_cert),
            tls_key=optional_path(args.tls_key),
            tls_client_ca=optional_path(args.tls_client_ca),
            auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
            allow_insecure_remote=args.allow_insecure_remote,
            socket_mode=args.socket_mode,
            pause_file=optional_path(args.pause_file),
            audit_log=optional_path(args.audit_log),
        )
        asyncio.run(run(config))
    except (ArtifactError, ServiceError, RuntimeError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        print(f"chameleon serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _seconds(text: str) -> float:
    """`--max-connection-age 300` -> 300.0; a negative, infinite or non-numeric value is refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds such as 300, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 (never) or a positive number of seconds, got {text!r}")
    return value


def _file_mode(text: str) -> int:
    """`--socket-mode 0660` -> 0o660 (octal, as chmod takes it)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0600, got {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal mode between 0000 and 0777, got {text!r}")
    return mode


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


def _recipe_settings(args: argparse.Namespace) -> dict:
    """The flags given on the command line, by recipe key (argparse leaves the others out)."""
    from adapter_service.training.recipe import KEYS

    given = {key: getattr(args, key) for key in KEYS if hasattr(args, key)}
    if "lr" in given and isinstance(given["lr"], list):  # eval: --lr A [B ...]
        rates = given.pop("lr")
        given["lr"] = rates[0]
        given["lrs"] = rates if len(rates) > 1 else []
    if getattr(args, "no_experts", False):
        given["experts"] = False
    return given


def _command() -> str:
    import shlex

    return "chameleon " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _run_recipe(args: argparse.Namespace, run) -> int:
    """`--print-config`, or `run(settings)` with the recipe errors as one line and exit status 2."""
    from adapter_service.training.api import resolve
    from adapter_service.training.recipe import RecipeError, to_toml

    settings = _recipe_settings(args)
    try:
        if args.print_config:
            print(to_toml(resolve(args.config, settings), f"recipe: {args.config} + flags"), end="")
            return 0
        if not args.out:
            raise ValueError("--out is required")
        run(settings)
    except (RecipeError, ValueError, OSError) as exc:
        print(f"chameleon {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed = sys.modules.get("adapter_service.training.distributed")
        if distributed is not None:  # leave the torchrun process group, if this command joined one
            distributed.stop()
    return 0


def _train(args: argparse.Namespace) -> int:
    from adapter_service.training.api import train_artifact

    def run(settings: dict) -> None:
        outcome = train_artifact(
            args.out,
            args.config,
            command=_command(),
            device=args.device,
            checkpoint_dir=args.checkpoint_dir,
            **settings,
        )
        if outcome.artifact is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
        print(
            f"wrote {outcome.artifact.path} ({outcome.artifact.manifest.artifact_id}); best validation "
            f"NLL {outcome.best_validation_nll:.4f} at step {outcome.best_step}; targets "
            f"{','.join(outcome.targets)}"
        )

    return _run_recipe(args, run)


def _eval(args: argparse.Namespace) -> int:
    from adapter_service.training.api import evaluate

    def run(settings: dict) -> None:
        out = Path(args.out)
        reuse, command = args.reuse, _command()
        report = evaluate(
            out,
            args.config,
            only=args.only,
            skip=args.skip,
            reuse=reuse,
            command=command,
            device=args.device,
            **settings,
        )
        if "computed_only" in report and not args.only:  # a rank other than 0 under torchrun
            return
        if args.only:
            print(f"computed {', '.join(args.only)} in {out}; no report (--only)")
        else:
            print((out / "report.md").read_text())

    return _run_recipe(args, run)


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


def _add_recipe_options(p: argparse.ArgumentParser, command: str) -> None:
    """Every recipe key as a flag. No flag has a default of its own: an omitted flag keeps the
    recipe's value (adapter_service/training/recipes/default.toml unless --config names another)."""
    p.set_defaults(func=_train if command == "train" else _eval)
    p.add_argument(
        "--config",
        default="default",
        metavar="RECIPE",
        help="recipe: a .toml file or a shipped name (default, demo); flags override its values",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs: a GPU when there is one (auto), or cpu/cuda; under torchrun one GPU "
        "per process",
    )
    if command == "train":
        p.add_argument(
            "--checkpoint-dir",
            metavar="DIR",
            help="save the run at every validation and resume from the checkpoint there (an interrupted "
            "or restarted torchrun job continues where it stopped)",
        )
    p.add_argument(
        "--out", help="the artifact (train) or the report folder (eval); required unless --print-config"
    )
    opt = functools.partial(p.add_argument, default=argparse.SUPPRESS)
    opt("--model", help="preset, .gguf file, local Hugging Face directory or hub id")
    opt(
        "--data",
        help="corpus preset (wiki-categories, bbc-news, wiki+bbc, mixed) or a path (.jsonl, .txt, folder)",
    )
    opt(
        "--targets",
        help="'auto' (the model's early attention projections, by its own names) or comma-separated "
        "module names or globs, e.g. 'model.layers.[0-3].self_attn.q_proj'",
    )
    opt("--rank", type=int, help="rank of each mixture basis (the adapter's is rank x bases), or of 'full'")
    opt("--hidden", type=int, help="hyper-network width")
    opt("--prompt-tokens", type=int, help="tokens the statistic sees")
    opt("--continuation-tokens", type=int, help="tokens scored")
    opt("--max-per-label", type=int, help="cap documents per label (fast runs)")
    opt("--drop-label", action="append", help="leave out a label (repeatable)")
    opt("--split-seed", type=int, help="the document split; fixed across seeds")
    opt(
        "--split-by",
        choices=("source", "document"),
        help="split whole sources (a jsonl line's `source`, a folder's file, a .txt file's paragraphs), so "
        "parts of one text never land in two splits; or single documents",
    )
    opt("--batch-size", type=int)
    opt("--steps", type=int, help="most optimiser steps; validation early stopping usually ends sooner")
    opt("--eval-every", type=int)
    opt("--patience", type=int)
    if command == "eval":
        opt(
            "--lr",
            type=float,
            nargs="+",
            help="learning rate; with several, every trained method takes, per seed, the rate with its best "
            "validation NLL (the experts: per label)",
        )
    else:
        opt("--lr", type=float)
    opt("--schedule", choices=("constant", "cosine"), help="after the warm-up: constant, or cosine to zero")
    opt("--warmup-steps", type=int, help="linear learning-rate warm-up (unset: steps / 10)")
    opt("--clip-grad-norm", type=float, help="clip the gradient's global norm (0 or less: off)")
    opt("--max-delta-norm", type=float, help="cap every delta at this multiple of its base weight's norm")
    opt(
        "--batching",
        choices=("mixed", "coherent"),
        help="training batches: mixed and clustered, or one label each",
    )
    opt(
        "--statistic",
        help="'embedding' (mean input embedding), 'hidden:L' (mean hidden state after decoder layer L) or "
        "'encoder[:NAME]' (a sentence encoder's embedding of the prompt text)",
    )
    opt(
        "--network",
        choices=("full", "mixture"),
        help="generator: the paper's 'full', or a 'mixture' of bases",
    )
    opt("--bases", type=int, help="mixture: number of LoRA bases")
    opt("--shared-bases", type=int, help="mixture: bases always on (a static LoRA inside the mixture)")
    opt("--routing-sharpness", type=float, help="mixture: initial logit lead of the nearest prototype")
    opt(
        "--routing",
        choices=("auto", "distance", "table", "classifier", "predicted-label", "pseudo-label"),
        help="mixture router; 'auto': predicted-label when every training document is labelled, "
        "else distance",
    )
    opt("--train-k", help="clusters per training batch: 'auto', 'request' or a number")
    opt("--max-k", type=int, help="auto-k bound of the training batches")
    if command == "train":
        opt("--kind", choices=("hyper", "static"))
        opt("--seed", type=int)
        opt(
            "--baseline",
            choices=("static", "none"),
            help="also train the static LoRA of the same size on the same data and report base / static / "
            "Chameleon validation NLL (the manifest records them); 'none' skips it",
        )
        opt("--min-gain", type=float, help="NLL per token Chameleon must gain over the static LoRA")
        opt(
            "--fallback-to-static",
            action="store_true",
            help="when Chameleon does not gain --min-gain over the static LoRA, export that LoRA instead",
        )
        opt(
            "--unsure-fallback",
            action=argparse.BooleanOptionalAction,
            help="a label router's unsure requests get the static LoRA (threshold chosen on validation; "
            "installed only when it lowers validation NLL, adding that LoRA's rank to the artifact's)",
        )
    else:
        opt("--seeds", type=int, nargs="+")
        p.add_argument("--no-experts", action="store_true", help="skip the per-domain expert LoRAs")
        opt("--expert-batch-size", type=int, help="batch of each per-label expert")
        opt("--expert-steps", type=int, help="steps of each per-label expert (unset: --steps)")
        opt(
            "--oracle-statistic",
            action="store_true",
            help="diagnostic: route on each prompt's domain label (one-hot) instead of its statistic; "
            "labelled data only, never for an artifact",
        )


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
    serve.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds that calls in flight have to finish on SIGTERM (new calls get UNAVAILABLE meanwhile)",
    )
    serve.add_argument(
        "--max-connection-age",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="close each client connection after about this long (0 = never, the default), calls in "
        "flight getting --grace to finish: clients reconnect and re-resolve a dns:/// name, so sidecar "
        "replicas added later get traffic (e.g. 300 behind a Kubernetes headless Service)",
    )
    serve.add_argument("--expect-sha256", help="refuse to start unless the artifact has this sha256")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    security = serve.add_argument_group("security (default: plain text, loopback only)")
    security.add_argument(
        "--tls-cert", metavar="FILE", help="PEM certificate (chain) of the server: serve TLS"
    )
    security.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA bundle: mutual TLS, clients need a certificate it signed",
    )
    security.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="file holding a bearer token that every call but health must send as 'authorization: Bearer "
        "<token>' (never put the token itself on the command line)",
    )
    security.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="listen beyond loopback in plain text without a token (only where nothing but the model "
        "server can reach the port); refused otherwise",
    )
    security.add_argument(
        "--socket-mode",
        type=_file_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of a unix: socket (default 0600: only this user; 0660 adds its group)",
    )
    serve.add_argument(
        "--pause-file",
        metavar="PATH",
        help="while this file exists, Adapt answers FAILED_PRECONDITION 'paused:' and the plugins serve "
        "the base model (also SIGUSR1 pauses, SIGUSR2 resumes)",
    )
    serve.add_argument(
        "--audit-log",
        metavar="FILE",
        help="append one JSON line per Adapt call (request ids, clusters, adapter keys and norms, status)",
    )
    serve.set_defaults(func=_serve)

    export = sub.add_parser("export", help="write an artifact from a freshly initialised hyper-network")
    export.add_argument(
        "--model", required=True, help="local HF directory, config.json, .gguf file, preset or hub id"
    )
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
        _add_recipe_options(sub.add_parser(name, help=help_text), name)
    eval_p = sub.choices["eval"]
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
        help="get the Debian texts of the 'mixed' and 'traffic' corpora once (apt-get download + dpkg -x, "
        "no root)",
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
    from adapter_service.extras import MissingExtra

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] not in _BUILTIN_COMMANDS:
            plugin = _plugin_commands().get(argv[0])
            if plugin is not None:
                return plugin.load()(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MissingExtra as exc:  # a role this install does not carry: one line, not a traceback
        print(f"chameleon {argv[0] if argv else ''}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
