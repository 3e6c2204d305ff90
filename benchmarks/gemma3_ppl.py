"""Perplexity of Gemma 3 270M pruned by numerical pruning and by FLAP at 10-50%, calibrated once.

Gemma 3 270M is the optional second real model (`bash scripts/setup.sh --gemma3`). The protocol is
benchmarks/smollm2_ppl.py's: calibration on 128 windows of 512 tokens from the State of the Union
addresses before 2000 (seed 0); evaluation on the first 16 non-overlapping 512-token windows of the
addresses from 2000 on and of Moby-Dick; no special tokens; fp32 on the CPU. It runs
`numprune compare`, which writes results.json/.csv/.md and perplexity.png to --out. Usage:

    .venv/bin/python benchmarks/gemma3_ppl.py --out runs/gemma3

Gemma's 262,144-token vocabulary makes every evaluated token cost more in the LM head (168 M
multiply-adds) than in all 18 layers together (100 M): on 2 shared CPU cores the full protocol takes
hours; --nsamples and --eval-windows shorten it (the results page states what was run).
"""

from __future__ import annotations

import argparse

from numprune.cli import main as numprune_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="numerical,flap")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--out", default="runs/gemma3")
    args = parser.parse_args()
    return numprune_main(["compare", "--model", "gemma3-270m", "--methods", args.methods, "--ratios", args.ratios,
                          "--calib", "sotu", "--nsamples", str(args.nsamples), "--seqlen", "512", "--seed", "0",
                          "--data", "sotu,moby-dick", "--eval-seqlen", "512", "--eval-windows", str(args.eval_windows),
                          "--out", args.out, "--overwrite"])  # not --quiet: each row is printed as it finishes


if __name__ == "__main__":
    raise SystemExit(main())
