"""Several training processes under `torchrun`: which process this is, its device, and the few
collectives training needs.

`torchrun --nproc-per-node N -m adapter_service.cli train ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them there is one process and nothing here talks to anyone. The process group is gloo on CPU
and NCCL on GPU (one GPU per process, by LOCAL_RANK).

How a global batch is shared: every rank draws the same batch (same seed), computes every prompt's
statistic, clusters the whole batch and runs the hyper-network on its centroids, exactly as one process
would; only the language model's forward and backward, the costly part, is split, each rank taking a
contiguous slice of the rows. DistributedDataParallel averages the ranks' gradients, so a loss scaled by
the world size gives the gradient of the whole batch's mean NLL: the same update as one process, up to
the order of floating-point sums.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# A rank waits at a collective while another trains a study's run or exports the artifact: minutes to
# hours, not the 30 minutes of the default timeout.
TIMEOUT = datetime.timedelta(hours=12)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = CPU

    @property
    def main(self) -> bool:
        """Rank 0 writes the artifact, reports and checkpoints, and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, count: int) -> slice:
        """This rank's contiguous share of `count` rows; every rank gets as many."""
        if count % self.world_size:
            raise ValueError(
                f"batch_size: {count} rows do not split evenly over {self.world_size} processes; "
                f"use a multiple of {self.world_size}"
            )
        size = count // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def owns(self, index: int) -> bool:
        """Whether the `index`-th of a sequence of independent jobs (validation batches, study runs) is
        this rank's: they are dealt out in turn."""
        return index % self.world_size == self.rank

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks (float64; as is with one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._wire())
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def wrap(self, network: torch.nn.Module) -> torch.nn.Module:
        """`network` under DistributedDataParallel (gradients averaged over the ranks), or as is.
        Every generator uses each trainable parameter at every step (a table router's prototypes are
        frozen, so DDP ignores them), so no search for unused ones."""
        if not self.distributed:
            return network
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=ids)

    def _wire(self) -> torch.device:
        """NCCL moves only CUDA tensors; gloo only CPU ones."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto": a GPU when torch sees one, else the CPU; "cuda" refuses a host without one."""
    if name not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {name!r}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ValueError("device: 'cuda' asked for, but torch sees no GPU on this host; use cpu or auto")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def start(device: str = "auto", env: dict[str, str] | None = None) -> Processes:
    """Join the process group when started by torchrun (RANK and WORLD_SIZE set), else one process.

    Idempotent: a second call (train, then eval in one interpreter) reuses the group."""
    env = dict(os.environ if env is None else env)
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    where = resolve_device(device, int(env.get("LOCAL_RANK", "0")))
    if world <= 1:
        return Processes(0, 1, where)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not torch.distributed.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=TIMEOUT)
        log.info("process %d of %d on %s (%s)", rank, world, where, backend)
    return Processes(rank, world, where)


def stop() -> None:
    """Leave the process group (at the end of a command under torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def unwrap(network: Any) -> Any:
    """The module under DistributedDataParallel (its config, state and statistics flag), or `network`."""
    from torch.nn.parallel import DistributedDataParallel

    return network.module if isinstance(network, DistributedDataParallel) else network
