"""The sidecar installs by itself: a fresh venv with only the `[sidecar]` extra serves the demo artifact
to the client, carries no torch (nor transformers, nor onnxscript's export stack), and every part
whose extra is missing says which extra to install, in one line.

Installs from the package registry (pip's cache makes reruns fast); nothing else is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "adapter_service" / "data" / "demo-artifact"
# `onnx` (the format library) is in the sidecar extra: it cuts a mixture graph down at load.
HEAVY = ("torch", "transformers", "onnxscript", "accelerate", "gguf", "safetensors", "tqdm")

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def sidecar_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("sidecar-venv")
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # A copy of the sources, so the build cannot pick up this checkout's build/ or egg-info.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[sidecar]"],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir


def run_in(env_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(env_dir / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        **kwargs,
    )


def test_the_sidecar_extra_installs_no_torch(sidecar_venv: Path) -> None:
    listed = run_in(sidecar_venv, "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    names = {line.split("==")[0].replace("_", "-") for line in listed.splitlines()}
    assert "onnxruntime" in names and "grpcio" in names and "chameleon-adapters" in names
    assert not names & set(HEAVY), f"the sidecar install pulled {sorted(names & set(HEAVY))}"


def test_the_sidecar_serves_the_demo_artifact_to_the_client(sidecar_venv: Path) -> None:
    port_probe = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    port = run_in(sidecar_venv, "python", "-c", port_probe).stdout.strip()
    server = subprocess.Popen(
        [str(sidecar_venv / "bin" / "chameleon"), "serve", "--artifact", str(DEMO),
         "--address", f"127.0.0.1:{port}", "--metrics-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        client = textwrap.dedent(f"""
            import sys, time
            import numpy as np
            from adapter_service.client import AdapterClient
            from adapter_service.core.clustering import AutoK
            with AdapterClient("127.0.0.1:{port}", timeout=5) as client:
                for _ in range(300):
                    try:
                        manifest = client.manifest()
                        break
                    except Exception:
                        time.sleep(0.2)
                dim = manifest.statistic.dim
                stats = np.random.default_rng(0).standard_normal((8, dim)).astype("float32")
                result = client.adapt(stats, policy=AutoK(max_k=4))
                print(manifest.grouping, result.grouping, result.k, len(result.assignments))
            print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """)
        answer = run_in(sidecar_venv, "python", "-c", client)
        if answer.returncode != 0:
            server.terminate()
            pytest.fail(
                f"{answer.stderr[-2000:]}\nsidecar output:\n{server.communicate(timeout=30)[0][-3000:]}"
            )
        summary, heavy = answer.stdout.splitlines()
        grouping, answered, k, rows = summary.split()
        assert (grouping, answered, rows) == ("predicted-label", "predicted-label", "8") and int(k) >= 1
        assert heavy == "[]"
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize(
    ("code", "extra"),
    [
        ("import chameleon_torch", "torch"),
        ("import adapter_service.training", "train"),
        ("import adapter_service.models", "torch"),
        ("import chameleon_model_server", "torch"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(sidecar_venv: Path, code: str, extra: str) -> None:
    result = run_in(sidecar_venv, "python", "-c", code)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last.startswith("adapter_service.extras.MissingExtra:") and f"chameleon-adapters[{extra}]" in last


@pytest.mark.parametrize(("command", "extra"), [("train", "train"), ("serve-model", "torch")])
def test_cli_commands_of_a_missing_role_say_which_extra(sidecar_venv: Path, command: str, extra: str) -> None:
    result = run_in(sidecar_venv, "chameleon", command, "--out", "x", "--model", "m")
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0
        and f"pip install 'chameleon-adapters[{extra}]'" in result.stderr
    )
