"""Perplexity of SmolLM2 pruned by numerical pruning at several ratios, with and without compensation.

Calibrates once (the statistics are reused for every ratio), then prunes and evaluates. Prints a
markdown table and writes JSON. Usage:

    .venv/bin/python benchmarks/smollm2_ppl.py --json runs/smollm2_ppl.json

Protocol (defaults): calibration on 128 windows of 512 tokens from the State of the Union addresses
before 2000 (seed 0); evaluation on the first 16 non-overlapping 512-token windows of the addresses
from 2000 on and of Moby-Dick; no special tokens; fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numprune
from numprune.data.corpora import calibration_windows, evaluation_windows
from numprune.evaluate.perplexity import perplexity
from numprune.io.table import markdown_table
from numprune.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--variants", default="least-squares,none,sequential",
                        help="least-squares (dense statistics), none (no compensation), sequential")
    parser.add_argument("--allocation", default="global")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer, source = load_model(None)
    tokens, calib = calibration_windows(tokenizer, "sotu", args.nsamples, args.seqlen, seed=0)
    evals = {spec: evaluation_windows(tokenizer, spec, args.eval_seqlen, args.eval_windows)
             for spec in ("sotu", "moby-dick")}

    def ppl(m):
        return {spec: round(perplexity(m, w, progress=False)["ppl"], 3) for spec, (w, _) in evals.items()}

    rows = [{"method": "dense", "ratio": 0.0, "ppl": ppl(model)}]
    start = time.perf_counter()
    stats = numprune.calibrate(model, tokens)
    calibration_s = time.perf_counter() - start
    variants = {"least-squares": {}, "none": {"compensation": "none"},
                "sequential": {"compensation_stats": "sequential"}}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name in args.variants.split(","):
            pruned, report = numprune.prune(model, tokens, ratio=ratio, stats=stats, progress=False, heal=False,
                                            allocation=args.allocation, **variants[name])
            rows.append({"method": f"numerical, {args.allocation}, {name}", "ratio": ratio,
                         "achieved_ratio": round(report["parameters"]["achieved_ratio"], 4),
                         "params": report["parameters"]["total_after"], "time_s": report["time_s"],
                         "ppl": ppl(pruned)})
            print(rows[-1], flush=True)

    print(f"\nmodel: {source}; calibration: {calib}; calibration pass {calibration_s:.1f}s")
    print("evaluation:", {spec: info for spec, (_, info) in evals.items()})
    print()
    print(markdown_table(("method", "ratio", "achieved", "SOTU >= 2000", "Moby-Dick"),
                         [(row["method"], f"{row['ratio']:.0%}", f"{row.get('achieved_ratio', 0):.1%}",
                           f"{row['ppl']['sotu']:.2f}", f"{row['ppl']['moby-dick']:.2f}") for row in rows]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": source, "calibration": calib, "calibration_s": calibration_s,
                                         "evaluation": {s: i for s, (_, i) in evals.items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
