"""Perplexity of a model (SmolLM2 unless --model) pruned and then healed by distillation (numprune.heal, mode
distill), against the number of calibration tokens and wall minutes it trained for: the curve a user picks a budget
from.

Prunes once (or reloads the pruned folder --pruned wrote before, so that a grid split over several
invocations prunes once), then heals a fresh copy for each run (its own budget and cosine schedule) and
measures perplexity. Each row is printed and appended to --json as soon as it is measured. Usage, the
learning-rate sweep and the curve on the validation texts:

    .venv/bin/python benchmarks/distill_curve.py --ratio 0.2 --pruned runs/pruned20 --json runs/curve.json \
        --runs "tokens=0;tokens=12288,distill_lr=3e-5;tokens=12288,distill_lr=1e-4"

(``hidden=1`` adds the hidden-state term at weight 1: ``--runs "tokens=12288,distill_lr=1e-4,hidden=1"``), and
the evaluation texts for the chosen setting:

    .venv/bin/python benchmarks/distill_curve.py --ratio 0.2 --pruned runs/pruned20 --final-eval sotu,moby-dick \
        --runs "tokens=0;tokens=24576,distill_lr=1e-4"

Protocol: pruning and distillation calibrated on the same --nsamples x --seqlen SOTU windows before 1990
(``sotu-val``'s calibration side; the 1990s it is validated on are unseen), seed 0; perplexity on the first
--eval-windows non-overlapping --eval-seqlen windows of each text; fp32 on the CPU. ``tokens=0`` is unhealed.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numprune
from numprune.data.corpora import calibration_windows, evaluation_windows
from numprune.evaluate.perplexity import perplexity
from numprune.models import load_model
from numprune.save import save_pruned

TEXT_OPTIONS = ("mode", "params", "loss")
FLOAT_OPTIONS = ("distill_lr", "lr", "minutes", "hidden")


def runs(text: str) -> list[dict]:
    """``tokens=0;tokens=8192,distill_lr=1e-4`` as a list of HealOptions keyword arguments (mode distill unless given)."""
    parsed = []
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        options = {"mode": "distill"}
        for item in entry.split(","):
            key, _, value = item.partition("=")
            options[key] = value if key in TEXT_OPTIONS else (float(value) if key in FLOAT_OPTIONS
                                                              else int(value))
        parsed.append(options)
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="name or folder (numprune.models.load_model; default SmolLM2)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="numerical-robust")
    parser.add_argument("--calib", default="sotu-val")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval", default="sotu-val,emails", help="texts (comma-separated; self: the dense "
                        "model's own samples, seed 1)")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--final-eval", default="", help="texts (comma-separated) the unhealed model and the last "
                        "run are also measured on: the evaluation texts, for the setting the validation chose")
    parser.add_argument("--runs", default="tokens=0", help="';'-separated HealOptions key=value lists; tokens=0 is "
                        "the unhealed model")
    parser.add_argument("--pruned", type=Path, default=None, help="folder of the pruned model: written the first "
                        "time, reloaded after")
    parser.add_argument("--dense", action="store_true", help="also measure the dense model")
    parser.add_argument("--time-calibration", action="store_true", help="time one calibration pass over the same "
                        "windows and give each healing's time as a multiple of it")
    parser.add_argument("--json", type=Path, default=None, help="rows are appended here (JSON lines)")
    args = parser.parse_args()

    model, tokenizer, source = load_model(args.model)
    tokens, calib = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    texts = args.eval.split(",")
    finals = [t for t in args.final_eval.split(",") if t]
    evals = {spec: evaluation_windows(tokenizer, spec, args.eval_seqlen, args.eval_windows, model=model, seed=1)[0]
             for spec in texts + finals}

    def ppl(m, final=False):
        return {spec: round(perplexity(m, w, progress=False)["ppl"], 3) for spec, w in evals.items()
                if spec in texts or final}

    def emit(row):
        row.update(model=source, ratio=args.ratio, method=args.method, calibration=calib, eval_windows=args.eval_windows,
                   eval_seqlen=args.eval_seqlen)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.dense:
        emit({"run": "dense", "ppl": ppl(model, final=True)})
    if args.pruned is not None and args.pruned.exists():
        pruned = load_model(str(args.pruned))[0]
    else:
        start = time.perf_counter()
        pruned, report = numprune.prune(model, tokens, ratio=args.ratio, method=args.method, heal=False,
                                        progress=False)
        print(f"pruned in {time.perf_counter() - start:.1f}s", flush=True)
        if args.pruned is not None:
            save_pruned(pruned, tokenizer, report, args.pruned)
    calibration_s = None
    if args.time_calibration:  # the unit of healing's time: one calibration pass over the same windows
        start = time.perf_counter()
        numprune.calibrate(model, tokens, progress=False)
        calibration_s = time.perf_counter() - start
        emit({"run": "calibration pass", "seconds": round(calibration_s, 1)})
    planned = runs(args.runs)
    for i, options in enumerate(planned):
        row = {"run": options}
        if options.get("tokens") == 0:
            healed = pruned
        else:
            healed, record = numprune.heal(model, copy.deepcopy(pruned), tokens, progress=False, **options)
            row.update(minutes=round(record.seconds / 60, 2))
            if calibration_s:
                row.update(passes=round(record.seconds / calibration_s, 2))
            if record.layers:  # block-local: how many layers kept their fit
                row.update(kept=sum(layer.kept for layer in record.layers))
            if (distilled := record.distillation) is not None:
                row.update(tokens=distilled.tokens, steps=distilled.steps, curve=distilled.curve)
        row["ppl"] = ppl(healed, final=options.get("tokens") == 0 or i == len(planned) - 1)
        emit(row)
    print(f"model: {source}; calibration: {calib}")


if __name__ == "__main__":
    main()
