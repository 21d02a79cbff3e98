"""`chameleon demo`, the README's first command, end to end: the real SmolLM2 from the registry package,
the shipped trained artifact, the sidecar and the model server as child processes, InferenceClient."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHAMELEON = Path(sys.executable).with_name("chameleon")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.timeout(900)
def test_demo_groups_a_mixed_batch_and_reports_quality_and_cost(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(CHAMELEON),
            "demo",
            "--workdir",
            str(tmp_path),
            "--prompts",
            "8",
            "--quality-docs",
            "32",
            "--new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=840,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    # the shipped artifact fits the model the registry package gives: the batch was adapted
    assert "not adapted" not in out
    # the shipped artifact routes on the predicted label, so the sidecar groups the batch by label
    assert re.search(r"batch \d+: \d+ prompts in k = \d clusters \(the sidecar groups this artifact by", out)
    assert "chameleon:" in out and "base:" in out
    assert re.search(r"test NLL per token: base \d\.\d+ .* Chameleon \d\.\d+", out)
    assert "stopped: model server exit 0, sidecar exit 0" in out
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 2 and not any(_alive(p) for p in pids)  # nothing left running
