"""``numprune compare``: methods x ratios x evaluation sets on one calibration."""

from __future__ import annotations

from numprune import compare
from numprune.allocate import AUTO
from numprune.cli import args as a
from numprune.cli.inputs import auto_holdout, check_auto_holdout, prepare, protected_inputs
from numprune.criteria import methods
from numprune.extras import need
from numprune.recipe import DEFAULT_METHOD

# The default method first, then the paper's and the baselines.
DEFAULT_METHODS = (DEFAULT_METHOD, "numerical", "flap", "wanda-sp", "magnitude")


def add_parser(commands) -> None:
    p = commands.add_parser("compare", help="methods x ratios x evaluation sets, calibrated once")
    a.add_model(p)
    p.add_argument("--methods", type=a.comma_list(), default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated; each a method ({', '.join(methods())}) with optional overrides, e.g. "
                   "numerical:compensation=none; depth=N (with depth_selection, depth_ridge) removes N layers first, "
                   f"the ratio then applies to the rest (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--ratios", type=a.comma_list(a.ratio), default="0.1,0.2,0.3,0.4,0.5",
                   help="comma-separated pruning ratios")
    a.add_calibration(p)
    a.add_auto_holdout(p)
    a.add_evaluation(p, ("--data", "--eval-seqlen", "--eval-windows"), "sotu,moby-dick",
                     "evaluation data (comma-separated)")
    a.add_image_evaluation(p)
    a.add_output_folder(p, "output folder for results.json/.csv/.md and perplexity.png")
    a.add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    need("matplotlib", "compare's plot")  # before hours of work, not after
    grid = compare.recipes(args.methods, args.ratios)  # a bad method entry fails before the model is loaded
    uses_auto = any(recipe.allocation == AUTO for recipe in grid.values())
    check_auto_holdout(args, uses_auto)
    model, tokenizer, source, tokens, calib_info, evaluation = prepare(args, compare.RESULTS_NAME)
    holdout = auto_holdout(args, model, tokenizer, not args.quiet) if uses_auto else None
    results = compare.run_grid(model, tokens, grid, evaluation, calibration_info=calib_info,
                               batch_size=args.batch_size, progress=not args.quiet, holdout=holdout)
    results["model"] = source
    out = compare.write(results, evaluation, args.out, args.overwrite, inputs=protected_inputs(args))
    print(compare.markdown(results, evaluation))
    print(f"calibration {results['calibration_s']:.0f}s once for {len(args.methods) * len(args.ratios)} runs "
          f"(saved about {results['calibration_saved_s']:.0f}s); whole sweep {results['sweep_s']:.0f}s")
    pictures = ", ".join((evaluation.plot_name, *evaluation.artefact_names))
    print(f"saved: {out}/results.json, results.csv, results.md, {pictures}")
    return 0
