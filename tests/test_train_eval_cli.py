"""`chameleon train` and `chameleon eval` end to end on a tiny model, a tiny tokenizer and a jsonl file."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_http_server import SENTENCES, tiny_model, tiny_tokenizer

from adapter_service.artifact import load_artifact

CHAMELEON = Path(sys.executable).with_name("chameleon")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-study")
    tokenizer = tiny_tokenizer()
    model_dir = root / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for i in range(60):
            label = i % 3
            words = " ".join(rng.choice(SENTENCES[label].split()) for _ in range(60))
            f.write(json.dumps({"text": words, "label": f"topic{label}"}) + "\n")
    return model_dir, root / "data.jsonl"


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


def test_eval_writes_the_report(inputs, tmp_path: Path) -> None:
    model_dir, data = inputs
    out = tmp_path / "study"
    run("eval", "--model", str(model_dir), "--data", str(data), *COMMON, "--seeds", "0", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert {"base", "static LoRA (same rank)", "Chameleon, auto k", "per-domain experts"} <= set(
        report["methods"]
    )
    text = (out / "report.md").read_text()
    assert "| method | NLL |" in text and "Command: `chameleon eval" in text
    assert (out / "report.png").stat().st_size > 10_000
