"""SmolLM2 at equal removed parameters: depth + patch vs plain layer removal (ShortGPT) vs width vs depth + width.

SmolLM2-135M has 30 equal layers, so removing n layers removes n/30 of the attention+MLP
parameters: 10/20/30/50% are 3/6/9/15 layers. For each share the benchmark builds:

- ``depth+patch``: the span of n consecutive layers whose least-squares patch leaves the least
  calibration error, patched (numprune.depth), at the ridge with the best validation perplexity;
- ``shortgpt``: ShortGPT's n least influential layers, no patch (from the same statistics);
- ``scattered``: the same layers, each run of consecutive ones patched in the layer before it (ridge 1);
- ``width``: ``numerical-robust`` at the share (statistics of the dense model, reused);
- ``depth+width`` (at ``--split-shares``): n // 2 layers by depth + patch (the ridge chosen for n layers), then
  ``numerical-robust`` on the rest up to the share.

The patch's ridge is chosen per depth among ``--ridges`` by the mean log-perplexity on the validation
texts (sotu-val, emails) only; the evaluation texts (SOTU >= 2000, Moby-Dick) are measured once per
model for the table. ``--speed`` also times greedy decoding in transformers (batch 1) for the pareto
plot; ``--save`` writes every model folder for benchmarks/llama_cpp_speed.py. Usage:

    flock /tmp/numprune-cpu.lock .venv/bin/python benchmarks/depth_ppl.py --speed --out runs/depth

Writes ``depth_ppl.json`` and ``pareto.png`` (perplexity on SOTU >= 2000 against decode speed-up) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numprune  # noqa: E402
from numprune.adapters import adapter_for  # noqa: E402
from numprune.bench import measure  # noqa: E402
from numprune.data.corpora import calibration_windows, evaluation_windows  # noqa: E402
from numprune.depth import DEFAULT_RIDGE, choose, collect_depth_stats, remove_scattered, without_layers  # noqa: E402
from numprune.evaluate.perplexity import perplexity  # noqa: E402
from numprune.io.table import markdown_table  # noqa: E402
from numprune.models import load_model  # noqa: E402
from numprune.save import save_pruned  # noqa: E402

VALIDATION, EVALUATION = ("sotu-val", "emails"), ("sotu", "moby-dick")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shares", default="0.1,0.2,0.3,0.5", help="removed shares of attention+MLP parameters")
    p.add_argument("--split-shares", default="0.3,0.5", help="shares also run as depth (n // 2 layers) + width")
    p.add_argument("--ridges", default="0.001,0.01,0.1,1", help="patch ridges tried on the validation texts")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--speed", action="store_true", help="also time greedy decoding in transformers (batch 1)")
    p.add_argument("--save", action="store_true", help="save every model folder under --out (for llama.cpp)")
    p.add_argument("--out", type=Path, default=Path("runs/depth"))
    p.add_argument("--model", default="smollm2", help="a model folder (default: the embedded SmolLM2)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, source = load_model(args.model)
    layers = adapter_for(model).num_layers()
    tokens, calib = calibration_windows(tokenizer, "sotu", args.nsamples, args.seqlen, seed=0)
    texts = {name: evaluation_windows(tokenizer, name, args.eval_seqlen, args.eval_windows)
             for name in (*VALIDATION, *EVALUATION)}

    def ppl(m, names) -> dict:
        return {name: perplexity(m, texts[name][0], progress=False)["ppl"] for name in names}

    rows, ridges = [], {}

    def record(name: str, share: float, m, report: dict | None, extra: dict) -> None:
        row = {"model": name, "share": share, "layers": adapter_for(m).num_layers(),
               "parameters": sum(t.numel() for t in m.parameters()),
               "achieved": report["parameters"]["achieved_ratio"] if report else 0.0,
               "ppl": ppl(m, (*VALIDATION, *EVALUATION)), **extra}
        if args.speed:
            timed = measure(m, batch_size=1, prompt_len=64, new_tokens=64, repeats=3)
            row["decode_tokens_per_s"], row["prefill_tokens_per_s"] = (timed["decode"]["tokens_per_s"],
                                                                       timed["prefill"]["tokens_per_s"])
        if args.save and "method" in (report or {}):
            save_pruned(m, tokenizer, report, args.out / f"{name}-{share:g}", overwrite=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def save(elapsed: float | None = None) -> None:  # after every row: a run cut short keeps what it measured
        result = {"model": source, "calibration": calib, "evaluation": {n: info for n, (_, info) in texts.items()},
                  "ridges": ridges, "rows": rows, "wall_s": elapsed}
        (args.out / "depth_ppl.json").write_text(json.dumps(result, indent=2) + "\n")

    start = time.perf_counter()
    record("dense", 0.0, model, None, {})
    dense_stats = numprune.calibrate(model, tokens, progress=False)
    for share in [float(s) for s in args.shares.split(",")]:
        depth = round(share * layers)
        stats = collect_depth_stats(model, tokens, depth, progress=False)
        # the ridge: best mean validation log-perplexity of the patched model
        tried = {}
        for ridge in [float(r) for r in args.ridges.split(",")]:
            rec, weight = choose(adapter_for(model), stats, "patched", ridge)
            patched = without_layers(model, rec.removed_layers, (rec.patched_layer, weight))
            tried[ridge] = ppl(patched, VALIDATION)
        ridge = min(tried, key=lambda r: sum(math.log(v) for v in tried[r].values()))
        ridges[depth] = {"chosen": ridge, "validation": {str(r): v for r, v in tried.items()}}
        print(json.dumps({"depth": depth, **ridges[depth]}), flush=True)

        rec, weight = choose(adapter_for(model), stats, "patched", ridge)
        shallow = without_layers(model, rec.removed_layers, (rec.patched_layer, weight))
        record("depth+patch", share, shallow, {"parameters": {"achieved_ratio": depth / layers}},
               {"depth": rec.to_json()})
        rec, _ = choose(adapter_for(model), stats, "shortgpt", 0.0)
        plain = without_layers(model, rec.removed_layers)
        record("shortgpt", share, plain, {"parameters": {"achieved_ratio": depth / layers}},
               {"depth": rec.to_json()})
        scattered, patched, errors = remove_scattered(model, tokens, rec.removed_layers, DEFAULT_RIDGE, progress=False)
        record("scattered", share, scattered, {"parameters": {"achieved_ratio": depth / layers}},
               {"depth": {"removed_layers": rec.removed_layers, "patched_layers": patched, "patch_errors": errors}})
        del stats, shallow, plain, scattered
        narrow, report = numprune.prune(model, tokens, ratio=share, stats=dense_stats, method="numerical-robust", heal=False,
                                        progress=False)
        record("width", share, narrow, report, {})
    for share in [float(s) for s in args.split_shares.split(",") if s]:  # last: the table's core comes first
        depth = round(share * layers)
        split = depth // 2
        width_share = 1 - (1 - share) * layers / (layers - split)
        both, report = numprune.prune(model, tokens, ratio=width_share, depth=split,
                                      depth_ridge=ridges.get(depth, {}).get("chosen", DEFAULT_RIDGE),
                                      method="numerical-robust", progress=False)
        record(f"depth{split}+width", share, both, report, {"depth": report["depth"], "width_share": width_share})
    elapsed = time.perf_counter() - start

    save(elapsed)
    headers = ("model", "share", "layers", "achieved", *VALIDATION, *EVALUATION,
               *(("decode x", "prefill x") if args.speed else ()))
    dense = rows[0]
    table = [(r["model"], f"{r['share']:.0%}", r["layers"], f"{r['achieved']:.1%}",
              *(f"{r['ppl'][n]:.2f}" for n in (*VALIDATION, *EVALUATION)),
              *((f"{r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}",
                 f"{r['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}") if args.speed else ()))
             for r in rows]
    print(markdown_table(headers, table))
    print(f"calibration {calib}; wall {elapsed:.0f}s; ridges {json.dumps(ridges)}")
    if args.speed:
        plot(rows, args.out / "pareto.png")


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity on SOTU >= 2000 against decode speed-up in transformers, one marker style per kind of model."""
    dense = rows[0]
    figure, axes = plt.subplots(figsize=(7, 5))
    def kind(name: str) -> str:
        return "depth+width" if "width" in name and name != "width" else name

    for name in sorted({kind(r["model"]) for r in rows[1:]}):
        points = sorted((r["decode_tokens_per_s"] / dense["decode_tokens_per_s"], r["ppl"]["sotu"])
                        for r in rows[1:] if kind(r["model"]) == name)
        axes.plot(*zip(*points), marker="o", label=name)
    axes.scatter([1.0], [dense["ppl"]["sotu"]], marker="*", s=120, color="black", label="dense")
    axes.set_xlabel("decode speed-up, transformers, batch 1 (x dense)")
    axes.set_ylabel("perplexity, SOTU >= 2000")
    axes.set_yscale("log")
    axes.legend()
    axes.grid(True, alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
