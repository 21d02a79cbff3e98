"""The sidecar benchmarks run end to end (quick mode), so they cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_compact_wire_per_request_fits_where_whole_adapters_do_not(tmp_path: Path) -> None:
    assert _load("compact_wire").main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compact_wire.json").read_text())
    by = {(r["k"], r["form"]): r for r in report["records"]}
    # one adapter per request: 32 whole rank-48 adapters exceed the 64 MiB limit and are refused
    assert by[32, "whole"]["refused"].startswith("RESOURCE_EXHAUSTED")
    # the compact form answers it with the bases once, then a few floats per cluster
    assert by[32, "compact, first call"]["serialized_bytes"] < 1.1 * by[1, "whole"]["serialized_bytes"]
    assert by[32, "compact"]["serialized_bytes"] < 0.01 * by[1, "whole"]["serialized_bytes"]
    assert by[32, "compact"]["calls"] == 2 and by[1, "whole"]["calls"] == 2
    assert report["compact_rebuilds_whole_max_rel_error"] < 1e-2  # float16 rounding only
    assert (tmp_path / "compact_wire.png").stat().st_size > 0


def test_adapt_latency_quick_run(tmp_path: Path) -> None:
    assert _load("adapt_latency").main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "adapt_latency.json").read_text())
    assert {r["path"] for r in report["records"]} == {"fresh", "cached"}
    assert len(report["records"]) == 12 and all(r["calls"] == 10 for r in report["records"])


def test_sidecar_capacity_quick_run(tmp_path: Path) -> None:
    assert _load("sidecar_capacity").main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sidecar_capacity.json").read_text())
    records = report["records"]
    assert len(records) == 8 and all(r["calls"] > 0 and r["errors"] == 0 for r in records)
    assert len(report["capacity_per_core"]) == 4
    # weights only cost the sidecar less than whole adapters, for either artifact
    for artifact in {r["artifact"] for r in records}:
        per = {r["form"]: r["sidecar_cpu_ms_per_call"] for r in records if r["artifact"] == artifact}
        assert per["compact"] < per["whole"], artifact
    assert (tmp_path / "sidecar_capacity.png").stat().st_size > 0
