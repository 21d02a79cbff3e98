"""The rollback switch under serving, with real processes: a sidecar started with --pause-file, a model
attached with chameleon_torch sending batches. Creating the file sends every batch to the base model
(reason "paused", outputs equal to the detached model's); removing it brings adapters back. Nothing is
restarted or re-attached."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from adapter_service.client import AdapterClient
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.training.export import make_fresh_artifact
from chameleon_torch import PluginConfig, attach
from conftest import tiny_llama


def run_batch(handle, ids: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    mask = torch.ones_like(ids)
    with torch.no_grad(), handle.adapt(ids, mask) as result:
        logits = handle.model(input_ids=ids, attention_mask=mask).logits
    return result.fallback_reason, logits


def until(handle, ids: torch.Tensor, want: str | None, limit_s: float = 5.0) -> tuple[float, torch.Tensor]:
    """Batches every 0.1 s until one's fallback reason is `want`; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() < started + limit_s:
        reason, logits = run_batch(handle, ids)
        if reason == want:
            return time.monotonic() - started, logits
        time.sleep(0.1)
    raise AssertionError(f"no batch with fallback reason {want!r} within {limit_s} s")


def test_pause_file_rolls_batches_back_to_base_and_resumes(tmp_path: Path) -> None:
    model_dir, artifact = tmp_path / "model", tmp_path / "artifact"
    tiny_llama().save_pretrained(model_dir)
    make_fresh_artifact(model_dir, ["q_proj", "v_proj"], 4, artifact, init="random", seed=1)
    pause = tmp_path / "paused"
    model = tiny_llama()
    ids = torch.tensor([[5, 17, 40, 9, 3, 22], [100, 130, 101, 180, 7, 8]])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    with SidecarProcess(artifact, extra_args=["--pause-file", str(pause)]) as sidecar:
        handle = attach(model, AdapterClient(sidecar.address, timeout=5), PluginConfig(deadline_s=5))
        try:
            reason, adapted = run_batch(handle, ids)
            assert reason is None and not torch.allclose(adapted, base)
            pause.touch()
            took, paused = until(handle, ids, "paused")
            assert took < 2.0  # the sidecar looks at the file every 0.5 s
            torch.testing.assert_close(paused, base, rtol=0, atol=0)  # exactly the base model
            assert handle.metrics.fallback_count("paused") >= 1
            pause.unlink()
            took, resumed = until(handle, ids, None)
            assert took < 2.0
            torch.testing.assert_close(resumed, adapted)
        finally:
            handle.detach()
