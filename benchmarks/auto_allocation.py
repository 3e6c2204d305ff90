"""Validation of the ``auto`` allocation against blend (the schedule), global, and FLAP, on validation texts only.

One calibration per model on the addresses before 1990 (``sotu-val``, seed 0); every cell from those
statistics. Each pruned model is measured on the 1990s addresses (``sotu-val``), SpamAssassin e-mails
(``emails``) and the dense model's own samples (``self``, seed 1), never on the evaluation texts. ``auto``
holds out 4 x 256 tokens of the pre-1990 text apart from the calibration windows plus 4 x 256 of the model's
own samples (seed 1000), and chooses among blend weights 0, 0.25, 0.5, 0.75, 1; each weight is also
pruned and measured here (with --needed-only: those the table shows), so auto's figures are those of the
weight it chose (byte-equal: tested), by either score (``perplexity``: geometric mean of the held-out
perplexities; ``kl``). Prints a markdown grid, writes JSON. Usage:

    .venv/bin/python benchmarks/auto_allocation.py --model smollm2 --out runs/auto-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from numprune.allocate import AUTO_WEIGHTS, blend_schedule
from numprune.api import calibrate, prune
from numprune.auto import SCORES, holdout_windows
from numprune.data.corpora import calibration_windows, evaluation_windows
from numprune.evaluate.perplexity import perplexity
from numprune.models import load_model

TEXTS = ("sotu-val", "emails", "self")


def measure(model, windows: dict) -> dict:
    return {name: perplexity(model, w, progress=False)["ppl"] for name, w in windows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="validation windows of 512 tokens per text")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, but one while the model samples its "
                        "own text (on busy shared cores, token-by-token sampling with two threads waits on itself)")
    parser.add_argument("--needed-only", action="store_true", help="measure only the weights the table shows "
                        "(global, the schedule's, auto's choices), not every candidate")
    parser.add_argument("--out", default="runs/auto-allocation.json")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tokenizer, source = load_model(args.model)
    tokens, calib_info = calibration_windows(tokenizer, "sotu-val", args.nsamples, args.seqlen, 0)
    torch.set_num_threads(1)
    start = time.perf_counter()
    holdout = holdout_windows(model, tokenizer, "sotu-val", args.nsamples, args.seqlen, 0)
    holdout_s = time.perf_counter() - start
    windows = {name: evaluation_windows(tokenizer, name, 512, args.eval_windows, model=model, seed=1)[0]
               for name in TEXTS}
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    stats = calibrate(model, tokens, progress=False)
    calibration_s = time.perf_counter() - start
    dense = measure(model, windows)
    print(f"{source}: calibration {calibration_s:.1f}s, held-out windows {holdout_s:.1f}s, dense "
          + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()), flush=True)

    cells = []
    for ratio in ratios:
        cell = {"ratio": ratio, "weights": {}}
        _, report = prune(model, tokens, stats=stats, ratio=ratio, method="numerical-robust", allocation="auto",
                          holdout=holdout, progress=False)
        record = report["auto_allocation"]
        cell["auto"] = {score: min(record["candidates"], key=lambda row: row[score])["blend_weight"]
                        for score in SCORES}
        cell["auto_record"], cell["auto_s"] = record, report["time_s"]["auto"]
        needed = {1.0, blend_schedule(ratio), *cell["auto"].values()} if args.needed_only else AUTO_WEIGHTS
        for weight in sorted(needed):
            pruned, _ = prune(model, tokens, stats=stats, ratio=ratio, method="numerical-robust", allocation="blend",
                              blend_weight=weight, progress=False)
            cell["weights"][weight] = measure(pruned, windows)
        pruned, _ = prune(model, tokens, stats=stats, ratio=ratio, method="flap", progress=False)
        cell["flap"] = measure(pruned, windows)
        cell["blend_weight"] = blend_schedule(ratio)
        cells.append(cell)
        print(f"{ratio:.0%}: auto chose w={cell['auto']} in {cell['auto_s']:.1f}s; "
              + "; ".join(f"w={w}: " + "/".join(f"{v:.2f}" for v in f.values()) for w, f in cell["weights"].items())
              + "; flap " + "/".join(f"{v:.2f}" for v in cell["flap"].values()), flush=True)

    print(table(cells, dense))
    result = dict(model=source, threads=args.threads, calibration=calib_info, calibration_s=round(calibration_s, 2),
                  holdout_s=round(holdout_s, 2), dense=dense, texts=TEXTS, eval_windows=args.eval_windows,
                  cells=[{**c, "weights": {str(w): f for w, f in c["weights"].items()}} for c in cells])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def table(cells: list[dict], dense: dict) -> str:
    """One row per ratio and text: FLAP, global, blend, auto by each score (its weight), and the adoption test."""
    lines = ["| ratio | text | flap | global (w=1) | blend (schedule) | auto, perplexity | auto, kl | "
             "auto (perplexity) vs best of blend/global |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        weights = c["weights"]
        for text in dense:
            best = min(weights[1.0][text], weights[c["blend_weight"]][text])
            chosen = weights[c["auto"]["perplexity"]][text]
            lines.append(f"| {c['ratio']:.0%} | {text} | {c['flap'][text]:.2f} | {weights[1.0][text]:.2f} | "
                         f"{weights[c['blend_weight']][text]:.2f} (w={c['blend_weight']:g}) | "
                         f"{chosen:.2f} (w={c['auto']['perplexity']:g}) | "
                         f"{weights[c['auto']['kl']][text]:.2f} (w={c['auto']['kl']:g}) | {chosen / best - 1:+.1%} |")
    geo = {score: math.exp(sum(math.log(c["weights"][c["auto"][score]][t]) for c in cells for t in dense)
                           / (len(cells) * len(dense))) for score in SCORES}
    lines.append("")
    lines.append("geometric mean over all cells: " + ", ".join(f"auto by {s} {v:.2f}" for s, v in geo.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
