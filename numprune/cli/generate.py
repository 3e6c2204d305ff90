"""``numprune generate``: samples of an image generator as a PNG grid (rows: classes)."""

from __future__ import annotations

import time

import torch

from numprune.cli import args as a
from numprune.cli.inputs import protected_inputs
from numprune.errors import NumpruneError
from numprune.evaluate.image import is_image_generator
from numprune.image.grid import decoder_for, grid_image, parse_classes, save_png
from numprune.image.sampling import generate
from numprune.io.output import check_target
from numprune.models import load_model


def add_parser(commands) -> None:
    p = commands.add_parser("generate", help="sample an image generator and save a PNG grid (rows: classes)")
    p.add_argument("--model", required=True, help="image generator: 'digits' or a local folder")
    p.add_argument("--classes", default="0-9", help="classes, e.g. 0-9 or 1,3,5 (default 0-9)")
    p.add_argument("--per-class", type=a.positive_int, default=8, help="samples per class: the grid's columns "
                   "(default 8)")
    a.add_sampling(p)
    p.add_argument("--seed", type=a.seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=a.positive_int, default=64, help="sequences generated at once (default 64)")
    p.add_argument("--decoder", default=None, help="module:function turning token ids [N, T] into images in "
                   "[0, 1] (default: the digits tokenizer, for the digits model)")
    p.add_argument("--scale", type=a.positive_int, default=4, help="enlarge each pixel to N x N (default 4)")
    p.add_argument("--grid", required=True, help="PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    a.add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    inputs = protected_inputs(args)
    check_target(args.grid, overwrite=args.overwrite, folder=False, inputs=inputs)
    model, _, source = load_model(args.model)
    if not is_image_generator(model):
        raise NumpruneError(f"{source} is not an image generator (model type {model.config.model_type})")
    classes = parse_classes(args.classes, model.config.num_classes)
    decode = decoder_for(model, args.decoder)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    start = time.perf_counter()
    tokens = generate(model, labels, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet,
                      **a.sampling_options(args))
    seconds = time.perf_counter() - start
    images = decode(tokens)
    path = save_png(grid_image(images.reshape(len(classes), args.per_class, *images.shape[1:]), scale=args.scale),
                    args.grid, overwrite=args.overwrite, inputs=inputs)
    print(f"model: {source}")
    print(f"generated {len(labels)} images ({len(classes)} classes x {args.per_class}) in {seconds:.1f}s "
          f"({len(labels) / seconds:.1f} images/s)")
    print(f"saved: {path}")
    return 0
