"""Sampling image tokens from a class-conditional generator, with classifier-free guidance and a KV cache.

Each step runs the conditional and the null-class sequences as one batch and combines their
next-token logits as ``uncond + cfg_scale * (cond - uncond)`` (LlamaGen's rule; a scale of 1.0 is
plain conditional sampling and skips the null-class half). Temperature, top-k and top-p shape the
distribution and the seeded inverse-CDF draw picks each token (``numprune.sampling``, shared with
text generation): sample ``i`` sees the same random numbers whatever the batch size or device, and
the same seed gives the same tokens.

Pixels are the tokenizer's job: ``numprune.image.digits.tokens_to_images`` for the digits model,
and ``llamagen_vq_decoder`` wraps LlamaGen's VQ tokenizer for those who have it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from numprune.errors import NumpruneError
from numprune.sampling import check_warping, pick_tokens, uniform_draws


def check_sampling_options(cfg_scale: float, temperature: float, top_k: int, top_p: float) -> None:
    """Fail early on options that do not describe a distribution."""
    if not cfg_scale >= 0:  # NaN too
        raise NumpruneError(f"cfg scale must be >= 0, got {cfg_scale}")
    check_warping(temperature, top_k, top_p)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + cfg_scale * (cond - uncond)``; ``cond`` itself at scale 1."""
    return cond if uncond is None or cfg_scale == 1.0 else uncond + cfg_scale * (cond - uncond)


@torch.inference_mode()
def generate(model, labels: torch.Tensor, *, cfg_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Image tokens ``[N, image_tokens]`` (LongTensor, on the CPU) for class ``labels`` [N].

    ``model`` is a LlamaGenForCausalLM (or anything with its forward and cache convention).
    """
    check_sampling_options(cfg_scale, temperature, top_k, top_p)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    config = model.config
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise NumpruneError(f"class labels must be in 0..{config.num_classes - 1}")
    if batch_size < 1:
        raise NumpruneError(f"batch size must be a positive integer, got {batch_size}")
    length = config.image_tokens
    uniform = uniform_draws(len(labels), length, seed)
    device = next(model.parameters()).device
    guided = cfg_scale != 1.0
    was_training = model.training
    model.eval()
    out = torch.empty(len(labels), length, dtype=torch.long)
    bar = tqdm(total=len(labels) * length, desc="sampling", unit="tok", disable=not progress)
    try:
        for start in range(0, len(labels), batch_size):
            batch = labels[start:start + batch_size].to(device)
            rows = len(batch)
            prefix = torch.cat([batch, torch.full_like(batch, config.num_classes)]) if guided else batch
            step = model(prefix[:, None], use_cache=True)
            for t in range(length):
                logits = step.logits[:, -1]
                cond, uncond = (logits[:rows], logits[rows:]) if guided else (logits, None)
                token = pick_tokens(guided_logits(cond, uncond, cfg_scale), uniform[start:start + rows, t].to(device),
                                    temperature, top_k, top_p)
                out[start:start + rows, t] = token.cpu()
                if t + 1 < length:
                    step = model(token.repeat(2 if guided else 1)[:, None], cache=step.cache, use_cache=True)
                bar.update(rows)
    finally:
        bar.close()
        model.train(was_training)
    return out


def llamagen_vq_decoder(vq_model, image_tokens: int, codebook_embed_dim: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tokens -> images hook around LlamaGen's VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py``).

    ``vq_model`` is their VQModel with its weights loaded (not shipped with numprune). The hook
    maps ``[N, image_tokens]`` token ids to ``[N, 3, H, W]`` floats in [0, 1], as numprune's image
    grids expect.
    """
    grid = int(image_tokens ** 0.5)

    @torch.inference_mode()
    def decode(tokens: torch.Tensor) -> torch.Tensor:
        device = next(vq_model.parameters()).device
        shape = [tokens.shape[0], codebook_embed_dim, grid, grid]
        images = vq_model.decode_code(tokens.to(device), shape)
        return ((images.float().clamp(-1, 1) + 1) / 2).cpu()

    return decode
