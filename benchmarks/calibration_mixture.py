"""Which calibration text suits the default method: prose, the model's own samples, or both, on validation texts only.

For each calibration spec (``--calibs``; the prose is ``sotu-val``, the addresses before 1990, so that the 1990s
validation text was never calibrated on; ``self`` is the model's own samples with seed 0), one calibration pass of
``--nsamples`` x ``--seqlen`` tokens, then ``numerical-robust`` at each ratio, measured on the 1990s addresses
(``sotu-val``), SpamAssassin e-mails (``emails``) and the dense model's own samples drawn with seed 1 (``self``: a
different seed from the calibration's). With ``--heal`` each pruned model is also healed as the default heals it
(``numprune.heal`` at its defaults: distillation from the dense model on the same calibration tokens, at most one
pass and 12,288 tokens) and measured again, so the calibration text chooses what healing learns from too. Each
calibration is appended to ``--out`` (JSON lines) as it finishes and skipped when found there. ``--texts`` reads
the validation windows saved by benchmarks/auto_allocation.py or by ``--windows-out`` (the same windows, not drawn
again). Usage:

    .venv/bin/python benchmarks/calibration_mixture.py --model smollm2 --out runs/mixture-smollm2.jsonl \\
        --texts runs/auto-smollm2.windows.safetensors
    .venv/bin/python benchmarks/calibration_mixture.py --model smollm2 --nsamples 32 --heal \\
        --out runs/mixture-healed-smollm2.jsonl --windows-out runs/mixture-smollm2.windows.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from numprune.api import calibrate, prune
from numprune.data.corpora import calibration_windows, evaluation_windows
from numprune.evaluate.perplexity import perplexity
from numprune.heal import heal
from numprune.models import load_model

TEXTS = ("sotu-val", "emails", "self")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibs", default="sotu-val,self,sotu-val+self")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--texts", default=None, help="validation windows saved by benchmarks/auto_allocation.py")
    parser.add_argument("--windows-out", default=None, help="save the validation windows drawn here (for --texts)")
    parser.add_argument("--heal", action="store_true", help="also heal each pruned model as the default does")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/calibration-mixture.jsonl")
    parser.add_argument("--table", action="store_true", help="print the grid from --out and stop")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table:
        run(args, out)
    print(table(out))
    return 0


def run(args, out: Path) -> None:
    done = {json.loads(line)["calib"] for line in out.read_text().splitlines()} if out.exists() else set()
    calibs = [c for c in args.calibs.split(",") if c not in done]
    if not calibs:
        return
    model, tokenizer, source = load_model(args.model)
    torch.set_num_threads(1)  # token-by-token sampling with two threads waits on itself on busy shared cores
    if args.texts:
        saved = load_file(args.texts)
        windows = {name: saved[name][:args.eval_windows] for name in TEXTS}
    else:
        windows = {name: evaluation_windows(tokenizer, name, 512, args.eval_windows, model=model, seed=1)[0]
                   for name in TEXTS}
        if args.windows_out:
            save_file({name: w.contiguous() for name, w in windows.items()}, args.windows_out)
    for calib in calibs:
        torch.set_num_threads(1)
        start = time.perf_counter()
        tokens, info = calibration_windows(tokenizer, calib, args.nsamples, args.seqlen, 0, model=model)
        drawn_s = time.perf_counter() - start
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        stats = calibrate(model, tokens, progress=False)
        row = dict(calib=calib, model=source, drawn_s=round(drawn_s, 2),
                   calibration_s=round(time.perf_counter() - start, 2), nsamples=args.nsamples, seqlen=args.seqlen,
                   eval_windows=args.eval_windows, ratios={}, healed={}, heal_s={})
        for ratio in (float(r) for r in args.ratios.split(",")):
            pruned, _ = prune(model, tokens, stats=stats, ratio=ratio, method="numerical-robust", heal=False,
                              progress=False)
            row["ratios"][str(ratio)] = {name: perplexity(pruned, w, progress=False)["ppl"]
                                         for name, w in windows.items()}
            if args.heal:
                start = time.perf_counter()
                _, record = heal(model, pruned, tokens, progress=False)
                row["heal_s"][str(ratio)] = round(time.perf_counter() - start, 2)
                row["heal_mode"] = record.options.mode
                row["healed"][str(ratio)] = {name: perplexity(pruned, w, progress=False)["ppl"]
                                             for name, w in windows.items()}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(calib, row["ratios"], row["healed"], flush=True)


def table(out: Path) -> str:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lines = ["| calibration | ratio | healed | sotu-val | emails | self | geometric mean |",
             "|---|---|---|---|---|---|---|"]
    for ratio in rows[0]["ratios"]:
        for row in rows:
            for healed, ppl in (("no", row["ratios"][ratio]), ("yes", row.get("healed", {}).get(ratio))):
                if ppl is None:
                    continue
                geo = math.exp(sum(math.log(ppl[t]) for t in TEXTS) / len(TEXTS))
                lines.append(f"| {row['calib']} | {float(ratio):.0%} | {healed} | "
                             + " | ".join(f"{ppl[t]:.2f}" for t in TEXTS) + f" | {geo:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
