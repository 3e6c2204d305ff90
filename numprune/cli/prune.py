"""``numprune prune``: prune a model (in memory or streamed from disk) and save the narrower one."""

from __future__ import annotations

from collections.abc import Sequence


from numprune.allocate import AUTO, BLEND_FROM, BLEND_MAX, BLEND_TO
from numprune.api import prune
from numprune.auto import holdout_windows
from numprune.cli import args as a
from numprune.cli.export import add_gguf_options, gguf_outtype, print_export
from numprune.cli.inputs import check_calibration, load, prepare, protected_inputs
from numprune.data.corpora import calibration_windows, needs_model
from numprune.distributed import process_group, world
from numprune.errors import NumpruneError
from numprune.export.gguf import check_exportable, export_gguf
from numprune.export.gguf import check_target as check_gguf_target
from numprune.io.output import check_target
from numprune.models import load_config, registry_folder
from numprune.recipe import PruneOptions, option_types
from numprune.save import REPORT_NAME, save_pruned
from numprune.stream import check_folder, load_tokenizer, prune_streaming

# The criteria's keyword options that have a flag of their own: option name -> the flag's attribute.
SCORE_FLAGS = {"lambda_rel": "lambda_rel", "damp": "score_damp", "iterations": "iterations", "centred": "centred",
               "seed": "seed"}


def add_parser(commands) -> None:
    p = commands.add_parser("prune", help="prune a model and save the narrower one")
    a.add_model(p)
    p.add_argument("--ratio", type=a.ratio, required=True, help="fraction of attention+MLP parameters to remove, in (0, 1)")
    p.add_argument("--method", default="numerical-robust", help="numerical-robust (default: the paper's score and "
                   "least squares, per-layer widths blended from FLAP's toward the global ranking's as the ratio "
                   "grows), numerical (the paper's), numerical-unit (one "
                   "Newton variable per head), flap, wanda-sp, magnitude or random")
    p.add_argument("--allocation", default=None, help="global, uniform, flap-widths (FLAP's per-layer widths, the "
                   "method's ranking inside each layer), blend (between flap-widths and global, moving toward global "
                   "as the ratio grows), compensated-error (by the relative error left after compensation) or auto (blend at "
                   "weights 0 to 1, each measured on held-out text, the best kept) "
                   "(default: the method's own; numerical-robust: blend, numerical and flap: global, the others: "
                   "uniform)")
    p.add_argument("--blend-weight", type=a.share, default=None, help="blend allocation: the share of the global "
                   f"ranking's widths, 0 (flap-widths) to 1 (global) (default: 0 up to a ratio of {BLEND_FROM}, "
                   f"{BLEND_MAX} from {BLEND_TO}, linear between)")
    p.add_argument("--allocation-compensation", default=None, help="compensated-error allocation: the compensation "
                   "whose error curves guide it (default: the run's own)")
    p.add_argument("--gqa-unit", default="query", help="grouped-query attention unit: query (one query head per KV "
                   "group; default) or kv-group (a KV head with all its query heads)")
    p.add_argument("--round-to", type=a.positive_int, default=1, help="keep each layer's MLP width a multiple of N "
                   "(default 1)")
    a.add_calibration(p)
    p.add_argument("--compensation", default=None, help="least-squares, affine (least squares with an intercept, "
                   "ridge --damp), bias (FLAP's) or none (default: the method's own; numerical: least-squares, flap: "
                   "bias, the others: none)")
    p.add_argument("--no-compensate", action="store_true", help="same as --compensation none")
    p.add_argument("--compensation-stats", default="dense", help="dense (default) or sequential: statistics from the "
                   "unpruned model, or re-collected with upstream layers already pruned")
    p.add_argument("--damp", type=a.nonnegative_float, default=None, help="least-squares / affine ridge, relative to "
                   "the mean diagonal of X^T X (affine: of the centred covariance) (default: the method's own, 0.01 "
                   "for numerical)")
    p.add_argument("--score-damp", type=a.nonnegative_float, default=0.01, help="Newton score damping, relative to "
                   "mean diag A")
    p.add_argument("--lambda-rel", type=a.nonnegative_float, default=1.0, help="Newton penalty lambda relative to "
                   "tr(A)/D")
    p.add_argument("--iterations", type=a.positive_int, default=50, help="maximum Newton iterations (default 50)")
    p.add_argument("--centred", action="store_true", default=None, help="Newton score on the centred covariance "
                   "(default: the method's own; numerical: uncentred, as the paper)")
    a.add_output_folder(p, "output folder")
    add_gguf_options(p, required=False)
    a.add_evaluation(p, ("--eval", "--eval-seqlen", "--eval-windows"), None,
                     "also measure dense and pruned perplexity on these (comma-separated)")
    a.add_image_evaluation(p)
    p.add_argument("--stream", action="store_true", help="read the weights from the --model safetensors folder one "
                   "decoder layer at a time and write the result layer by layer: the model never sits in memory whole")
    p.add_argument("--device", type=a.device, default=None, help="where each layer's pass runs: cpu, cuda or cuda:N "
                   "(default: where the model is, the CPU); the weights wait in CPU memory or on disk")
    p.add_argument("--dtype", type=a.dtype, default=None, help=f"{', '.join(a.DTYPES)}: precision of the layer passes "
                   "(default: the weights' own); statistics and solves stay in float64")
    a.add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    """Prune in memory or streaming from disk; under torchrun every process calibrates on its share."""
    if args.gguf:  # before any work, as the output folder is (it is the GGUF's input, so it may not hold the GGUF)
        check_gguf_target(args.gguf, args.overwrite, protected_inputs(args), outputs=[args.out])
    with process_group(args.device) as device:
        return (_streaming if args.stream else _in_memory)(args, device, args.dtype)


def prune_options(args) -> dict:
    """The run's options as ``numprune.prune`` takes them, checked before anything is loaded (with the flags that
    mean nothing without another)."""
    if args.no_compensate and args.compensation not in (None, "none"):
        raise NumpruneError(f"--no-compensate contradicts --compensation {args.compensation}; give one of them")
    if args.gguf is not None and not args.gguf.strip():
        raise NumpruneError("--gguf is empty; name the GGUF file to write")
    if args.outtype and not args.gguf:
        raise NumpruneError("--outtype is the tensor type of the --gguf file; without --gguf nothing uses it")
    options = dict(method=args.method, allocation=args.allocation, gqa_unit=args.gqa_unit, round_to=args.round_to,
                   compensation="none" if args.no_compensate else args.compensation,
                   compensation_stats=args.compensation_stats, compensation_damp=args.damp,
                   allocation_compensation=args.allocation_compensation, blend_weight=args.blend_weight,
                   score_options=_score_options(args))
    PruneOptions.checked(args.ratio, **options)
    return options


def _score_options(args) -> dict:
    """The flags of the options the method's criterion takes (Newton's for numerical, the seed for random); an
    unset --centred leaves the method's own."""
    _, accepted = option_types(args.method)
    values = {name: getattr(args, attribute) for name, attribute in SCORE_FLAGS.items() if name in accepted}
    return {name: value for name, value in values.items() if value is not None}


def _streaming(args, device: str | None, dtype) -> int:
    options = prune_options(args)
    if PruneOptions.checked(args.ratio, **options).allocation == AUTO:
        raise NumpruneError("--allocation auto measures whole candidate models on held-out text; --stream never holds "
                            "the whole model: choose another allocation, such as blend")
    if args.eval_data:
        raise NumpruneError("--eval needs the whole model in memory; with --stream, run `numprune ppl` on the output")
    check_calibration(args)
    check_target(args.out, overwrite=args.overwrite, inputs=protected_inputs(args), outputs=[args.gguf],
                 marker=REPORT_NAME)
    folder = check_folder(registry_folder(args.model) or args.model)
    if args.gguf:
        check_exportable(load_config(folder))
    tokenizer = load_tokenizer(folder)
    # The model's own samples need the whole model once, before the layer-by-layer run.
    model = load(str(folder))[0] if needs_model(args.calib) else None
    tokens, calib_info = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, model=model,
                                             sampling=a.self_sampling(args), progress=not args.quiet and world().writer)
    del model
    report = prune_streaming(folder, tokens, ratio=args.ratio, out=args.out, overwrite=args.overwrite,
                             tokenizer=tokenizer, batch_size=args.batch_size, progress=not args.quiet and world().writer,
                             calibration_info=calib_info, device=device, dtype=dtype, **options)
    if world().writer:
        _print_summary(report, args.out)
        _export(args)
    return 0


def _in_memory(args, device: str | None, dtype) -> int:
    options = prune_options(args)
    model, tokenizer, source, tokens, calib_info, evaluation = prepare(args, REPORT_NAME)
    if args.gguf:
        check_exportable(model.config)
    dense = evaluation.measure(model).figures if evaluation is not None else None
    holdout = None
    if PruneOptions.checked(args.ratio, **options).allocation == AUTO:
        if tokenizer is None:
            raise NumpruneError("the auto allocation measures candidates on held-out text; an image generator has none")
        holdout = holdout_windows(model, tokenizer, args.calib, args.nsamples, args.seqlen, args.seed,
                                  a.self_sampling(args), progress=not args.quiet and world().writer)
    pruned, report = prune(model, tokens, ratio=args.ratio, batch_size=args.batch_size,
                           progress=not args.quiet and world().writer, calibration_info=calib_info, device=device,
                           dtype=dtype, holdout=holdout, **options)
    del model
    if not world().writer:
        return 0
    report.model = source
    figures_lines = []
    if evaluation is not None:
        figures = evaluation.measure(pruned).figures
        report.measured = {evaluation.report_key: evaluation.compared(dense, figures)}
        figures_lines = evaluation.summary(dense, figures)
    out = save_pruned(pruned, tokenizer, report, args.out, args.overwrite, inputs=protected_inputs(args))
    _print_summary(report, out, figures_lines)
    _export(args)
    return 0


def _export(args) -> None:
    """``--gguf``: the saved folder, also as a GGUF file for llama.cpp."""
    if args.gguf:
        print_export(export_gguf(args.out, args.gguf, gguf_outtype(args), overwrite=args.overwrite))


def _print_summary(report: dict, out, figures_lines: Sequence[str] = ()) -> None:
    """What was pruned, the parameter counts, the evaluation's dense-vs-pruned lines, time, memory, the folder."""
    params = report["parameters"]
    print(f"model:  {report['model']}")
    print(f"method: {report['method']} ({report['options']['allocation']} allocation, compensation "
          f"{report['options']['compensation']})")
    print(f"parameters: {params['total_before']:,} -> {params['total_after']:,} "
          f"(attention+MLP {params['attention_mlp_before']:,} -> {params['attention_mlp_after']:,}, "
          f"removed {params['achieved_ratio']:.1%}, target {params['target_ratio']:.0%})")
    for line in figures_lines:
        print(line)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in report["time_s"].items())
    gpu = f", peak GPU {report['peak_gpu_bytes'] / 2**30:.2f} GiB" if "peak_gpu_bytes" in report else ""
    compute = report.get("compute", {})
    print(f"time: {times}; peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}; layer passes on "
          f"{compute.get('device')} in {compute.get('dtype')}, {compute.get('world_size')} process(es)")
    loader = ("plain transformers" if report["loads_without_numprune"]
              else "AutoModelForCausalLM after `import numprune`")
    print(f"saved: {out} (loads with {loader}; report in {out}/pruning_report.json)")
