"""Checkpoints of a training run, so an interrupted run (a preempted GPU node, a torchrun restart)
resumes where it stopped and ends exactly where an uninterrupted run would.

One file, `checkpoint.pt`, rewritten at every validation by rank 0: the step, the network and optimiser
states, the best validation state so far, the early-stopping count and the history. The batches need no
state: they come from a seeded stream that the resumed run replays up to the step. The file also holds
the run's identity (settings, data, network shapes); a checkpoint of another run is refused, never
silently continued.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

NAME = "checkpoint.pt"
FORMAT = 1


@dataclass
class TrainState:
    """Everything a resumed run needs beyond its settings and data."""

    step: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    best_validation_nll: float
    best_step: int
    best_network: dict[str, torch.Tensor]
    stale: int
    history: list[dict]
    done: bool = False  # stopped (early or at max_steps): a resumed run returns at once


def identity(config: Any, network: torch.nn.Module, examples: Sequence[Sequence[Any]]) -> str:
    """A digest of what a run's result depends on: its TrainConfig, the network's parameter shapes and
    the training and validation examples (token ids and labels). The world size is left out: any
    number of processes computes the same run."""
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(config), default=repr, sort_keys=True).encode())
    digest.update(json.dumps({k: list(v.shape) for k, v in network.state_dict().items()}).encode())
    for split in examples:
        digest.update(json.dumps([(e.prompt, e.continuation, e.label) for e in split]).encode())
    return digest.hexdigest()


def save(directory: Path, state: TrainState, run: str) -> Path:
    """Write atomically (a killed writer leaves the previous checkpoint whole)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NAME
    partial = path.with_suffix(".partial")
    torch.save({"format": FORMAT, "identity": run, "state": asdict(state)}, partial)
    os.replace(partial, path)
    return path


def load(directory: Path, run: str) -> TrainState | None:
    """The saved state of this run, None when there is none; ValueError for another run's."""
    path = directory / NAME
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} has format {saved.get('format')!r}, expected {FORMAT}")
    if saved["identity"] != run:
        raise ValueError(
            f"checkpoint: {path} belongs to another run (other settings, data or network); "
            "use another --checkpoint-dir, or delete it to start over"
        )
    return TrainState(**saved["state"])
