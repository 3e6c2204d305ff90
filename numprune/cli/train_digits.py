"""``numprune train-digits``: train the small LlamaGen on scikit-learn's digits."""

from __future__ import annotations

from numprune.cli import args as a
from numprune.errors import NumpruneError
from numprune.image.digits import (
    DEFAULT_BATCH,
    DEFAULT_STEPS,
    TRAINING_REPORT,
    default_digits_folder,
    save_digits_model,
    train_digits,
)
from numprune.io.output import check_target


def add_parser(commands) -> None:
    p = commands.add_parser("train-digits", help="train the small LlamaGen on scikit-learn's digits")
    p.add_argument("--steps", type=a.positive_int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=a.seed, default=0, help="seed for the initial weights, batches and "
                   "class dropout")
    p.add_argument("--batch-size", type=a.positive_int, default=DEFAULT_BATCH, help=f"images per step (default "
                   f"{DEFAULT_BATCH})")
    p.add_argument("--out", default=None, help="output folder (written atomically; default: the cache folder that "
                   "`--model digits` loads, which needs the default steps and seed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    into_cache = args.out is None  # the default recipe's model, where `--model digits` finds it
    if into_cache:
        if (args.steps, args.seed, args.batch_size) != (DEFAULT_STEPS, 0, DEFAULT_BATCH):
            raise NumpruneError("--out is needed unless the default recipe is trained (it becomes `--model digits`)")
        args.out, args.overwrite = default_digits_folder(), True
    check_target(args.out, overwrite=args.overwrite, marker=TRAINING_REPORT, into_cache=into_cache)
    model, report = train_digits(steps=args.steps, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    out = save_digits_model(model, report, args.out, args.overwrite, into_cache=into_cache)
    print(f"trained {report['parameters']:,} parameters for {args.steps} steps in {report['training_s']:.0f}s "
          f"({report['threads']} threads)")
    print(f"held-out NLL {report['heldout_nll']:.4f} nats/token (unigram baseline {report['unigram_nll']:.4f})")
    print(f"saved: {out}")
    return 0
