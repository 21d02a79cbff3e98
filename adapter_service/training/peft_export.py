"""Write one cluster's generated adapter as a standard PEFT LoRA directory, for other serving stacks.

    adapter_config.json + adapter_model.safetensors, loadable with `PeftModel.from_pretrained`
    (and by stacks that read PEFT adapters: vLLM, TGI at launch, LoRAX).

The adapter is what the artifact's hyper-network emits for a given centroid (e.g. the mean statistic
of a group of representative prompts), computed with the same onnxruntime session the service uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from adapter_service.core.artifact import Artifact
from adapter_service.serving.runtime import HyperNetworkRuntime

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_peft_adapter(
    artifact: Artifact,
    centroid: np.ndarray,
    out: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    conv1d_modules: frozenset[str] = frozenset(),
) -> Path:
    """Write the adapter generated for `centroid` [D]; returns the directory.

    `conv1d_modules` names targets stored as GPT-2 Conv1D (PEFT then needs fan_in_fan_out=True; the
    factors themselves keep PEFT's [r, d_in] / [d_out, r] layout either way).
    """
    from safetensors.numpy import save_file

    manifest = artifact.manifest
    centroid = np.asarray(centroid, dtype=np.float32)
    if centroid.shape != (manifest.statistic.dim,):
        raise ValueError(f"centroid: expected shape [{manifest.statistic.dim}], got {list(centroid.shape)}")
    if not np.isfinite(centroid).all():
        raise ValueError("centroid: expected finite values")
    outputs = HyperNetworkRuntime(artifact).generate(centroid[None])
    tensors: dict[str, np.ndarray] = {}
    for group in manifest.groups:
        out_g = outputs[group.name]
        for layer, module in enumerate(group.modules):
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(out_g.a[0, layer])
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(out_g.b[0, layer])
    if not all(np.isfinite(t).all() for t in tensors.values()):
        raise ValueError("the hyper-network emitted non-finite values for this centroid; adapter not written")
    names = [name for name, _, _ in manifest.targets]
    fan_in_fan_out = bool(conv1d_modules)
    if fan_in_fan_out and set(names) - set(conv1d_modules):
        raise ValueError(
            "targets mix nn.Linear and Conv1D modules; PEFT's fan_in_fan_out is one flag per adapter"
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": manifest.rank,
        "lora_alpha": manifest.scaling * manifest.rank,  # PEFT's scaling is lora_alpha / r
        "lora_dropout": 0.0,
        "target_modules": names,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
    }
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    provenance = {  # in the safetensors header, where PEFT does not look
        "format": "pt",
        "chameleon_artifact_id": manifest.artifact_id,
        "chameleon_artifact_sha256": artifact.sha256,
        "chameleon_centroid": json.dumps([round(float(v), 8) for v in centroid]),
    }
    save_file(tensors, str(root / ADAPTER_WEIGHTS), metadata=provenance)
    (root / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return root
