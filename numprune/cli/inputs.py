"""What several commands load before their work: the model, calibration windows, the evaluation.

Everything cheap is checked first (output path, data names), then the model is loaded once.
``build_evaluation`` is the one place where an ``--eval`` / ``--data`` name becomes an ``Evaluation``.
"""

from __future__ import annotations

from pathlib import Path

from numprune.adapters import adapter_for
from numprune.auto import HOLDOUT_SEQLEN, HOLDOUT_WINDOWS, holdout_windows
from numprune.cli.args import IMAGE_EVAL, sampling_options, self_sampling
from numprune.data.assets import installed_sources
from numprune.data.corpora import (
    calibration_parts,
    calibration_windows,
    check_evaluation_source,
    evaluation_windows,
    needs_model,
)
from numprune.data.self_generated import SELF
from numprune.errors import NumpruneError
from numprune.evaluate.base import Evaluation
from numprune.evaluate.image import DigitsEvaluator, DigitsProtocol, is_image_generator
from numprune.evaluate.perplexity import Perplexity
from numprune.image.calibration import self_generated_calibration
from numprune.image.grid import is_digits_model
from numprune.io.output import check_target
from numprune.models import load_model, model_folder
from numprune.stream import load_tokenizer


def load(spec):
    """The model, its tokenizer and a description; an unsupported family fails here, before any long work."""
    model, tokenizer, source = load_model(spec)
    adapter_for(model)
    if tokenizer is None and not is_image_generator(model):  # an image generator's tokens need none
        raise NumpruneError(f"model {source} has no tokenizer; save one beside it")
    return model, tokenizer, source


def protected_inputs(args) -> list[Path]:
    """What the run reads and its outputs must never replace, enter or contain: the model folders (for the
    embedded model, its cached folder and the GGUF it comes from), the calibration and evaluation files, the
    recipe file."""
    models = args.model if isinstance(args.model, list) else [args.model]
    calibration = [name for name, _ in calibration_parts(args.calib)] if getattr(args, "calib", None) else []
    named = [*calibration, *(getattr(args, "eval_data", None) or []), getattr(args, "recipe", None)]
    files = [Path(s).expanduser() for s in named if s]
    return [*map(model_folder, models), *installed_sources(), *(f for f in files if f.is_file())]


def prepare(args, marker: str):
    """Check everything cheap first, then load the model, build the evaluation (None when nothing is to be
    measured) and draw the calibration windows (for an image generator: self-generated calibration).
    ``marker`` is the file every output of the command has (an existing folder without it is never replaced)."""
    check_calibration(args)
    check_target(args.out, overwrite=args.overwrite, inputs=protected_inputs(args),
                 outputs=[getattr(args, "gguf", None)], marker=marker)
    specs = eval_specs(args)
    model, tokenizer, source = load(args.model)
    if not is_image_generator(model):  # windows past a position table are refused before any work
        adapter = adapter_for(model)
        adapter.check_window(args.seqlen)
        if specs:
            adapter.check_window(args.eval_seqlen)
    evaluation = build_evaluation(evaluation_names(args, model), args, model, tokenizer)
    if is_image_generator(model):  # calibrates on sequences it samples itself, class by class (the paper's way)
        tokens, calib_info = self_generated_calibration(model, args.calib_per_class, cfg_scale=args.calib_cfg_scale,
                                                        seed=args.seed, progress=not args.quiet)
    else:
        tokens, calib_info = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed,
                                                 model=model, sampling=self_sampling(args), progress=not args.quiet)
    return model, tokenizer, source, tokens, calib_info, evaluation


def check_auto_holdout(args, auto: bool) -> None:
    """--auto-holdout only where the run's recipes use the auto allocation (``auto``), checked before any work."""
    if args.auto_holdout is not None and not auto:
        raise NumpruneError("--auto-holdout sizes the held-out text of the auto allocation, which this run does not "
                            "use (--allocation auto, or allocation=auto in a compare entry)")


def auto_holdout(args, model, tokenizer, progress: bool) -> dict:
    """The held-out text the auto allocation chooses on: --auto-holdout windows of each held-out text."""
    if tokenizer is None:
        raise NumpruneError("the auto allocation measures candidates on held-out text; an image generator has none")
    windows, length = args.auto_holdout or (HOLDOUT_WINDOWS, HOLDOUT_SEQLEN)
    return holdout_windows(model, tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, self_sampling(args),
                           progress=progress, windows=windows, length=length)


def streamed_windows(args, folder: Path, progress: bool):
    """For a run that streams the model in ``folder``: its tokenizer and the calibration windows drawn with it. The
    model's own samples need the whole model once, loaded for them and dropped before the layer-by-layer run."""
    tokenizer = load_tokenizer(folder)
    model = load(str(folder))[0] if needs_model(args.calib) else None
    tokens, calib_info = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, model=model,
                                             sampling=self_sampling(args), progress=progress)
    return tokenizer, tokens, calib_info


def check_calibration(args) -> None:
    """The calibration spec (and the held-out seed apart from calibration's), checked before any work."""
    parts = dict(calibration_parts(args.calib))
    if SELF in parts and SELF in (args.eval_data or []) and args.eval_seed == args.seed:
        raise NumpruneError(f"--eval-seed {args.eval_seed} is the calibration seed: the self-generated validation "
                            "text would repeat the calibration samples")


def eval_specs(args) -> list[str]:
    """The requested evaluation sets, each name checked before anything is loaded."""
    specs = args.eval_data or []
    for spec in specs:
        if spec != IMAGE_EVAL:
            check_evaluation_source(spec)
    return specs


def eval_windows(tokenizer, spec, args, model=None):
    """Evaluation windows; ``self`` is sampled from ``model`` (the dense one) with ``--eval-seed``."""
    if spec != SELF:
        return evaluation_windows(tokenizer, spec, args.eval_seqlen, args.eval_windows)
    return evaluation_windows(tokenizer, spec, args.eval_seqlen, args.eval_windows, model=model, seed=args.eval_seed,
                              sampling=self_sampling(args), progress=not args.quiet)


def evaluation_names(args, model) -> list[str]:
    """What ``--eval`` (prune) or ``--data`` (compare) asks ``model`` to be measured on, checked against the
    kind of model; compare always measures an image generator by its image measures (--data is then not used)."""
    names = eval_specs(args)
    if not is_image_generator(model):
        if IMAGE_EVAL in names:
            raise NumpruneError(f"--eval {IMAGE_EVAL} measures image generators; this is a language model")
        return names
    if args.command == "compare":
        names = [IMAGE_EVAL]
    elif set(names) - {IMAGE_EVAL}:
        raise NumpruneError(f"an image generator is measured with --eval {IMAGE_EVAL}, not on text")
    if names and not is_digits_model(model):
        raise NumpruneError("image measures are built in for the digits model only; for an ImageNet LlamaGen use "
                            "numprune.evaluate.image.inception_metrics (FID, IS, precision, recall)")
    return names


def build_evaluation(names: list[str], args, model, tokenizer) -> Evaluation | None:
    """The evaluation ``names`` ask for: the image measures of the digits model, or perplexity on each named
    text (``self`` sampled from the dense ``model``); None for no name."""
    if not names:
        return None
    if IMAGE_EVAL in names:  # alone: evaluation_names refuses it beside a text
        # Unless told otherwise, the measured images are sampled with the calibration samples' guidance.
        sampling = {"cfg_scale": args.calib_cfg_scale, **sampling_options(args)}
        protocol = DigitsProtocol(per_class=args.eval_per_class, seed=args.eval_seed, **sampling)
        return DigitsEvaluator(protocol, progress=not args.quiet)
    # compare prints each cell's figures as they come; only prune shows perplexity's progress. A file named outside
    # UTF-8 (undecodable bytes held as surrogates, which tables and plots refuse) is labelled with them escaped,
    # as \udcff: two such names stay two labels.
    labels = {name: name.encode("utf-8", "backslashreplace").decode("utf-8") for name in names}
    return Perplexity({labels[name]: eval_windows(tokenizer, name, args, model) for name in names},
                      progress=not args.quiet and args.command != "compare")
