"""``numprune heal``: heal a saved pruned model toward the dense model it was pruned from, into a new folder (both
models in memory, or with ``--stream`` read from their folders one layer at a time)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from numprune.cli import args as a
from numprune.cli.inputs import load, protected_inputs, streamed_windows
from numprune.data.corpora import calibration_windows
from numprune.errors import NumpruneError
from numprune.evaluate.image import is_image_generator
from numprune.heal import heal, healed_report, streamed_options
from numprune.io.output import check_target
from numprune.models import registry_folder
from numprune.recipe import HEAL_FIELDS, HealOptions
from numprune.save import REPORT_NAME, read_report, save_pruned
from numprune.stream import check_folder, heal_streaming


def add_parser(commands) -> None:
    p = commands.add_parser("heal", help="fit a pruned model's layers to the dense model's outputs, layer by layer, "
                            "or distil the dense model into it, and save the healed model")
    a.add_model(p)
    p.add_argument("--pruned", required=True, help="the pruned model folder (a numprune output) to heal; it is not "
                   "changed")
    a.add_calibration(p)
    a.add_heal_options(p)
    a.add_output_folder(p, "output folder for the healed model")
    p.add_argument("--device", type=a.device, default=None, help="where the layer passes and fits run: cpu, cuda or "
                   "cuda:N (default: where the dense model is, the CPU)")
    p.add_argument("--stream", action="store_true", help="read both models' weights from their safetensors folders "
                   "one decoder layer at a time and write each healed layer at once: neither model sits in memory "
                   "whole (block-local healing only, the default mode then)")
    a.add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    options = HealOptions.checked(**{name: value for name in HEAL_FIELDS
                                     if (value := getattr(args, f"heal_{name}")) is not None})
    report = read_report(args.pruned)
    if report is None:
        raise NumpruneError(f"--pruned {args.pruned} has no {REPORT_NAME}: heal a folder numprune pruned")
    inputs = [*protected_inputs(args), Path(args.pruned).expanduser()]
    check_target(args.out, overwrite=args.overwrite, inputs=inputs, marker=REPORT_NAME)
    if args.stream:
        return _streaming(args, options)
    dense, tokenizer, source = load(args.model)
    if is_image_generator(dense):
        raise NumpruneError("heal calibrates on text; image generators are not supported")
    pruned, pruned_tokenizer, _ = load(args.pruned)
    tokens, calib_info = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, model=dense,
                                             sampling=a.self_sampling(args), progress=not args.quiet)
    healed, record = heal(dense, pruned, tokens, progress=not args.quiet, device=args.device, **asdict(options))
    report = healed_report(report, record, calibration=calib_info, dense_model=source)
    out = save_pruned(healed, pruned_tokenizer, report, args.out, args.overwrite, inputs=inputs)
    _print_summary(args, source, report, out)
    return 0


def _streaming(args, options: HealOptions) -> int:
    """Both models read from their folders one layer at a time; the dense folder's tokenizer draws the windows."""
    options = streamed_options(options)
    folder = check_folder(registry_folder(args.model) or args.model)
    check_folder(Path(args.pruned).expanduser())
    _, tokens, calib_info = streamed_windows(args, folder, progress=not args.quiet)
    report = heal_streaming(folder, args.pruned, tokens, out=args.out, overwrite=args.overwrite,
                            progress=not args.quiet, device=args.device, calibration_info=calib_info, **asdict(options))
    _print_summary(args, report["healing"]["dense_model"], report, Path(args.out))
    return 0


def _print_summary(args, source: str, report: dict, out: Path) -> None:
    print(f"healed: {args.pruned} toward {source}; {summary(report['healing'])}")
    print(f"saved: {out} (report in {out}/{REPORT_NAME})")


def summary(healing: dict) -> str:
    """One line on a report's ``healing`` record: the layers that kept their fit, the distillation's KL and budget."""
    parts = []
    if layers := healing["layers"]:
        parts.append(f"{sum(layer['kept'] for layer in layers)} of {len(layers)} layers kept their fit; calibration "
                     f"loss, last layer {layers[-1]['before']:.4g} -> {layers[-1]['after']:.4g}")
    if distilled := healing.get("distillation"):
        curve = distilled["curve"]
        kl = f", KL to the dense model {curve[0]['kl']:.4g} -> {curve[-1]['kl']:.4g}" if curve else ""
        if curve and "hidden" in curve[0]:
            kl += f", hidden-state term {curve[0]['hidden']:.4g} -> {curve[-1]['hidden']:.4g}"
        parts.append(f"distilled {distilled['tokens']:,} tokens in {distilled['steps']} steps (budget: "
                     f"{distilled['stopped_by']}){kl}")
    return "; ".join(parts) + f"; {healing['seconds']:.1f}s"
