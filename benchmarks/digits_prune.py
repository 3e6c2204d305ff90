"""Image quality of the digits generator pruned by numerical pruning and by FLAP (the paper's table 3, in small).

Calibrates once on self-generated sequences (the paper's recipe for LlamaGen: images the dense
model samples for every class), prunes with both methods at every ratio from the same statistics,
and measures each model against the held-out real digits. Prints a markdown table, writes the
comparison folder (results.json/.md/.csv, measures.png, samples.png) and a copy of the samples
picture for the documentation's results page. Usage:

    .venv/bin/python benchmarks/digits_prune.py --out runs/digits-prune

The same run as ``numprune compare --model digits --methods numerical,flap --ratios 0.1,0.15,0.2,0.3
--calib-per-class 64 --eval-per-class 100``. Protocol (the command line's defaults, none tuned on
the held-out split): calibration on 64 self-generated images per class (seed 0); evaluation on 100
generated images per class (seed 1, so no calibration draw is reused) against the held-out split;
both sampled with the calibration guidance scale (``numprune.image.calibration.CALIB_CFG_SCALE``), temperature 1,
no top-k/top-p; each method with its own defaults (numerical: global allocation, least-squares
compensation; FLAP: global allocation, bias compensation); fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from numprune import compare
from numprune.evaluate.image import DigitsEvaluator, DigitsProtocol
from numprune.image.calibration import CALIB_CFG_SCALE, self_generated_calibration
from numprune.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--methods", default="numerical,flap")
    parser.add_argument("--ratios", default="0.1,0.15,0.2,0.3")
    parser.add_argument("--calib-per-class", type=int, default=64)
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--out", default="runs/digits-prune")
    parser.add_argument("--picture", default="docs/assets/digits_prune_samples.png",
                        help="where to copy samples.png (the results page shows it)")
    args = parser.parse_args()

    start = time.perf_counter()
    model, _, source = load_model(args.model)
    tokens, calib_info = self_generated_calibration(model, args.calib_per_class, cfg_scale=CALIB_CFG_SCALE, seed=0)
    generated_s = time.perf_counter() - start
    evaluator = DigitsEvaluator(DigitsProtocol(per_class=args.eval_per_class, seed=1, cfg_scale=CALIB_CFG_SCALE))
    grid = compare.recipes(args.methods.split(","), [float(r) for r in args.ratios.split(",")])
    results = compare.run_grid(model, tokens, grid, evaluator, calibration_info=calib_info, batch_size=64, progress=True)
    results["model"] = source
    out = compare.write(results, evaluator, Path(args.out), overwrite=True)
    shutil.copyfile(out / "samples.png", args.picture)
    print(compare.markdown(results, evaluator))
    print(f"model: {source}; calibration: {len(tokens)} self-generated sequences in {generated_s:.0f}s, "
          f"statistics {results['calibration_s']:.0f}s; sweep {results['sweep_s']:.0f}s; "
          f"total {time.perf_counter() - start:.0f}s")
    print(f"saved: {out}/results.json, results.md, measures.png, samples.png; picture copied to {args.picture}")


if __name__ == "__main__":
    main()
