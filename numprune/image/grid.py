"""Pictures of generated samples: a PNG grid (rows = classes, columns = samples) and panels side by side.

Token ids become pixels through a decoder: the digits tokenizer (17 grey levels on an 8x8 grid)
for the digits model, or, for any other image generator (a LlamaGen with its VQ decoder, say), a
hook named as ``module:function`` whose function takes a LongTensor ``[N, image_tokens]`` and
returns floats in [0, 1], ``[N, H, W]`` (grey) or ``[N, 3, H, W]`` (colour). Only PIL is used
(it comes with matplotlib), so the pixel size of a grid is exact: each image is enlarged by an
integer ``scale`` (nearest neighbour, so that single pixels stay visible) and separated by ``pad``
background pixels.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from numprune.errors import NumpruneError
from numprune.io.output import output_file

Decoder = Callable[[torch.Tensor], torch.Tensor]


def decoder_for(model, hook: str | None = None) -> Decoder:
    """How ``model``'s tokens become images: ``hook`` (``module:function``) if given, else the digits tokenizer."""
    if hook:
        module_name, _, function = hook.partition(":")
        try:
            decode = getattr(importlib.import_module(module_name), function) if function else None
        except (ImportError, AttributeError) as e:
            raise NumpruneError(f"decoder hook {hook!r} cannot be loaded: {e}") from None
        if not callable(decode):
            raise NumpruneError(f"decoder hook {hook!r} must name a function, as module:function")
        checked = _checked_hook(decode, hook)
        checked(torch.zeros(1, model.config.image_tokens, dtype=torch.long))  # refused now, not after sampling
        return checked
    from numprune.image.digits import tokens_to_images

    if not is_digits_model(model):
        raise NumpruneError("this image model has no built-in decoder (only the digits model has one); name a "
                            "decoder hook module:function (token ids [N, T] -> floats in [0, 1], [N, H, W] or "
                            "[N, 3, H, W])")
    return tokens_to_images


def _checked_hook(decode: Decoder, hook: str) -> Decoder:
    """``decode``, each call refused in one line when it fails or returns anything but a float image per sequence."""
    def checked(tokens: torch.Tensor) -> torch.Tensor:
        try:
            images = decode(tokens)
        except Exception as e:  # noqa: BLE001  (the hook is the user's code: any error is its own)
            reason = (str(e).strip().splitlines() or [""])[0]
            raise NumpruneError(f"decoder hook {hook!r} failed on token ids {list(tokens.shape)}: "
                                f"{type(e).__name__}: {reason}") from None
        if not (torch.is_tensor(images) and images.is_floating_point() and images.dim() in (3, 4)
                and len(images) == len(tokens) and (images.dim() == 3 or images.shape[1] == 3)):
            got = f"a tensor {images.dtype} {list(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise NumpruneError(f"decoder hook {hook!r} must return floats in [0, 1] shaped [N, H, W] or [N, 3, H, W] "
                                f"for token ids {list(tokens.shape)}; it returned {got}")
        return images

    return checked


def is_digits_model(model) -> bool:
    """Whether ``model`` speaks the digits tokenizer's language: 10 classes, 17 grey levels, 8x8 tokens."""
    from numprune.image.digits import DIGITS_CLASSES, DIGITS_LEVELS, DIGITS_TOKENS

    config = model.config
    return (config.vocab_size, config.num_classes, config.image_tokens) == (DIGITS_LEVELS, DIGITS_CLASSES, DIGITS_TOKENS)


def grid_image(images: torch.Tensor, *, scale: int = 4, pad: int = 2, background: int = 255):
    """A PIL image of ``images`` laid out as a grid: ``[rows, cols, H, W]`` or ``[rows, cols, 3, H, W]`` in [0, 1].

    The result is ``cols * (W * scale + pad) + pad`` pixels wide and ``rows * (H * scale + pad) + pad`` high.
    """
    from PIL import Image

    if images.dim() == 4:
        images = images[:, :, None].expand(-1, -1, 3, -1, -1)
    if images.dim() != 5 or images.shape[2] != 3:
        raise NumpruneError(f"a grid needs images shaped [rows, cols, H, W] or [rows, cols, 3, H, W], "
                            f"got {tuple(images.shape)}")
    if scale < 1 or pad < 0:
        raise NumpruneError(f"grid scale must be >= 1 and padding >= 0, got {scale} and {pad}")
    rows, cols, _, height, width = images.shape
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), background, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * cell_h, pad + c * cell_w
            canvas[top:top + height * scale, left:left + width * scale] = pixels[r, c].permute(1, 2, 0).numpy()
    return Image.fromarray(canvas)


def side_by_side(panels: dict, *, gap: int = 8, caption_height: int = 14):
    """One PIL image with ``panels`` (caption -> PIL image) in a row, each captioned above."""
    from PIL import Image, ImageDraw

    width = sum(p.width for p in panels.values()) + gap * (len(panels) + 1)
    height = max(p.height for p in panels.values()) + caption_height + 2 * gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left = gap
    for caption, panel in panels.items():
        draw.text((left, gap // 2), caption, fill="black")
        canvas.paste(panel, (left, gap + caption_height))
        left += panel.width + gap
    return canvas


def by_class(images: torch.Tensor, labels: torch.Tensor, classes: list[int], per_row: int) -> torch.Tensor:
    """``[len(classes), per_row, ...]``: the first ``per_row`` images of each class, in class order."""
    rows = []
    for c in classes:
        chosen = images[labels == c][:per_row]
        if len(chosen) < per_row:
            raise NumpruneError(f"class {c} has {len(chosen)} images, fewer than the {per_row} a grid row needs")
        rows.append(chosen)
    return torch.stack(rows)


def save_png(image, path: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Path:
    """Write a PIL image as PNG through numprune.io.output (a temporary file beside it, renamed when complete)."""
    with output_file(path, overwrite=overwrite, inputs=inputs) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``"0-9"``, ``"3"`` or ``"0-4,7"`` -> class ids, each checked against ``num_classes``."""
    classes = []
    for part in (p.strip() for p in text.split(",")):
        first, sep, last = part.partition("-")
        try:
            classes += list(range(int(first), int(last) + 1)) if sep else [int(first)]
        except ValueError:
            raise NumpruneError(f"classes must look like 0-9 or 1,3,5, got {text!r}") from None
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise NumpruneError(f"classes {text!r} must name classes between 0 and {num_classes - 1}")
    return classes
