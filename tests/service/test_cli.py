"""The `chameleon` command as a user runs it: a real process, real signals, real exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapter_service.client import AdapterClient
from adapter_service.core.artifact import load_artifact
from adapter_service.core.clustering import FixedK
from adapter_service.demo.sidecar import SidecarProcess, free_port

CHAMELEON = Path(sys.executable).with_name("chameleon")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHAMELEON), *args], capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and "chameleon-adapters" in result.stdout


def test_export_command(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    result = run_cli(
        "export", "--model", str(llama_dir), "--targets", "q_proj,o_proj", "--rank", "2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "4 target modules in 2 groups, rank 2" in result.stdout
    assert load_artifact(out).manifest.rank == 2

    bad = run_cli("export", "--model", str(llama_dir), "--targets", "nope_proj", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "targets: ['nope_proj'] matched no" in bad.stderr


@pytest.mark.parametrize("problem", ["missing", "corrupt", "sha-mismatch", "expect-sha256"])
def test_serve_refuses_bad_artifact(problem: str, artifact_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "art"
    extra: list[str] = []
    if problem != "missing":
        shutil.copytree(artifact_dir, target)
    if problem == "corrupt":
        (target / "manifest.json").write_text("{")
        expected = "not valid JSON"
    elif problem == "sha-mismatch":
        with open(target / "hypernetwork.onnx", "ab") as f:
            f.write(b"\0")
        expected = "does not match the manifest's hypernetwork_sha256"
    elif problem == "expect-sha256":
        extra = ["--expect-sha256", "0" * 64]
        expected = f"expected {'0' * 64}"
    else:
        expected = "does not exist"
    result = run_cli(
        "serve",
        "--artifact",
        str(target),
        "--address",
        f"127.0.0.1:{free_port()}",
        "--metrics-port",
        "-1",
        *extra,
        timeout=60,
    )
    assert result.returncode == 2
    assert expected in result.stderr


def test_serve_then_sigterm_drains_and_exits_zero(artifact_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "sidecar.log"
    sidecar = SidecarProcess(
        artifact_dir, metrics_port=free_port(), log_path=log, extra_args=["--grace", "2"]
    )
    try:
        with AdapterClient(sidecar.address, timeout=5) as client:
            stats = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
            assert client.adapt(stats, policy=FixedK(2)).k == 2
    finally:
        code = sidecar.stop()
    assert code == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [e["msg"] for e in events]
    assert "serving" in messages and "shutting down" in messages and "stopped" in messages
    serving = next(e for e in events if e["msg"] == "serving")
    assert serving["address"] == sidecar.address and serving["providers"] == ["CPUExecutionProvider"]


def test_importing_the_client_does_not_import_server_onnxruntime_or_torch() -> None:
    code = (
        "import sys, adapter_service.client, adapter_service.core.codec, adapter_service.client.fallback\n"
        "bad = [m for m in ('onnxruntime', 'torch', 'transformers', 'adapter_service.serving.server',"
        " 'adapter_service.serving.servicer', 'adapter_service.serving.runtime') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_demo_refuses_an_untrained_artifact(artifact_dir, tmp_path, capsys) -> None:
    from adapter_service.cli import main

    assert main(["demo", "--artifact", str(artifact_dir), "--workdir", str(tmp_path)]) == 2
    assert "needs an artifact written by `chameleon train`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "rank",
            "1180591620717411303424",
            "field 'rank': expected a positive integer <= 9223372036854775807",
        ),
        ("base_model.hidden_size", "18446744073709551616", "field 'base_model.hidden_size'"),
        ("scaling", "NaN", "field 'scaling': expected a finite number"),
        ("scaling", "Infinity", "field 'scaling': expected a finite number"),
        ("scaling", "1e39", "field 'scaling': expected a finite number (float32 range)"),
    ],
)
def test_serve_refuses_out_of_range_manifest_values(
    field: str, value: str, expected: str, artifact_dir: Path, tmp_path: Path
) -> None:
    """Values JSON allows but the wire cannot carry (int64, float32) or that poison every adapter
    (NaN, inf) stop start-up with one line, not a traceback at the first GetManifest."""
    from adapter_service.core.artifact import ArtifactError

    target = tmp_path / "art"
    shutil.copytree(artifact_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    parent, key = (
        (manifest, field) if "." not in field else (manifest[field.split(".")[0]], field.split(".")[1])
    )
    parent[key] = "@@"
    (target / "manifest.json").write_text(json.dumps(manifest).replace('"@@"', value))
    with pytest.raises(ArtifactError, match=re.escape(expected)):
        load_artifact(target)
    result = run_cli("serve", "--artifact", str(target), "--address", f"127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_serve_flag_errors_are_one_line(artifact_dir: Path, tmp_path: Path) -> None:
    base = ["serve", "--artifact", str(artifact_dir), "--metrics-port", "-1"]
    only_cert = run_cli(*base, "--tls-cert", str(tmp_path / "c.pem"), timeout=60)
    assert only_cert.returncode == 2 and "--tls-cert and --tls-key go together" in only_cert.stderr
    missing_token = run_cli(*base, "--auth-token-file", str(tmp_path / "nope"), timeout=60)
    assert missing_token.returncode == 2 and "--auth-token-file: cannot read it" in missing_token.stderr
    bad_mode = run_cli(*base, "--socket-mode", "rw", timeout=60)
    assert bad_mode.returncode == 2 and "expected an octal mode" in bad_mode.stderr
    for result in (only_cert, missing_token, bad_mode):
        assert "Traceback" not in result.stderr
