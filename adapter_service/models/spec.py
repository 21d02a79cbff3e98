"""What a hyper-network is made for: the base model's fingerprint and its target modules.

Works on any transformers causal LM, including one built on the meta device from a config alone,
so artifacts can be made for a model whose weights are not on this machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adapter_service.core.artifact import Fingerprint


@dataclass(frozen=True)
class TargetModule:
    name: str
    d_in: int
    d_out: int


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (GPT-2's, weight stored [d_in, d_out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


def find_targets(model: nn.Module, patterns: Sequence[str]) -> list[TargetModule]:
    """Modules matching any pattern: a name's last part ("q_proj") or a glob on the full name.

    Raises ValueError naming the patterns that matched nothing, so a typo is never silent.
    """
    if not patterns:
        raise ValueError("targets: expected at least one module name pattern, e.g. q_proj,v_proj")
    found: list[TargetModule] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None:
            continue
        hits = [p for p in patterns if name.rsplit(".", 1)[-1] == p or fnmatch.fnmatchcase(name, p)]
        if hits:
            used.update(hits)
            found.append(TargetModule(name, *shape))
    missing = [p for p in patterns if p not in used]
    if missing:
        raise ValueError(
            f"targets: {missing} matched no nn.Linear or Conv1D module; expected a module name such as "
            f"{_examples(model)}"
        )
    return found


def group_targets(targets: Iterable[TargetModule]) -> dict[str, list[TargetModule]]:
    """Group by module type and shape (one hyper-network head per group), in model order."""
    by_key: dict[tuple[str, int, int], list[TargetModule]] = {}
    for t in targets:
        by_key.setdefault((t.name.rsplit(".", 1)[-1], t.d_in, t.d_out), []).append(t)
    names = [key[0] for key in by_key]
    groups = {}
    for (short, d_in, d_out), members in by_key.items():
        name = short if names.count(short) == 1 else f"{short}_{d_in}x{d_out}"
        groups[name] = members
    return groups


def fingerprint(model: nn.Module, hash_weights: bool = True) -> Fingerprint:
    """Identify the base model; hashes the input embeddings when real weights are present (and asked)."""
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    embedding = model.get_input_embeddings().weight
    weights_sha256 = "" if embedding.is_meta or not hash_weights else embedding_sha256(embedding)
    return Fingerprint(
        architecture=architectures[0],
        hidden_size=int(_first_attr(config, "hidden_size", "n_embd", "d_model")),
        vocab_size=int(config.vocab_size),
        num_layers=int(_first_attr(config, "num_hidden_layers", "n_layer", "num_layers")),
        weights_sha256=weights_sha256,
    )


def embedding_sha256(weight: torch.Tensor) -> str:
    """sha256 of the embedding table as contiguous little-endian float32."""
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


def _first_attr(config: object, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"model config has none of {names}")


def _examples(model: nn.Module) -> list[str]:
    shorts = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if linear_shape(module) is not None and short not in shorts:
            shorts.append(short)
    return shorts[:12]
