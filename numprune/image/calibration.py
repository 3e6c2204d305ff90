"""Calibration data for an image generator: sequences the dense model samples itself, per class.

The paper calibrates LlamaGen on images it generates for each ImageNet class (as FLAP did): no
image data set is needed, and the statistics describe the sequences the model will actually see.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from numprune.errors import NumpruneError
from numprune.image.sampling import generate

# Guidance of the calibration samples, and by default of the images the measures sample: the API's and the
# command line's default alike.
CALIB_CFG_SCALE = 2.0


def self_generated_tokens(model, samples_per_class: int, *, cfg_scale: float = CALIB_CFG_SCALE, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 1.0, seed: int = 0, classes: Sequence[int] | None = None,
                          batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``[N, 1 + image_tokens]`` calibration sequences: the class label, then the tokens sampled for it.

    ``classes`` defaults to all of the model's classes; rows go class by class, ``samples_per_class``
    each. The result is ready for ``numprune.prune(model, tokens, ratio=...)``.
    """
    if samples_per_class < 1:
        raise NumpruneError(f"samples per class must be a positive integer, got {samples_per_class}")
    classes = list(range(model.config.num_classes)) if classes is None else [int(c) for c in classes]
    if not classes:
        raise NumpruneError("no classes to calibrate on")
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(samples_per_class)
    tokens = generate(model, labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, batch_size=batch_size, progress=progress)
    return torch.cat([labels[:, None], tokens], dim=1)


def self_generated_calibration(model, samples_per_class: int, *, cfg_scale: float = CALIB_CFG_SCALE, seed: int = 0,
                               batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """``self_generated_tokens`` over all classes with plain sampling (temperature 1, no top-k/top-p),
    and the description that goes into the pruning report."""
    start = time.perf_counter()
    tokens = self_generated_tokens(model, samples_per_class, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                                   progress=progress)
    info = {"sampling_s": round(time.perf_counter() - start, 3), "source": "self-generated",
            "classes": model.config.num_classes, "samples_per_class": samples_per_class,
            "cfg_scale": cfg_scale, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed,
            "samples": tokens.shape[0], "seqlen": tokens.shape[1]}
    return tokens, info
