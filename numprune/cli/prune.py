"""``numprune prune``: prune a model (in memory or streamed from disk) and save the narrower one."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from numprune.adapters import adapter_for
from numprune.allocate import ALLOCATIONS, AUTO, AUTO_DESCRIPTION, BLEND_FROM, BLEND_MAX, BLEND_TO, GQA_UNITS
from numprune.allocate import REGISTRY as ALLOCATION_REGISTRY
from numprune.api import prune
from numprune.cli import args as a
from numprune.cli.export import add_gguf_options, gguf_outtype, print_export
from numprune.cli.heal import summary as heal_summary
from numprune.cli.inputs import (
    auto_holdout,
    check_auto_holdout,
    check_calibration,
    prepare,
    protected_inputs,
    streamed_windows,
)
from numprune.compensate import COMPENSATIONS, Damped
from numprune.compensate import REGISTRY as COMPENSATION_REGISTRY
from numprune.criteria import get_method, methods
from numprune.depth import DEFAULT_RIDGE, SELECTIONS, layers_for_ratio
from numprune.distributed import process_group, world
from numprune.errors import NumpruneError
from numprune.export.gguf import check_exportable, export_gguf
from numprune.export.gguf import check_target as check_gguf_target
from numprune.heal import streamed_options
from numprune.io.output import check_target
from numprune.models import load_config, registry_folder
from numprune.recipe import (
    COMPENSATION_STATS,
    DEFAULT_METHOD,
    HEAL_FIELDS,
    PruneOptions,
    keyword_defaults,
    option_types,
    read_recipe,
    recipe_of,
)
from numprune.save import REPORT_NAME, save_pruned
from numprune.stream import check_folder, prune_streaming

# PruneOptions' fields that have a flag of their own: field -> the flag's attribute (unset: None).
RECIPE_FLAGS = {"ratio": "ratio", "method": "method", "allocation": "allocation", "gqa_unit": "gqa_unit",
                "round_to": "round_to", "compensation": "compensation", "compensation_stats": "compensation_stats",
                "compensation_damp": "damp", "allocation_compensation": "allocation_compensation",
                "blend_weight": "blend_weight", "heal": "heal",
                **{f"heal_{name}": f"heal_{name}" for name in HEAL_FIELDS},
                "depth": "depth", "depth_selection": "depth_selection", "depth_ridge": "depth_ridge"}
# The criteria's keyword options that have a flag of their own: option name -> the flag's attribute.
SCORE_FLAGS = {"lambda_rel": "lambda_rel", "damp": "score_damp", "iterations": "iterations", "centred": "centred",
               "seed": "seed"}


def add_parser(commands) -> None:
    p = commands.add_parser("prune", help="prune a model and save the narrower one")
    a.add_model(p)
    p.add_argument("--ratio", type=a.ratio, default=None, help="fraction of attention+MLP parameters to remove by "
                   "width (heads and channels), in (0, 1); with --depth, of the layers that remain (needed unless "
                   "--recipe gives it or --depth / --depth-ratio removes layers alone)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--depth", type=a.positive_int, default=None, help="remove this many whole decoder layers "
                       "first (LLaMA, Mistral, Phi-3, Qwen2, Qwen3 layouts); the result keeps the stock config; "
                       "--ratio then applies to the layers that remain")
    depth.add_argument("--depth-ratio", type=a.ratio, default=None, help="remove this share of the decoder layers "
                       "first (rounded to whole layers; the recipe records the number)")
    p.add_argument("--depth-selection", choices=SELECTIONS, default=None, help="patched (default: the span of "
                   "consecutive layers whose least-squares patch, folded into the layer before it, leaves the least "
                   "error), scattered (shortgpt's layers, each run of consecutive ones patched; better from 30%% of "
                   "the layers on SmolLM2) or shortgpt (the layers whose input and output are most alike, no patch)")
    p.add_argument("--depth-ridge", type=a.nonnegative_float, default=None, help="ridge of the depth patch, "
                   f"relative to the mean diagonal of its Gram matrix (default {DEFAULT_RIDGE})")
    p.add_argument("--recipe", default=None, metavar="FILE", help="a JSON or YAML recipe: PruneOptions' fields, or "
                   "a pruning_report.json, which holds the recipe a run followed; recipe flags given beside it change it")
    p.add_argument("--method", choices=list(methods()), default=None,
                   help=a.choices_help({n: m.description for n, m in methods().items()}, DEFAULT_METHOD))
    p.add_argument("--allocation", choices=(*ALLOCATIONS, AUTO), default=None,
                   help=a.choices_help({**{n: x.description for n, x in ALLOCATION_REGISTRY.items()},
                                        AUTO: AUTO_DESCRIPTION}, "the method's own"))
    p.add_argument("--blend-weight", type=a.share, default=None, help="blend allocation: the share of the global "
                   f"ranking's widths, 0 (flap-widths) to 1 (global) (default: 0 up to a ratio of {BLEND_FROM}, "
                   f"{BLEND_MAX} from {BLEND_TO}, linear between)")
    a.add_auto_holdout(p)
    p.add_argument("--allocation-compensation", choices=COMPENSATIONS, default=None, help="compensated-error "
                   "allocation: the compensation whose error curves guide it (default: the run's own)")
    p.add_argument("--gqa-unit", choices=GQA_UNITS, default=None, help="grouped-query attention unit: query (one query "
                   "head per KV group; default) or kv-group (a KV head with all its query heads)")
    p.add_argument("--round-to", type=a.positive_int, default=None, help="keep each layer's MLP width a multiple of N "
                   "(default 1)")
    a.add_calibration(p)
    p.add_argument("--compensation", choices=COMPENSATIONS, default=None, help=a.choices_help(
        {n: c.description for n, c in COMPENSATION_REGISTRY.items()}, "the method's own"))
    p.add_argument("--no-compensate", action="store_true", help="same as --compensation none")
    p.add_argument("--compensation-stats", choices=COMPENSATION_STATS, default=None, help="dense (default) or "
                   "sequential: statistics from the unpruned model, or re-collected with upstream layers already pruned")
    p.add_argument("--damp", type=a.nonnegative_float, default=None, help="least-squares / affine ridge, relative to "
                   "the mean diagonal of X^T X (affine: of the centred covariance) (default: the method's own, "
                   f"{Damped.compensation_damp} for numerical)")
    newton = keyword_defaults(get_method("numerical").criterion)  # the flags' defaults are the criterion's own
    p.add_argument("--score-damp", type=a.nonnegative_float, default=None, help="Newton score damping, relative to "
                   f"mean diag A (default {newton['damp']})")
    p.add_argument("--lambda-rel", type=a.nonnegative_float, default=None, help="Newton penalty lambda relative to "
                   f"tr(A)/D (default {newton['lambda_rel']})")
    p.add_argument("--iterations", type=a.positive_int, default=None, help="maximum Newton iterations (default "
                   f"{newton['iterations']})")
    p.add_argument("--centred", action="store_true", default=None, help="Newton score on the centred covariance "
                   "(default: the method's own; numerical: uncentred, as the paper)")
    p.add_argument("--heal", action=argparse.BooleanOptionalAction, default=None, help="after pruning, heal the "
                   "pruned model toward the dense one on the calibration windows: by distillation (the whole model "
                   "trained to the dense model's next-token distribution) where its training fits in memory, else "
                   "block-local (each layer fitted to the dense layer's output; always with --stream); --heal-mode "
                   "chooses (default: the method's own; numerical-robust heals, the others do not)")
    a.add_heal_options(p)
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
    if args.ratio is None and args.recipe is None and args.depth is None and args.depth_ratio is None:
        raise NumpruneError("nothing to remove: give --ratio, --recipe, --depth or --depth-ratio")
    if args.gguf:  # before any work, as the output folder is (it is the GGUF's input, so it may not hold the GGUF)
        check_gguf_target(args.gguf, args.overwrite, protected_inputs(args), outputs=[args.out])
    with process_group(args.device) as device:
        return (_streaming if args.stream else _in_memory)(args, device, args.dtype)


def prune_options(args, layers: int | None = None) -> PruneOptions:
    """The run's recipe: --recipe's changed by the recipe flags given, or the flags alone; checked before anything is
    loaded (with the flags that mean nothing without another). --depth-ratio is a share of the model's ``layers``,
    known once the model is: before (None), one layer stands in for it, so the rest is checked first."""
    if args.no_compensate and args.compensation not in (None, "none"):
        raise NumpruneError(f"--no-compensate contradicts --compensation {args.compensation}; give one of them")
    if args.gguf is not None and not args.gguf.strip():
        raise NumpruneError("--gguf is empty; name the GGUF file to write")
    if args.outtype and not args.gguf:
        raise NumpruneError("--outtype is the tensor type of the --gguf file; without --gguf nothing uses it")
    given = {name: getattr(args, flag) for name, flag in RECIPE_FLAGS.items() if getattr(args, flag) is not None}
    if args.no_compensate:
        given["compensation"] = "none"
    if args.depth_ratio is not None:
        given["depth"] = layers_for_ratio(layers, args.depth_ratio) if layers is not None else 1
    recipe = read_recipe(args.recipe) if args.recipe is not None else None
    if recipe is None and "ratio" not in given and "depth" not in given:
        raise NumpruneError("--ratio is needed (or a --recipe that gives it, or --depth / --depth-ratio)")
    method = given.get("method") or (recipe.method if recipe is not None else DEFAULT_METHOD)
    score = _score_options(args, method, seeded=recipe is None)
    if score:
        kept = recipe.requested().get("score_options", {}) if recipe is not None and "method" not in given else {}
        given["score_options"] = {**kept, **score}
    options = recipe_of(recipe, given)
    check_auto_holdout(args, options.allocation == AUTO)
    return options


def _score_options(args, method: str, seeded: bool) -> dict:
    """The flags of the options the method's criterion takes (Newton's for numerical, the seed for random); an
    unset flag leaves the criterion's own. --seed counts only when ``seeded`` (a recipe file keeps its own seed;
    --seed then draws the calibration windows only)."""
    _, accepted = option_types(method)
    values = {name: getattr(args, attribute) for name, attribute in SCORE_FLAGS.items()
              if name in accepted and (seeded or name != "seed")}
    return {name: value for name, value in values.items() if value is not None}


def _streaming(args, device: str | None, dtype) -> int:
    options = prune_options(args)
    if options.allocation == AUTO:
        raise NumpruneError("--allocation auto measures whole candidate models on held-out text; --stream never holds "
                            "the whole model: choose another allocation, such as blend")
    if options.heal:
        streamed_options(options.heal_options())  # refuses distillation
    if args.eval_data:
        raise NumpruneError("--eval needs the whole model in memory; with --stream, run `numprune ppl` on the output")
    check_calibration(args)
    check_target(args.out, overwrite=args.overwrite, inputs=protected_inputs(args), outputs=[args.gguf],
                 marker=REPORT_NAME)
    folder = check_folder(registry_folder(args.model) or args.model)
    if args.depth_ratio is not None:
        options = prune_options(args, load_config(folder).num_hidden_layers)
    if args.gguf:
        check_exportable(load_config(folder))
    tokenizer, tokens, calib_info = streamed_windows(args, folder, progress=not args.quiet and world().writer)
    report = prune_streaming(folder, tokens, options, out=args.out, overwrite=args.overwrite,
                             tokenizer=tokenizer, batch_size=args.batch_size, progress=not args.quiet and world().writer,
                             calibration_info=calib_info, device=device, dtype=dtype)
    if world().writer:
        _print_summary(report, args.out)
        _export(args)
    return 0


def _in_memory(args, device: str | None, dtype) -> int:
    options = prune_options(args)
    model, tokenizer, source, tokens, calib_info, evaluation = prepare(args, REPORT_NAME)
    if args.gguf:
        check_exportable(model.config)
    if args.depth_ratio is not None:
        options = prune_options(args, adapter_for(model).num_layers())
    holdout = auto_holdout(args, model, tokenizer, not args.quiet and world().writer) if options.allocation == AUTO else None
    dense = evaluation.measure(model).figures if evaluation is not None else None
    pruned, report = prune(model, tokens, options, batch_size=args.batch_size,
                           progress=not args.quiet and world().writer, calibration_info=calib_info, device=device,
                           dtype=dtype, holdout=holdout)
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
    print(f"method: {report['method']} " + ("(layers only: no width step)" if report["method"] == "depth" else
                                           f"({report['options']['allocation']} allocation, compensation "
                                           f"{report['options']['compensation']})"))
    if "depth" in report:
        depth = report["depth"]
        patched = depth.get("patched_layers") or [depth["patched_layer"]]  # several with scattered
        print(f"depth:  removed layers {depth['removed_layers']} of {depth['layers_before']} ({depth['selection']}"
              + (f", patch in layer{'s' * (len(patched) > 1)} {', '.join(map(str, patched))}, calibration error "
                 f"{depth['relative_error_before_patch']:.4f} -> {depth['relative_error_after_patch']:.4f}"
                 + (" (mean over the patches)" if len(patched) > 1 else "")
                 if depth["patched_layer"] is not None else "") + ")")
    print(f"parameters: {params['total_before']:,} -> {params['total_after']:,} "
          f"(attention+MLP {params['attention_mlp_before']:,} -> {params['attention_mlp_after']:,}, "
          f"removed {params['achieved_ratio']:.1%}, target {params['target_ratio']:.0%})")
    if "healing" in report:
        print(f"healing: {heal_summary(report['healing'])}")
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
