"""The device contract of a pruning run, and full float32 precision for its statistics and solves.

- The model may live on any device (CPU, a GPU, spread over several); ``check_device`` is the one
  rule for where the layer passes run, and ``model_device`` the default: the model's own device.
- The statistics accumulate in float64 and come back to the CPU; every criterion, allocation and
  compensation solve then runs in float64 where the statistics are (the weights it reads are
  copied there), and a fit is written back on each weight's own device and in its own dtype.
- TF32 is off for the statistics (the layer passes that collect them included) and the solves
  (``full_precision``), whatever the caller set; the caller's setting comes back after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch
from torch import nn

from numprune.errors import NumpruneError


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a torch.device: None (the model's own), cpu, or cuda / cuda:N of a GPU torch sees."""
    if device is None:
        return None
    kind, _, index = str(device).partition(":") if isinstance(device, (str, torch.device)) else ("", "", "")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise NumpruneError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NumpruneError(f"device {device}: torch sees no CUDA device")
        if index and int(index) >= count:
            raise NumpruneError(f"device {device}: torch sees {count} CUDA device{'s' if count > 1 else ''}")
    return torch.device(str(device))


def model_device(model: nn.Module) -> torch.device:
    """A model's own device: where its input embeddings are, so where the first layer's inputs are computed
    (the CPU for a model streamed from disk, whose tensors are read into CPU memory)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the memory the system can still give on the CPU."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


@contextmanager
def full_precision() -> Iterator[None]:
    """float32 products in full precision (no TF32) while the block runs; the caller's settings come back after.

    TF32 keeps 10 bits of mantissa: Gram matrices over thousands of tokens and the solves on them
    would lose three decimal digits, and the result would depend on the GPU's defaults.
    """
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
