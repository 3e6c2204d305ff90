"""Command line: argument parsing and summaries only; the work is done by numprune.api."""

from __future__ import annotations

import argparse
import signal
import sys

from numprune.errors import NumpruneError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DATA_HELP = "sotu, moby-dick, sotu-val, emails, wikitext2, ptb, c4, or a .txt / .jsonl file"
IMAGE_EVAL = "digits"  # --eval digits: image measures of an image generator
CALIB_CFG_SCALE = 2.0  # guidance of an image generator's self-generated calibration samples


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging

        logging.disable_progress_bar()
    # SIGTERM unwinds like Ctrl-C, so temporary output folders are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.run(args)
    except NumpruneError as error:
        print(f"numprune: error: {error}{_process_note()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("numprune: interrupted; nothing was written", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="numprune", description="Numerical structured pruning of autoregressive "
                                     "transformers: whole heads and MLP channels removed, kept weights corrected.")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "model: 'smollm2' (embedded default), 'gemma3-270m' (optional package), a local folder, or a hub id"

    p = commands.add_parser("prune", help="prune a model and save the narrower one")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--ratio", type=float, required=True, help="fraction of attention+MLP parameters to remove, in (0, 1)")
    p.add_argument("--method", default="numerical", help="numerical (default; the paper's), numerical-unit (one "
                   "Newton variable per head), flap, wanda-sp, magnitude or random")
    p.add_argument("--allocation", default=None, help="global or uniform (default: the method's own; numerical "
                   "and flap: global, the others: uniform)")
    p.add_argument("--gqa-unit", default="query", help="grouped-query attention unit: query (one query head per KV "
                   "group; default) or kv-group (a KV head with all its query heads)")
    p.add_argument("--round-to", type=int, default=1, help="keep each layer's MLP width a multiple of N (default 1)")
    _add_calibration_options(p)
    p.add_argument("--compensation", default=None, help="least-squares, bias (FLAP's) or none (default: the "
                   "method's own; numerical: least-squares, flap: bias, the others: none)")
    p.add_argument("--no-compensate", action="store_true", help="same as --compensation none")
    p.add_argument("--compensation-stats", default="dense", help="dense (default) or sequential: statistics from the "
                   "unpruned model, or re-collected with upstream layers already pruned")
    p.add_argument("--damp", type=float, default=None, help="least-squares damping, relative to mean diag X^T X "
                   "(default: the method's own, 0.01 for numerical)")
    p.add_argument("--score-damp", type=float, default=0.01, help="Newton score damping, relative to mean diag A")
    p.add_argument("--lambda-rel", type=float, default=1.0, help="Newton penalty lambda relative to tr(A)/D")
    p.add_argument("--iterations", type=int, default=50, help="maximum Newton iterations (default 50)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_eval_options(p, ("--eval", "--eval-seqlen", "--eval-windows"), None,
                      "also measure dense and pruned perplexity on these (comma-separated)")
    _add_image_eval_options(p)
    p.add_argument("--stream", action="store_true", help="read the weights from the --model safetensors folder one "
                   "decoder layer at a time and write the result layer by layer: the model never sits in memory whole")
    p.add_argument("--device", default="cpu", help="where each layer's pass runs: cpu (default), cuda or cuda:N; "
                   "the weights wait in CPU memory or on disk")
    p.add_argument("--dtype", default=None, choices=sorted(COMPUTE_DTYPES), help="precision of the layer passes "
                   "(default: the weights' own); statistics and solves stay in float64")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_prune)

    p = commands.add_parser("ppl", help="perplexity of a model")
    p.add_argument("--model", default=None, help=model_help)
    _add_eval_options(p, ("--data", "--seqlen", "--max-windows"), "sotu", "evaluation data (comma-separated)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_ppl)

    p = commands.add_parser("compare", help="methods x ratios x evaluation sets, calibrated once")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--methods", default="numerical,flap,wanda-sp,magnitude",
                   help="comma-separated; each a method with optional overrides, e.g. numerical:compensation=none")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated pruning ratios")
    _add_calibration_options(p)
    _add_eval_options(p, ("--data", "--eval-seqlen", "--eval-windows"), "sotu,moby-dick",
                      "evaluation data (comma-separated)")
    _add_image_eval_options(p)
    p.add_argument("--out", required=True, help="output folder for results.json/.csv/.md and perplexity.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_compare)

    p = commands.add_parser("info", help="parameters and per-layer heads and channels of a model")
    p.add_argument("--model", default=None, help=model_help)
    p.set_defaults(run=_run_info)

    from numprune.bench import add_bench_parser

    add_bench_parser(commands)
    from numprune.evaluate.zeroshot import add_eval_parser

    add_eval_parser(commands)
    from numprune.image.grid import add_generate_parser

    add_generate_parser(commands)
    from numprune.image.digits import add_train_digits_parser

    add_train_digits_parser(commands)
    return parser


def _add_eval_options(p: argparse.ArgumentParser, flags: tuple[str, str, str], default: str | None, text: str) -> None:
    data, seqlen, windows = flags
    p.add_argument(data, dest="eval_data", default=default, help=f"{text}: {DATA_HELP}")
    p.add_argument(seqlen, dest="eval_seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument(windows, dest="eval_windows", type=int, default=None,
                   help="at most this many non-overlapping windows (default: all)")


def _add_image_eval_options(p: argparse.ArgumentParser) -> None:
    from numprune.image.grid import add_sampling_options

    group = p.add_argument_group(
        "image generators", f"measured against the held-out real digits (Fréchet distance, class accuracy, held-out "
        f"NLL) instead of perplexity: always in compare (--data is then not used), in prune with --eval {IMAGE_EVAL}")
    group.add_argument("--eval-per-class", type=int, default=50, help="generated images per class (default 50)")
    group.add_argument("--eval-seed", type=int, default=1, help="sampling seed of the measured images (default 1, "
                       "apart from calibration's); the guidance is --calib-cfg-scale's unless --cfg-scale is given")
    add_sampling_options(group)


def _image_evaluator(args, model, always: bool):
    """The image measures for an image generator (always, or on ``--eval digits``); None for a language model."""
    from numprune.evaluate.image import DigitsEvaluator, DigitsProtocol, is_image_generator
    from numprune.image.grid import is_digits_model, sampling_options

    specs = _eval_specs(args)
    if not is_image_generator(model):
        if IMAGE_EVAL in specs:
            raise NumpruneError(f"--eval {IMAGE_EVAL} measures image generators; this is a language model")
        return None
    if not always and set(specs) - {IMAGE_EVAL}:
        raise NumpruneError(f"an image generator is measured with --eval {IMAGE_EVAL}, not on text")
    if not (always or specs):
        return None
    if not is_digits_model(model):
        raise NumpruneError("image measures are built in for the digits model only; for an ImageNet LlamaGen use "
                            "numprune.evaluate.image.inception_metrics (FID, IS, precision, recall)")
    _check_positive(eval_per_class=args.eval_per_class)
    # Unless told otherwise, the measured images are sampled with the calibration samples' guidance.
    sampling = {"cfg_scale": args.calib_cfg_scale, **sampling_options(args)}
    protocol = DigitsProtocol(per_class=args.eval_per_class, seed=args.eval_seed, **sampling)
    return DigitsEvaluator(protocol, progress=not args.quiet)


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="sotu", help=f"calibration data: {DATA_HELP} (default: sotu, addresses before 2000)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length in tokens (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows and for the random "
                   "method (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--calib-per-class", type=int, default=128, help="image generators: calibrate on this many "
                   "sequences per class sampled by the dense model itself (default 128; --calib is not used)")
    p.add_argument("--calib-cfg-scale", type=float, default=CALIB_CFG_SCALE, help="image generators: guidance scale "
                   f"of the calibration samples (default {CALIB_CFG_SCALE})")


def _run_prune(args) -> int:
    """Prune in memory or streaming from disk; under torchrun every process calibrates on its share."""
    from numprune.distributed import process_group

    dtype = _compute_dtype(args)
    with process_group(args.device) as device:
        return (_prune_streaming if args.stream else _prune_in_memory)(args, device, dtype)


def _prune_options(args) -> dict:
    from numprune.api import PruneOptions

    options = dict(method=args.method, allocation=args.allocation, gqa_unit=args.gqa_unit, round_to=args.round_to,
                   compensation="none" if args.no_compensate else args.compensation,
                   compensation_stats=args.compensation_stats, compensation_damp=args.damp,
                   score_options=_score_options(args))
    PruneOptions(ratio=args.ratio, **options).resolve()
    return options


def _compute_dtype(args):
    """The layer passes' dtype; a CUDA device that is not there fails here, before any work."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise NumpruneError(f"--device {args.device}: torch sees no CUDA device")
    if not args.device.startswith(("cpu", "cuda")):
        raise NumpruneError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    return getattr(torch, args.dtype) if args.dtype else None


def _prune_streaming(args, device: str, dtype) -> int:
    from numprune.data.corpora import calibration_windows, get_source
    from numprune.distributed import world
    from numprune.models import registry_folder
    from numprune.save import check_output
    from numprune.stream import check_folder, load_tokenizer, prune_streaming

    options = _prune_options(args)
    if args.eval_data:
        raise NumpruneError("--eval needs the whole model in memory; with --stream, run `numprune ppl` on the output")
    _check_positive(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)
    check_output(args.out, args.overwrite)
    get_source(args.calib)
    folder = check_folder(registry_folder(args.model) or args.model)
    tokenizer = load_tokenizer(folder)
    tokens, calib_info = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    report = prune_streaming(folder, tokens, ratio=args.ratio, out=args.out, overwrite=args.overwrite,
                             tokenizer=tokenizer, batch_size=args.batch_size, progress=not args.quiet and world().writer,
                             calibration_info=calib_info, device=device, dtype=dtype, **options)
    if world().writer:
        _print_prune_summary(report, args.out)
    return 0


def _prune_in_memory(args, device: str, dtype) -> int:
    from numprune.api import prune
    from numprune.distributed import world
    from numprune.save import save_pruned

    options = _prune_options(args)
    model, tokenizer, source, tokens, calib_info, eval_sets, images = _prepare(args)
    dense_ppl = {spec: _ppl(model, w, args) for spec, (w, _) in eval_sets.items()}
    dense_images = images(model)[0] if images else None
    pruned, report = prune(model, tokens, ratio=args.ratio, batch_size=args.batch_size,
                           progress=not args.quiet and world().writer, calibration_info=calib_info, device=device,
                           dtype=dtype, **options)
    del model
    if not world().writer:
        return 0
    report["model"] = source
    if eval_sets:
        report["perplexity"] = {spec: {"dense": dense_ppl[spec], "pruned": _ppl(pruned, w, args), "protocol": info}
                                for spec, (w, info) in eval_sets.items()}
    if images:
        report["image_measures"] = {"dense": dense_images, "pruned": images(pruned)[0], "protocol": images.describe()}
    out = save_pruned(pruned, tokenizer, report, args.out, args.overwrite)
    _print_prune_summary(report, out)
    return 0


def _run_compare(args) -> int:
    from numprune import compare

    methods = [m for m in args.methods.split(",") if m.strip()]
    for entry in methods:
        compare.parse_method(entry)
    ratios = _ratios(args.ratios)
    model, _, source, tokens, calib_info, eval_sets, images = _prepare(args)
    results = compare.run_grid(model, tokens, methods, ratios, eval_sets, calibration_info=calib_info,
                               batch_size=args.batch_size, progress=not args.quiet, images=images)
    results["model"] = source
    out = compare.write(results, args.out, args.overwrite)
    print(compare.markdown(results))
    print(f"calibration {results['calibration_s']:.0f}s once for {len(methods) * len(ratios)} runs "
          f"(saved about {results['calibration_saved_s']:.0f}s); whole sweep {results['sweep_s']:.0f}s")
    pictures = "measures.png, samples.png" if images else "perplexity.png"
    print(f"saved: {out}/results.json, results.csv, results.md, {pictures}")
    return 0


def _prepare(args):
    """Check everything cheap first, then load the model and draw calibration and evaluation windows
    (for an image generator: self-generated calibration, and the image measures' evaluator)."""
    from numprune.data.corpora import calibration_windows, get_source
    from numprune.evaluate.image import is_image_generator
    from numprune.image.calibration import self_generated_calibration
    from numprune.save import check_output

    _check_positive(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                    calib_per_class=args.calib_per_class)
    check_output(args.out, args.overwrite)
    get_source(args.calib)
    specs = _eval_specs(args)
    model, tokenizer, source = _load(args.model)
    images = _image_evaluator(args, model, always=args.command == "compare")  # None for a language model
    if is_image_generator(model):  # calibrates on sequences it samples itself, class by class (the paper's way)
        tokens, calib_info = self_generated_calibration(model, args.calib_per_class, cfg_scale=args.calib_cfg_scale,
                                                        seed=args.seed, progress=not args.quiet)
    else:
        tokens, calib_info = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    text_specs = [] if is_image_generator(model) else [spec for spec in specs if spec != IMAGE_EVAL]
    eval_sets = {spec: _eval_windows(tokenizer, spec, args) for spec in text_specs}
    return model, tokenizer, source, tokens, calib_info, eval_sets, images


def _ratios(text: str) -> list[float]:
    from numprune.api import PruneOptions

    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise NumpruneError(f"--ratios must be comma-separated numbers, got {text!r}") from None
    for ratio in ratios:
        PruneOptions(ratio=ratio).resolve()
    if not ratios:
        raise NumpruneError("--ratios is empty")
    return ratios


def _run_ppl(args) -> int:
    specs = _eval_specs(args)
    model, tokenizer, source = _load(args.model)
    print(f"model: {source}")
    for spec in specs:
        windows, info = _eval_windows(tokenizer, spec, args)
        print(f"{spec}: perplexity {_ppl(model, windows, args):.3f} ({info['windows']} windows of "
              f"{info['seqlen']} tokens, no special tokens)")
    return 0


def _run_info(args) -> int:
    from numprune.adapters import adapter_for

    model, _, source = _load(args.model)
    adapter = adapter_for(model)
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(adapter.prunable_parameters(i) for i in range(adapter.num_layers()))
    print(f"model: {source}")
    print(f"family: {adapter.family} ({type(model.config).__name__}), {adapter.num_layers()} layers, "
          f"{total:,} parameters, {prunable:,} in attention+MLP")
    print("layer  heads  kv_heads  head_dim  mlp_channels")
    for i in range(adapter.num_layers()):
        layout = adapter.attention_layout(i)
        print(f"{i:5d}  {layout.num_heads:5d}  {layout.num_kv_heads:8d}  {layout.head_dim:8d}  {adapter.mlp_width(i):12d}")
    return 0


def _load(spec):
    from numprune.adapters import adapter_for
    from numprune.evaluate.image import is_image_generator
    from numprune.models import load_model

    model, tokenizer, source = load_model(spec)
    adapter_for(model)  # an unsupported family fails here, before any long work
    if tokenizer is None and not is_image_generator(model):  # an image generator's tokens need none
        raise NumpruneError(f"model {source} has no tokenizer; save one beside it")
    return model, tokenizer, source


def _eval_specs(args) -> list[str]:
    from numprune.data.corpora import get_source

    if not args.eval_data:
        return []
    _check_positive(eval_seqlen=args.eval_seqlen, **({"eval_windows": args.eval_windows} if args.eval_windows else {}))
    specs = [s.strip() for s in args.eval_data.split(",") if s.strip()]
    for spec in specs:
        if spec != IMAGE_EVAL:
            get_source(spec)
    return specs


def _eval_windows(tokenizer, spec, args):
    from numprune.data.corpora import evaluation_windows

    return evaluation_windows(tokenizer, spec, args.eval_seqlen, args.eval_windows)


def _ppl(model, windows, args) -> float:
    from numprune.evaluate.perplexity import perplexity

    return perplexity(model, windows, progress=not args.quiet)["ppl"]


def _score_options(args) -> dict:
    """The criterion's own options: Newton's for numerical, the seed for random, none for the others."""
    if args.method.startswith("numerical"):
        return {"lambda_rel": args.lambda_rel, "damp": args.score_damp, "iterations": args.iterations}
    return {"seed": args.seed} if args.method == "random" else {}


def _process_note() -> str:
    """Under torchrun, which process speaks (none for process 0, which prints the summary)."""
    import os

    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f" (process {rank} of {size})" if rank != "0" else ""


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise NumpruneError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _print_prune_summary(report: dict, out) -> None:
    params = report["parameters"]
    print(f"model:  {report['model']}")
    print(f"method: {report['method']} ({report['options']['allocation']} allocation, compensation "
          f"{report['options']['compensation']})")
    print(f"parameters: {params['total_before']:,} -> {params['total_after']:,} "
          f"(attention+MLP {params['attention_mlp_before']:,} -> {params['attention_mlp_after']:,}, "
          f"removed {params['achieved_ratio']:.1%}, target {params['target_ratio']:.0%})")
    for spec, ppl in report.get("perplexity", {}).items():
        protocol = ppl["protocol"]
        print(f"perplexity on {spec} ({protocol['windows']} x {protocol['seqlen']} tokens): "
              f"dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f}")
    if "image_measures" in report:
        dense, pruned = report["image_measures"]["dense"], report["image_measures"]["pruned"]
        print(f"image measures ({report['image_measures']['protocol']['per_class']} per class vs held-out digits): "
              f"Fréchet distance {dense['frechet_distance']:.2f} -> {pruned['frechet_distance']:.2f}, class accuracy "
              f"{dense['class_accuracy']:.1%} -> {pruned['class_accuracy']:.1%}, held-out NLL "
              f"{dense['heldout_nll']:.4f} -> {pruned['heldout_nll']:.4f} nats/token")
    times = ", ".join(f"{k} {v:.1f}s" for k, v in report["time_s"].items())
    gpu = f", peak GPU {report['peak_gpu_bytes'] / 2**30:.2f} GiB" if "peak_gpu_bytes" in report else ""
    compute = report.get("compute", {})
    print(f"time: {times}; peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}; layer passes on "
          f"{compute.get('device')} in {compute.get('dtype')}, {compute.get('world_size')} process(es)")
    loader = ("plain transformers" if report["loads_without_numprune"]
              else "AutoModelForCausalLM after `import numprune`")
    print(f"saved: {out} (loads with {loader}; report in {out}/pruning_report.json)")


if __name__ == "__main__":
    raise SystemExit(main())
