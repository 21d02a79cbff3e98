"""The reliability drill's short version (benchmarks/drill.py --quick) against real processes: the
invariants the full run reports must hold here too. About a minute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("drill")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "drill.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "drill_quick.png").is_file()
    return json.loads((out / "drill_quick.json").read_text())


def test_load_has_no_errors(report: dict) -> None:
    for form in report["load"]:
        assert form["calls"] > 0 and form["errors"] == {}, form


def test_fuzz_never_answers_internal_or_unknown(report: dict) -> None:
    fuzz = report["fuzz"]
    assert fuzz["internal_or_unknown"] == 0 and fuzz["serving_after"] == "SERVING", fuzz
    assert fuzz["codes"].get("OK", 0) > 0 and fuzz["codes"].get("INVALID_ARGUMENT", 0) > 0  # both kinds sent


def test_a_sidecar_crash_fails_no_generation_and_adaptation_resumes_within_5_s(report: dict) -> None:
    faults = report["faults"]
    assert faults["failed_generations"] == 0 and faults["fallback_batches_by_end_of_outage"] > 0, faults
    assert faults["seconds_to_adapt_after_sidecar_serving"] is not None
    assert faults["seconds_to_adapt_after_sidecar_serving"] <= 5.0
    assert faults["model_server_exit_code"] == 0


def test_drains_cancel_nothing_and_exit_cleanly(report: dict) -> None:
    sidecar, server = report["drain"]["sidecar"], report["drain"]["model_server"]
    # Calls that reached the sidecar before SIGTERM finish; later ones are refused, retryably.
    assert sidecar["cancelled"] == 0 and set(sidecar["codes"]) <= {"OK", "UNAVAILABLE"}, sidecar
    assert sidecar["codes"].get("OK", 0) > 0
    assert sidecar["exit_code"] == 0
    assert server["exit_code"] == 0 and server["client"]["status"] in (200, 503), server


def test_hijack_attempts_are_refused(report: dict) -> None:
    for kind in ("tcp", "unix"):
        attempt = report["hijack"][kind]
        assert attempt["second_exit_code"] == 2 and attempt["first_still_serving"] == "SERVING", attempt
    assert report["hijack"]["unix"]["socket_mode"] == "0o600"


def test_a_burst_of_connections_gets_answers_not_resets(report: dict) -> None:
    burst = report["connections"]
    assert burst["resets_or_refused"] == 0 and burst["server_errors"] == 0, burst
    assert set(burst["statuses"]) <= {"200", "429"}
