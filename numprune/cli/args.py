"""Argument types and the option groups several commands share.

Each converter turns one flag's text into a checked value or raises ``argparse.ArgumentTypeError``,
so a bad value is refused by the parser, before anything is loaded.
"""

from __future__ import annotations

import argparse
import math

import torch

from numprune.auto import HOLDOUT_SEQLEN, HOLDOUT_WINDOWS
from numprune.data.self_generated import Sampling
from numprune.errors import NumpruneError
from numprune.image.calibration import CALIB_CFG_SCALE
from numprune.precision import check_device
from numprune.recipe import (
    DISTILL_TOKENS,
    HEAL_LOSSES,
    HEAL_MODES,
    HEAL_PARAMS,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    RATIO,
    SEED,
    SHARE,
    HealOptions,
    Rule,
    number_from_text,
)

DATA_HELP = "sotu, moby-dick, sotu-val, emails, wikitext2, ptb, c4, or a .txt / .jsonl file"
EVAL_DATA_HELP = f"{DATA_HELP}; in prune and compare also self: text the dense model samples (--eval-seed)"
CALIB_HELP = (f"calibration data: {DATA_HELP}; self: the model's own samples (data-free); or a mixture, sotu+emails "
              "(equal shares of --nsamples) or sotu:3+emails:1 (shares by weight) (default: sotu, addresses before 2000)")
MODEL_HELP = "model: 'smollm2' (embedded default), 'gemma3-270m' (optional package), a local folder, or a hub id"
IMAGE_EVAL = "digits"  # --eval digits: image measures of an image generator
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _number(text: str, cast):
    try:
        value = number_from_text(text, cast)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, got {text!r}") from None
    if cast is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def converter(rule: Rule):
    """A converter to ``rule.kind`` that refuses, in the rule's words, the values the rule does not accept."""

    def convert(text: str):
        value = _number(text, rule.kind)
        if not rule.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {rule.says}, got {value}")
        return value

    return convert


# The rules numprune.recipe checks the pruning options by, and a few the command line alone needs.
positive_int = converter(POSITIVE_INT)
seed = converter(SEED)
nonnegative_float = converter(NONNEGATIVE)
positive_float = converter(POSITIVE)
ratio = converter(RATIO)
share = converter(SHARE)
nonnegative_int = converter(Rule(int, lambda v: v >= 0, "zero or more"))
finite_float = converter(Rule(float, lambda v: True, "a finite number"))
probability = converter(Rule(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]"))


def holdout_size(text: str) -> tuple[int, int]:
    """``8x256``: windows of each held-out text x tokens per window, at least 1 x 2."""
    count, _, length = text.strip().lower().partition("x")
    try:
        windows, tokens = number_from_text(count, int), number_from_text(length, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WINDOWSxTOKENS such as 8x256, got {text!r}") from None
    if windows < 1 or tokens < 2:
        raise argparse.ArgumentTypeError(f"needs at least 1 window of 2 or more tokens (WINDOWSxTOKENS such as 8x256), "
                                         f"got {text!r}")
    return windows, tokens


def add_auto_holdout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auto-holdout", type=holdout_size, default=None, metavar="WINDOWSxTOKENS", help="--allocation "
                   "auto: the held-out text its candidates are measured on, as windows x tokens of each held-out text "
                   "(the calibration text's passages no calibration window touches, and the dense model's own samples); "
                   f"tokens are capped at --seqlen - 1 (default {HOLDOUT_WINDOWS}x{HOLDOUT_SEQLEN})")


def dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text]


def device(text: str) -> str:
    """cpu, cuda or cuda:N of a GPU torch sees: the library's one rule (numprune.precision.check_device)."""
    try:
        check_device(text)
    except NumpruneError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("device ")) from None
    return text


def comma_list(item=str):
    """A converter for ``a,b,c``: every item non-empty and converted by ``item``, none given twice (a repeated
    ratio, method, data set or quantisation would be run and reported twice)."""

    def convert(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
        values = [item(part) for part in parts]
        repeated = next((part for part, value in zip(parts, values) if values.count(value) > 1), None)
        if repeated is not None:
            raise argparse.ArgumentTypeError(f"{repeated} is given twice in {text!r}")
        return values

    convert.__name__ = f"comma-separated {getattr(item, '__name__', 'value')} list"
    return convert


def choices_help(entries: dict[str, str], default: str) -> str:
    """A flag's help from a registry: each name with its one-line description, then the default."""
    return "; ".join(f"{name}: {text}" if text else name for name, text in entries.items()) + f" (default: {default})"


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_output_folder(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=f"{what} (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="sotu", help=CALIB_HELP)
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=positive_int, default=512, help="calibration window length in tokens (default 512)")
    p.add_argument("--seed", type=seed, default=0, help="seed for drawing calibration windows, for the "
                   "model's own calibration samples and for the random method (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration batch size")
    p.add_argument("--calib-per-class", type=positive_int, default=128, help="image generators: calibrate on this "
                   "many sequences per class sampled by the dense model itself (default 128; --calib is not used)")
    p.add_argument("--calib-cfg-scale", type=nonnegative_float, default=CALIB_CFG_SCALE, help="image generators: "
                   f"guidance scale of the calibration samples (default {CALIB_CFG_SCALE})")
    group = p.add_argument_group("self-generated text", "how a language model samples its own text for --calib self "
                                 "and --eval self / --data self")
    group.add_argument("--calib-temperature", type=nonnegative_float, default=Sampling.temperature,
                       help=f"sampling temperature (default {Sampling.temperature}; 0: greedy)")
    group.add_argument("--calib-top-p", type=probability, default=Sampling.top_p,
                       help=f"nucleus sampling threshold (default {Sampling.top_p}; 1: the whole distribution)")
    group.add_argument("--sample-batch-size", type=positive_int, default=Sampling.batch_size,
                       help=f"sequences sampled together (default {Sampling.batch_size})")
    group.add_argument("--eval-seed", type=seed, default=1, help="sampling seed of the self-generated "
                       "validation text and of an image generator's measured images (default 1, apart from --seed's); "
                       "an image's guidance is --calib-cfg-scale's unless --cfg-scale is given")


def self_sampling(args) -> Sampling:
    return Sampling(temperature=args.calib_temperature, top_p=args.calib_top_p, batch_size=args.sample_batch_size)


def add_evaluation(p: argparse.ArgumentParser, flags: tuple[str, str, str], default: str | None, text: str) -> None:
    """Perplexity data, window length and window count, under each command's own flag names."""
    data, seqlen, windows = flags
    p.add_argument(data, dest="eval_data", type=comma_list(), default=default,
                   help=f"{text}: {EVAL_DATA_HELP}")
    p.add_argument(seqlen, dest="eval_seqlen", type=positive_int, default=2048,
                   help="perplexity window length (default 2048)")
    p.add_argument(windows, dest="eval_windows", type=positive_int, default=None,
                   help="at most this many non-overlapping windows (default: all)")


def add_sampling(p) -> None:
    """Sampling options of an image generator; unset ones fall back to ``numprune.image.sampling.generate``'s."""
    p.add_argument("--cfg-scale", type=nonnegative_float, default=None, help="classifier-free guidance scale (1: none)")
    p.add_argument("--temperature", type=nonnegative_float, default=None, help="sampling temperature")
    p.add_argument("--top-k", type=nonnegative_int, default=None, help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=finite_float, default=None, help="nucleus sampling threshold (1: all)")


def sampling_options(args) -> dict:
    names = ("cfg_scale", "temperature", "top_k", "top_p")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_image_evaluation(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "image generators", f"measured against the held-out real digits (Fréchet distance, class accuracy, held-out "
        f"NLL) instead of perplexity: always in compare (--data is then not used), in prune with --eval {IMAGE_EVAL}")
    group.add_argument("--eval-per-class", type=positive_int, default=50,
                       help="generated images per class (default 50)")
    add_sampling(group)


def add_heal_options(p: argparse.ArgumentParser) -> None:
    """The options of healing (numprune.heal): block-local, distillation or both; unset ones (None) take
    HealOptions' defaults."""
    d = HealOptions()
    p.add_argument("--heal-mode", choices=HEAL_MODES, default=None, help="healing: local (fit each layer to the "
                   "dense layer's output), distill (train the whole model to the dense model's next-token distribution) "
                   "or local+distill (both, in that order) (default: distill where its training fits in the free "
                   "memory, else local; local with --stream)")
    p.add_argument("--heal-distill-lr", type=positive_float, default=None, help="healing by distillation: AdamW's "
                   f"learning rate, decaying along a cosine (default {d.distill_lr})")
    p.add_argument("--heal-tokens", type=positive_int, default=None, help="healing by distillation: the budget in "
                   f"calibration tokens (default {DISTILL_TOKENS:,}, at most one pass over the calibration windows; not "
                   "with --heal-minutes or --heal-epochs)")
    p.add_argument("--heal-minutes", type=positive_float, default=None, help="healing by distillation: the budget in "
                   "wall minutes; the run then depends on the machine's speed (its report gives the tokens used, which "
                   "--heal-tokens reruns reproducibly)")
    p.add_argument("--heal-lora-rank", type=nonnegative_int, default=None, help="healing by distillation: train LoRA "
                   f"adapters of this rank, merged into the weights after; 0: the kept weights (default {d.lora_rank})")
    p.add_argument("--heal-hidden", type=nonnegative_float, default=None, help="healing by distillation: weight of "
                   "the hidden-state term beside the KL, the mean over the decoder layers of each layer's squared output "
                   f"error relative to the dense output's mean square (default {d.hidden}: the KL alone)")
    p.add_argument("--heal-lr", type=positive_float, default=None, help=f"healing: Adam's learning rate, decaying "
                   f"along a cosine (default {d.lr})")
    p.add_argument("--heal-epochs", type=positive_int, default=None, help="healing: passes over the calibration "
                   "windows per layer (default 1); distillation: passes in all, in place of the token budget")
    p.add_argument("--heal-batch", type=positive_int, default=None, help=f"healing: calibration windows per step "
                   f"(default {d.batch})")
    p.add_argument("--heal-params", choices=HEAL_PARAMS, default=None, help=f"healing: {' or '.join(HEAL_PARAMS)} "
                   f"(all kept weights, or the norms and biases only) (default {d.params})")
    p.add_argument("--heal-loss", choices=HEAL_LOSSES, default=None, help=f"healing: {' or '.join(HEAL_LOSSES)} "
                   "(squared error of the layer's output, or each sub-block's squared error over its dense output's energy) "
                   f"(default {d.loss})")
