"""`chameleon train` and `chameleon eval` end to end on a tiny model, a tiny tokenizer and a jsonl file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_service.core.artifact import load_artifact
from samples import SENTENCES, labelled_study, tiny_model, tiny_tokenizer

CHAMELEON = Path(sys.executable).with_name("chameleon")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return labelled_study(tmp_path_factory.mktemp("cli-study"))


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(CHAMELEON), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


COMMON = [
    "--targets",
    "v_proj",
    "--rank",
    "2",
    "--hidden",
    "8",
    "--prompt-tokens",
    "6",
    "--continuation-tokens",
    "8",
    "--batch-size",
    "6",
    "--steps",
    "4",
    "--eval-every",
    "2",
]


def test_train_writes_a_trained_artifact(inputs, tmp_path: Path) -> None:
    model_dir, data = inputs
    out = tmp_path / "artifact"
    result = run("train", "--model", str(model_dir), "--data", str(data), *COMMON, "--out", str(out))
    assert "best validation NLL" in result.stdout
    manifest = load_artifact(out).manifest
    assert manifest.hypernetwork["trained"] is True and manifest.hypernetwork["kind"] == "hyper"
    assert manifest.hypernetwork["history"] and manifest.base_model.weights_sha256
    # Never worse unnoticed: the static LoRA of the same size is trained too and compared on validation.
    compared = manifest.hypernetwork["validation_nll"]
    assert compared["chameleon"] == manifest.hypernetwork["best_validation_nll"]
    assert compared["base"] > 0 and compared["static"] > 0 and compared["min_gain"] == 0.0
    assert compared["chameleon_beats_static"] == (compared["chameleon"] < compared["static"])
    assert "validation NLL per token: base" in result.stdout
    # Split by source by default; these jsonl lines name none, so every document is its own source.
    assert manifest.hypernetwork["split_by"] == "source"
    assert manifest.hypernetwork["sources"] == {"train": 42, "validation": 9, "test": 9}
    # The default recipe is the study's winner: cosine decay, clipping at 1.0, a tenth of the steps warm-up.
    facts = manifest.hypernetwork
    assert (facts["schedule"], facts["clip_grad_norm"], facts["warmup_steps"]) == ("cosine", 1.0, 4 // 10)
    # ... and a mixture of 12 bases (here of --rank 2 each), routed per request.
    assert (facts["network"], facts["bases"], facts["train_k"]) == ("mixture", 12, "request")
    # The data is labelled, so the router learns from the labels and serves on the predicted label.
    assert facts["config"]["routing"] == "predicted-label"
    assert facts["config"]["labels"] == ["topic0", "topic1", "topic2"]
    # ... and the requests it is unsure of get the static LoRA, where that lowers validation NLL: the
    # threshold is chosen there, and the static LoRA's rank joins the artifact's only when installed.
    fallback = facts["unsure_fallback"]
    assert fallback["routed_nll"] == pytest.approx(compared["chameleon"], rel=1e-5)
    assert (fallback["nll"] < fallback["routed_nll"]) == (fallback["share"] > 0)
    assert fallback["installed"] == (fallback["share"] > 0 and fallback["held_out_gain"] > 0)
    assert manifest.rank == (48 if fallback["installed"] else 24)
    assert facts["config"]["fallback_threshold"] == (fallback["threshold"] if fallback["installed"] else 0.0)
    assert "fallback adapter: " in result.stdout


def test_train_warns_and_falls_back_to_the_static_lora_when_chameleon_does_not_gain(
    inputs, tmp_path: Path
) -> None:
    model_dir, data = inputs
    out = tmp_path / "artifact"
    args = ("--model", str(model_dir), "--data", str(data), *COMMON, "--out", str(out))
    # No adapter gains 10 nats per token over a static LoRA: the guard must trip.
    result = run("train", *args, "--min-gain", "10", "--fallback-to-static")
    assert "WARNING: Chameleon" in result.stderr and "exporting the static LoRA instead" in result.stderr
    facts = load_artifact(out).manifest.hypernetwork
    assert (facts["kind"], facts["exported_instead_of"]) == ("static", "hyper")
    assert facts["validation_nll"]["chameleon_beats_static"] is False
    assert facts["best_validation_nll"] == facts["validation_nll"]["static"]
    # Without the flag it only warns, and exports Chameleon.
    result = run("train", *args, "--min-gain", "10", "--baseline", "static", "--no-unsure-fallback")
    assert "WARNING: Chameleon" in result.stderr and "--fallback-to-static exports it" in result.stderr
    manifest = load_artifact(out).manifest
    assert manifest.hypernetwork["kind"] == "hyper"
    assert "unsure_fallback" not in manifest.hypernetwork and manifest.rank == 24  # as asked, none
    # --baseline none trains Chameleon alone (so no fallback adapter either).
    run("train", *args, "--baseline", "none")
    assert not {"validation_nll", "unsure_fallback"} & set(load_artifact(out).manifest.hypernetwork)


def test_train_a_mixture_routed_by_a_label_classifier(inputs, tmp_path: Path) -> None:
    """--routing classifier learns from the data's labels; the artifact names them, in the classifier's
    order, and needs none to serve (its graph takes the statistic alone)."""
    model_dir, data = inputs
    out = tmp_path / "classifier"
    args = ["--network", "mixture", "--bases", "3", "--routing", "classifier"]
    run("train", "--model", str(model_dir), "--data", str(data), *COMMON, *args, "--out", str(out))
    config = load_artifact(out).manifest.hypernetwork["config"]
    assert config["routing"] == "classifier"
    assert config["labels"] == ["topic0", "topic1", "topic2"]


def test_train_a_mixture_routed_per_request(inputs, tmp_path: Path) -> None:
    """--network mixture --bases 2 --rank 2 emits rank 4; the manifest records the recipe (schedule and
    shared bases included) and offers the compact form."""
    model_dir, data = inputs
    out = tmp_path / "mixture"
    args = ["--network", "mixture", "--bases", "2", "--train-k", "request", "--shared-bases", "1"]
    args += ["--schedule", "cosine", "--warmup-steps", "1", "--clip-grad-norm", "1.0"]
    run("train", "--model", str(model_dir), "--data", str(data), *COMMON, *args, "--out", str(out))
    manifest = load_artifact(out).manifest
    facts = manifest.hypernetwork
    assert facts["config"]["kind"] == "mixture" and facts["config"]["bases"] == 2
    assert facts["config"]["shared_bases"] == 1 and facts["shared_bases"] == 1
    assert (facts["schedule"], facts["warmup_steps"], facts["clip_grad_norm"]) == ("cosine", 1, 1.0)
    assert manifest.rank == 4 and facts["train_k"] == "request"
    assert manifest.mixture is not None and manifest.mixture.bases == 2
    command = [str(CHAMELEON), "train", "--model", str(model_dir), "--data", str(data), *COMMON]
    bad = subprocess.run(
        [*command, "--train-k", "x", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "(--train-k): expected 'auto', 'request' or a number" in bad.stderr


def test_eval_writes_the_report(inputs, tmp_path: Path) -> None:
    model_dir, data = inputs
    out = tmp_path / "study"
    run("eval", "--model", str(model_dir), "--data", str(data), *COMMON, "--seeds", "0", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert {"base", "static LoRA (same rank)", "Chameleon, auto k", "per-domain experts"} <= set(
        report["methods"]
    )
    assert report["splits"] == {
        "by": "source",
        "examples": {"train": 42, "validation": 9, "test": 9},
        "sources": {"train": 42, "validation": 9, "test": 9},
    }
    text = (out / "report.md").read_text()
    assert "| method | NLL |" in text and "Command: `chameleon eval" in text
    assert (out / "report.png").stat().st_size > 10_000
    assert report["latency_per_batch"]["prepare_ms"] > 0 and "Cost per batch" in text

    # Several rates: the study above is reused for its rate, only the new rate is trained.
    first = json.loads((out / "study.json").read_text())["config"]["lr"]
    both = tmp_path / "both"
    args = ("--model", str(model_dir), "--data", str(data), *COMMON, "--seeds", "0")
    run("eval", *args, "--lr", str(first), "2e-2", "--reuse", str(out), "--out", str(both))
    report = json.loads((both / "report.json").read_text())
    assert report["lr_selection"]["candidates"] == [first, 2e-2]
    assert (both / "runs" / f"static-lr{first:g}-seed0.json").read_text() == (
        out / "runs" / "static-seed0.json"
    ).read_text()
    assert (both / "runs" / "static-lr0.02-seed0.json").exists()
    assert "Learning rate chosen on validation" in (both / "report.md").read_text()


def test_export_peft_writes_the_adapter_of_the_prompts_cluster(inputs, tmp_path: Path) -> None:
    """The CLI's centroid is the service's one-cluster centroid (mean of L2-normalised statistics)."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapter_service.core.clustering import l2_normalize
    from adapter_service.models.statistics import mean_input_embedding
    from adapter_service.training.peft_export import write_peft_adapter

    model_dir, data = inputs
    artifact = tmp_path / "artifact"
    run("train", "--model", str(model_dir), "--data", str(data), *COMMON, "--out", str(artifact))
    prompts = [SENTENCES[0][:40], SENTENCES[0][10:60]]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "peft"
    run(
        "export-peft",
        "--artifact",
        str(artifact),
        "--model",
        str(model_dir),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--out",
        str(out),
    )

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stats = torch.cat(
        [
            mean_input_embedding(model.get_input_embeddings().weight, torch.tensor([ids]))
            for ids in tokenizer(prompts, add_special_tokens=False).input_ids
        ]
    )
    centroid = l2_normalize(stats.detach().numpy()).mean(axis=0)
    expected = write_peft_adapter(load_artifact(artifact), centroid, tmp_path / "expected")
    got, want = (
        load_file(out / "adapter_model.safetensors"),
        load_file(expected / "adapter_model.safetensors"),
    )
    assert set(got) == set(want) and got
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert any(np.abs(t).max() > 0 for t in got.values())  # trained: B moved away from zero


def test_export_peft_refuses_another_base_model(inputs, tmp_path: Path) -> None:
    model_dir, data = inputs
    artifact = tmp_path / "artifact"
    run("train", "--model", str(model_dir), "--data", str(data), *COMMON, "--out", str(artifact))
    other = tmp_path / "other"
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, seed=7).save_pretrained(other)
    tokenizer.save_pretrained(other)
    (tmp_path / "p.txt").write_text("hello there\n")
    result = subprocess.run(
        [
            str(CHAMELEON),
            "export-peft",
            "--artifact",
            str(artifact),
            "--model",
            str(other),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--out",
            str(tmp_path / "peft"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "is not the artifact's base model" in result.stderr
    assert not (tmp_path / "peft").exists()
