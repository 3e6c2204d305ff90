"""Calibration split across processes with torch.distributed (``torchrun --nproc-per-node N``).

Each process streams its own contiguous share of the calibration samples through the layers; a
layer's statistics (Gram matrix, input sum, token count) are summed over processes with
``all_reduce`` before anything reads them, so every process scores and allocates from the same
numbers as a single process would (to float rounding). Process 0 alone writes and prints.
Outside a process group everything here is a no-op: a world of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from numprune.calibrate import LayerStats
from numprune.errors import NumpruneError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the output and prints (process 0)."""
        return self.rank == 0


def world() -> World:
    """This process's place in the current process group (a world of one if there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_size() -> int:
    """The number of processes torchrun started (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str | None) -> Iterator[str | None]:
    """Join torchrun's process group (gloo on the CPU, nccl on CUDA) and yield this process's device.

    With ``--device cuda`` each process takes the GPU of its local rank; None (the model's own, the
    CPU where the command line loads it) stays None. Without torchrun this yields ``device``
    unchanged and starts nothing.
    """
    if launched_size() <= 1 or dist.is_initialized():
        yield device
        return
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def shard(tokens: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of the calibration samples (all of them in a world of one)."""
    w = world()
    if w.size == 1:
        return tokens
    if len(tokens) < w.size:
        raise NumpruneError(f"{len(tokens)} calibration samples cannot be split over {w.size} processes")
    return tokens.tensor_split(w.size)[w.rank]


def all_reduce_stats(stats: LayerStats) -> None:
    """Sum one layer's statistics over all processes, in place (call on every process)."""
    for part in (stats.attention, stats.mlp):
        count = torch.tensor([part.count], dtype=torch.float64, device=part.gram.device)
        for tensor in (part.gram, part.total, count):
            dist.all_reduce(tensor)
        part.count = int(count.item())


def reducer():
    """``all_reduce_stats`` inside a process group of several, else None (nothing to sum)."""
    return all_reduce_stats if world().size > 1 else None


def agree(what: str, value) -> None:
    """Fail on every process, with one clear line, unless all processes hold the same ``value``.

    ``value`` is anything JSON can write or a tensor; its SHA-256 fingerprints are gathered and compared.
    """
    w = world()
    if w.size == 1:
        return
    digest = hashlib.sha256()
    if torch.is_tensor(value):
        digest.update(str((tuple(value.shape), value.dtype)).encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    every = [None] * w.size
    dist.all_gather_object(every, digest.hexdigest())
    differing = [r for r, other in enumerate(every) if other != every[0]]
    if differing:
        raise NumpruneError(f"the {w.size} processes disagree on {what} (process {differing[0]} differs from "
                            "process 0); every process must be given the same model, data and options")
