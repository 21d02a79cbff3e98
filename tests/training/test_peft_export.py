"""A generated adapter written as a PEFT directory loads in PEFT and matches the plugin."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.client import AdapterClient
from adapter_service.core.artifact import load_artifact
from adapter_service.core.clustering import FixedK, l2_normalize
from adapter_service.models.statistics import mean_input_embedding
from adapter_service.training.export import make_fresh_artifact
from adapter_service.training.peft_export import write_peft_adapter
from chameleon_torch import PluginConfig, attach
from conftest import start_server, tiny_gpt2


def _model(llama_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_equals_the_plugin_for_that_cluster(
    arch: str, llama_dir: Path, artifact_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    if arch == "llama":
        model, artifact_path, conv1d = _model(llama_dir), artifact_dir, frozenset()
    else:
        model = tiny_gpt2()
        artifact_path = tmp_path / "gpt2-artifact"
        make_fresh_artifact(model, ["c_attn"], 4, artifact_path, init="random", hidden=16)
        conv1d = frozenset(n for n, _, _ in load_artifact(artifact_path).manifest.targets)
    ids = torch.tensor([[5, 9, 11, 30, 2], [7, 8, 40, 41, 3], [50, 51, 52, 53, 54]])
    stats = mean_input_embedding(model.get_input_embeddings().weight, ids)
    centroid = l2_normalize(stats.numpy()).mean(axis=0)  # the one cluster of this batch (k = 1)

    out = write_peft_adapter(load_artifact(artifact_path), centroid, tmp_path / "peft", conv1d_modules=conv1d)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")

    base = copy.deepcopy(model)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    server = start_server(artifact_path)
    try:
        handle = attach(
            model,
            AdapterClient(server.address, timeout=10),
            PluginConfig(policy=FixedK(1), wire_dtype="float32", deadline_s=10),
        )
        with torch.no_grad(), handle.adapt(ids) as batch:
            served = model(input_ids=ids).logits
        handle.detach()
    finally:
        server.stop()
    assert batch.adapted and batch.k == 1
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=ids).logits
    assert float((via_peft - served).abs().max() / served.abs().max()) <= 1e-5
    assert float((via_peft - base_logits).abs().max() / base_logits.abs().max()) > 1e-3  # not vacuous


def test_bad_centroid_is_refused(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = load_artifact(artifact_dir)
    with pytest.raises(ValueError, match=r"centroid: expected shape \[64\]"):
        write_peft_adapter(artifact, np.zeros(3, np.float32), tmp_path / "x")
    with pytest.raises(ValueError, match="finite"):
        write_peft_adapter(artifact, np.full(64, np.nan, np.float32), tmp_path / "x")
