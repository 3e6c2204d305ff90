"""Validation of the ``auto`` allocation against blend (the schedule), global, and FLAP, on validation texts only,
for several sizes of auto's held-out text at once.

One calibration per run on the addresses before 1990 (``sotu-val``, seed 0); every cell from those statistics.
``auto`` chooses among blend weights 0, 0.25, 0.5, 0.75, 1 the one with the lowest geometric mean of its held-out
perplexities. Here every weight is pruned (blend at that weight: the model auto would keep, byte for byte, tested)
and measured once on the largest held-out set (``--holdout``: that many windows of the pre-1990 text apart from the
calibration windows, and as many of the model's own samples, seed 1000, as the command line draws them); each
smaller held-out size (``--subsets``, e.g. 4x256, the command line's default) is evenly spaced windows of it, cut to
their first tokens, so auto's choice at every size is read from the same per-token losses. ``--verify`` also runs
``allocation="auto"`` itself on the first subset at the first ratio and records that its choice agrees.

The chosen models, global, the schedule's weight and FLAP are measured on the 1990s addresses (``sotu-val``),
SpamAssassin e-mails (``emails``) and the dense model's own samples (``self``, seed 1), never on the evaluation
texts. Each ratio is appended to ``--out`` (JSON lines) as it finishes and skipped when found there, so a grid can
be split over several runs; ``--table`` prints the markdown grid from that file. Usage:

    .venv/bin/python benchmarks/auto_allocation.py --model smollm2 --ratios 0.2,0.3 --out runs/auto-smollm2.jsonl
    .venv/bin/python benchmarks/auto_allocation.py --out runs/auto-smollm2.jsonl --table
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from numprune.allocate import AUTO_WEIGHTS, blend_schedule
from numprune.api import calibrate, prune
from numprune.auto import holdout_windows
from numprune.data.corpora import calibration_windows, evaluation_windows
from numprune.evaluate.perplexity import perplexity
from numprune.models import load_model

TEXTS = ("sotu-val", "emails", "self")
ADOPTION_MARGIN = 0.02  # the rule: no validation cell more than 2% worse than the better of blend and global


def size(spec: str) -> tuple[int, int]:
    windows, length = spec.lower().split("x")
    return int(windows), int(length)


@torch.inference_mode()
def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Every next-token loss [windows, length - 1] in float64, one window at a time."""
    rows = []
    for row in windows:
        logits = model(row[None], use_cache=False).logits[0, :-1].float()
        rows.append(torch.nn.functional.cross_entropy(logits, row[1:], reduction="none").double())
    return torch.stack(rows)


def subset_score(losses: dict[str, torch.Tensor], spec: str) -> dict:
    """Held-out perplexities on ``spec``'s windows (evenly spaced, first tokens) and their geometric mean."""
    count, length = size(spec)
    ppl = {}
    for name, nll in losses.items():
        index = torch.linspace(0, len(nll) - 1, count).round().long()
        ppl[name] = math.exp(nll[index, :length - 1].mean().item())
    return {"perplexities": ppl, "score": math.exp(sum(math.log(p) for p in ppl.values()) / len(ppl))}


def measure(model, windows: dict) -> dict:
    return {name: perplexity(model, w, progress=False)["ppl"] for name, w in windows.items()}


def run(args) -> None:
    out = Path(args.out)
    done = {json.loads(line)["ratio"] for line in out.read_text().splitlines() if '"ratio"' in line} \
        if out.exists() else set()
    ratios = [r for r in (float(x) for x in args.ratios.split(",")) if r not in done]
    if not ratios:
        print("every ratio is in", out)
        return
    subsets = args.subsets.split(",")
    count, length = size(args.holdout)
    assert all(size(s)[0] <= count and size(s)[1] <= length for s in subsets), "a subset larger than --holdout"

    model, tokenizer, source = load_model(args.model)
    tokens, calib_info = calibration_windows(tokenizer, "sotu-val", args.nsamples, args.seqlen, 0)
    cache = out.with_suffix(".windows.safetensors")  # the sampled texts, drawn once for a grid split over runs
    torch.set_num_threads(1)  # token-by-token sampling with two threads waits on itself on busy shared cores
    start = time.perf_counter()
    if cache.exists():
        saved = load_file(cache)
        holdout = {k.split("/", 1)[1]: (v, {}) for k, v in saved.items() if k.startswith("holdout/")}
        windows = {name: saved[name] for name in TEXTS}
    else:
        holdout = holdout_windows(model, tokenizer, "sotu-val", args.nsamples, args.seqlen, 0, windows=count,
                                  length=length)
        windows = {name: evaluation_windows(tokenizer, name, 512, args.eval_windows, model=model, seed=1)[0]
                   for name in TEXTS}
        save_file({**windows, **{f"holdout/{k}": w for k, (w, _) in holdout.items()}}, cache)
    holdout_s = time.perf_counter() - start
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    stats = calibrate(model, tokens, progress=False)
    calibration_s = time.perf_counter() - start
    if not out.exists():
        dense = measure(model, windows)
        write(out, dict(model=source, calibration=calib_info, calibration_s=round(calibration_s, 2),
                        holdout={k: {kk: vv for kk, vv in info.items() if kk != "starts"}
                                 for k, (_, info) in holdout.items()}, texts_s=round(holdout_s, 2),
                        dense=dense, eval_windows=args.eval_windows, threads=args.threads))
    print(f"{source}: calibration {calibration_s:.1f}s, texts drawn or read {holdout_s:.1f}s", flush=True)

    for ratio in ratios:
        cell = dict(ratio=ratio, schedule=blend_schedule(ratio), calibration_s=round(calibration_s, 2), weights={})
        losses, models = {}, {}
        for weight in AUTO_WEIGHTS:
            start = time.perf_counter()
            pruned, _ = prune(model, tokens, stats=stats, ratio=ratio, method="numerical-robust", allocation="blend",
                              heal=False, blend_weight=weight, progress=False)
            prune_s = time.perf_counter() - start
            start = time.perf_counter()
            losses[weight] = {name: token_nll(pruned, w) for name, (w, _) in holdout.items()}
            models[weight] = pruned  # kept for the validation texts, if chosen (pruning again costs more)
            cell["weights"][weight] = dict(prune_s=round(prune_s, 2), holdout_s=round(time.perf_counter() - start, 2),
                                           holdout={s: subset_score(losses[weight], s)
                                                    for s in [args.holdout, *subsets]})
        cell["choice"] = {s: min(AUTO_WEIGHTS, key=lambda w: cell["weights"][w]["holdout"][s]["score"])
                          for s in [args.holdout, *subsets]}
        for weight in sorted({1.0, cell["schedule"], *cell["choice"].values()}):
            cell["weights"][weight]["validation"] = measure(models[weight], windows)
        del models
        pruned, _ = prune(model, tokens, stats=stats, ratio=ratio, method="flap", progress=False)
        cell["flap"] = measure(pruned, windows)
        if args.verify and ratio == ratios[0]:
            cell["verified"] = verify(model, tokens, stats, ratio, holdout, subsets[0], cell["choice"][subsets[0]])
        write(out, {**cell, "weights": {str(w): v for w, v in cell["weights"].items()}})
        print(f"{ratio:.0%}: choices {cell['choice']} (schedule {cell['schedule']:g}); " + "; ".join(
            f"w={w:g}: " + "/".join(f"{v:.2f}" for v in row["validation"].values())
            for w, row in cell["weights"].items() if "validation" in row)
            + "; flap " + "/".join(f"{v:.2f}" for v in cell["flap"].values()), flush=True)


def verify(model, tokens, stats, ratio: float, holdout: dict, spec: str, expected: float) -> dict:
    """auto itself on ``spec``'s held-out windows: its choice, its time, and whether the choice is the one read here."""
    count, length = size(spec)
    held = {}
    for name, (w, info) in holdout.items():
        held[name] = (w[torch.linspace(0, len(w) - 1, count).round().long(), :length], info)
    _, report = prune(model, tokens, stats=stats, ratio=ratio, method="numerical-robust", allocation="auto", heal=False,
                      holdout=held, progress=False)
    chosen = report["auto_allocation"]["chosen_blend_weight"]
    return dict(holdout=spec, chosen=chosen, agrees=chosen == expected, auto_s=report["time_s"]["auto"])


def write(out: Path, row: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def table(path: str) -> str:
    """Per ratio and text: FLAP, global, the schedule, auto at each held-out size; the adoption test per size."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    meta, cells = rows[0], sorted(rows[1:], key=lambda c: c["ratio"])
    specs = list(cells[0]["choice"])
    lines = [f"{meta['model']}; dense " + " / ".join(f"{v:.2f}" for v in meta["dense"].values())
             + f"; calibration {meta['calibration_s']:.0f}s", "",
             "| ratio | flap | global (w = 1) | blend (schedule) | " + " | ".join(f"auto, {s}" for s in specs)
             + " | " + " | ".join(f"auto {s} vs best of blend/global" for s in specs) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(specs))]
    passed = {s: True for s in specs}
    for c in cells:
        weights = c["weights"]

        def fig(w, weights=weights):
            return " / ".join(f"{v:.2f}" for v in weights[str(w)]["validation"].values())
        best = {t: min(weights["1.0"]["validation"][t], weights[str(float(c["schedule"]))]["validation"][t])
                for t in TEXTS}
        gaps = []
        for s in specs:
            chosen = weights[str(float(c["choice"][s]))]["validation"]
            gap = [chosen[t] / best[t] - 1 for t in TEXTS]
            passed[s] &= all(g <= ADOPTION_MARGIN for g in gap) and all(chosen[t] < c["flap"][t] for t in TEXTS)
            gaps.append(" / ".join(f"{g:+.1%}" for g in gap))
        lines.append(f"| {c['ratio']:.0%} | {' / '.join(f'{v:.2f}' for v in c['flap'].values())} | {fig(1.0)} | "
                     f"{fig(float(c['schedule']))} (w = {c['schedule']:g}) | "
                     + " | ".join(f"{fig(float(c['choice'][s]))} (w = {c['choice'][s]:g})" for s in specs)
                     + " | " + " | ".join(gaps) + " |")
    lines.append("")
    lines.append("adoption rule (no cell > 2% worse than the better of blend/global, better than FLAP everywhere): "
                 + ", ".join(f"{s} {'passes' if ok else 'fails'}" for s, ok in passed.items()))
    for c in cells:
        costs = {s: (sum(w["prune_s"] for w in c["weights"].values())
                     + 6 * sum(w["holdout_s"] for w in c["weights"].values()) / 5
                     * (size(s)[0] * size(s)[1]) / (size(specs[0])[0] * size(specs[0])[1])) / c["calibration_s"]
                 for s in specs}
        lines.append(f"{c['ratio']:.0%}: held-out scores " + "; ".join(
            f"{s}: " + ", ".join(f"w={w}: {row['holdout'][s]['score']:.2f}" for w, row in c["weights"].items())
            for s in specs) + "; auto's time, estimated, x calibration: "
            + ", ".join(f"{s} {v:.2f}" for s, v in costs.items())
            + (f"; verified: {c['verified']}" if "verified" in c else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4, help="validation windows of 512 tokens per text")
    parser.add_argument("--holdout", default="8x512", help="the largest held-out set: windows x tokens, of the "
                        "calibration text's free passages and of the model's own samples each")
    parser.add_argument("--subsets", default="4x256,8x256", help="smaller held-out sizes read from the largest")
    parser.add_argument("--verify", action="store_true", help="run auto itself on the first subset at the first ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/auto-allocation.jsonl")
    parser.add_argument("--table", action="store_true", help="print the grid from --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return 0
    run(args)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
