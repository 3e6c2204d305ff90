"""Perplexity of SmolLM2 pruned and then healed block by block (numprune.heal), against unhealed.

Prunes once per ratio (one calibration's statistics for every ratio), then heals a copy with each
healing setting and measures perplexity; healing time is also given as a multiple of one
calibration pass over the same windows (numprune.calibrate, measured here). Prints each row as it is
measured, then a markdown table; writes JSON. Usage, validation grid (choose defaults here):

    .venv/bin/python benchmarks/heal_ppl.py --ratios 0.2,0.5 --nsamples 32 --seqlen 256 \
        --eval sotu-val,emails --heals "none;lr=1e-4;lr=3e-4,loss=relative;lr=1e-2,params=norms"

and the evaluation table (the defaults: "default" is HealOptions' defaults):

    .venv/bin/python benchmarks/heal_ppl.py --ratios 0.1,0.2,0.3,0.5 --calib sotu --nsamples 64 --seqlen 512 \
        --eval sotu,moby-dick --heals "none;default"

Protocol: calibration on SOTU addresses before 1990 (``sotu-val``'s calibration side, so that the 1990s
it is validated on are unseen) or before 2000 (``sotu``), seed 0; evaluation on the first
--eval-windows non-overlapping --eval-seqlen windows of each text; fp32 on the CPU.
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
from numprune.io.table import markdown_table
from numprune.models import load_model


def heal_settings(text: str) -> dict[str, dict | None]:
    """``none;default;lr=1e-4,loss=relative`` as {label: options}: None is unhealed, {} HealOptions' defaults."""
    settings = {}
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        if entry == "none":
            settings[entry] = None
            continue
        options = {}
        for item in entry.split(",") if entry != "default" else ():
            key, _, value = item.partition("=")
            options[key] = value if key in ("params", "loss") else (int(value) if key in ("epochs", "batch", "seed")
                                                                    else float(value))
        settings[entry] = options
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--method", default="numerical-robust")
    parser.add_argument("--calib", default="sotu-val", help="calibration text: sotu-val (addresses before 1990) to "
                        "choose on the validation texts, sotu (before 2000) for the evaluation table")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval", default="sotu-val,emails", help="texts (comma-separated)")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--heals", default="none;default", help="healing settings, ';'-separated: none, default, or "
                        "key=value,... of HealOptions")
    parser.add_argument("--timings", type=int, default=2, help="calibration passes timed (the fastest counts; on "
                        "shared cores a single timing can be far off)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = heal_settings(args.heals)

    model, tokenizer, source = load_model(None)
    tokens, calib = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    texts = args.eval.split(",")
    evals = {spec: evaluation_windows(tokenizer, spec, args.eval_seqlen, args.eval_windows) for spec in texts}

    def ppl(m):
        return {spec: round(perplexity(m, w, progress=False)["ppl"], 3) for spec, (w, _) in evals.items()}

    def calibration_pass():
        start = time.perf_counter()
        stats = numprune.calibrate(model, tokens, progress=False)
        return stats, time.perf_counter() - start

    stats, calibration_s = calibration_pass()
    for _ in range(args.timings - 1):
        calibration_s = min(calibration_s, calibration_pass()[1])
    print(f"calibration pass: {calibration_s:.1f}s on {tokens.shape[0]} x {tokens.shape[1]} tokens", flush=True)
    rows = [{"ratio": 0.0, "heal": "dense", "ppl": ppl(model)}]
    print(rows[-1], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        pruned, _ = numprune.prune(model, tokens, ratio=ratio, stats=stats, method=args.method, heal=False,
                                   progress=False)
        for label, options in settings.items():
            row = {"ratio": ratio, "heal": label}
            if options is not None:
                healed, record = numprune.heal(model, copy.deepcopy(pruned), tokens, progress=False, **options)
                row.update(heal_s=round(record.seconds, 1), passes=round(record.seconds / calibration_s, 2),
                           kept=sum(layer.kept for layer in record.layers),
                           loss=[round(layer.after / layer.before, 3) for layer in record.layers])
            else:
                healed = pruned
            row["ppl"] = ppl(healed)
            rows.append(row)
            print(row, flush=True)

    print(f"\nmodel: {source}; method {args.method}; calibration: {calib}; calibration pass {calibration_s:.1f}s")
    print("evaluation:", {spec: info for spec, (_, info) in evals.items()})
    print()
    print(markdown_table(("ratio", "healing", *texts, "time (calibration passes)", "layers kept"),
                         [(f"{row['ratio']:.0%}", row["heal"], *(f"{row['ppl'][t]:.2f}" for t in texts),
                           f"{row['passes']:.1f}" if "passes" in row else "-", row.get("kept", "-")) for row in rows]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": source, "method": args.method, "calibration": calib,
                                         "calibration_s": calibration_s, "rows": rows,
                                         "evaluation": {s: i for s, (_, i) in evals.items()}}, indent=2))


if __name__ == "__main__":
    main()
