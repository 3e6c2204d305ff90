"""SmolLM2 in llama.cpp: depth, width and depth + width at equal removed shares, decode speed against perplexity.

Two steps, so each holds the CPU lock for a few minutes only:

    flock /tmp/numprune-cpu.lock .venv/bin/python benchmarks/depth_speed.py build --out runs/depth-speed
    flock /tmp/numprune-cpu.lock .venv/bin/python benchmarks/depth_speed.py bench --out runs/depth-speed

``build`` saves, under ``--out``, for each share of the attention+MLP parameters (SmolLM2's 30 layers
are equal, so 10/20/30/50% are 3/6/9/15 layers): ``depth`` (layers removed by ``numprune.prune``
with ``--depth-selection``, ``scattered`` from ``--scattered-from`` of the layers on), ``width``
(``numerical-robust``, one dense calibration) and, at
``--split-shares``, ``depthK+width`` (K = half the layers of the share, then width up to the share).
``bench`` exports each folder to f16 and q8_0 GGUF and times it in llama.cpp (numprune.export.llamacpp.bench:
batch 1, rounds that visit every file once, median), with llama.cpp's perplexity on a validation text;
it writes ``llama_cpp.json``, ``pareto.json`` (one point per model and type) and ``pareto.png``
(perplexity against decode speed-up, each kind's points joined in share order), and prints, for each
depth + width point, the width-alone points it dominates and those that dominate it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib
from transformers import AutoTokenizer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numprune  # noqa: E402
from numprune.adapters import adapter_for  # noqa: E402
from numprune.data.assets import smollm2_folder  # noqa: E402
from numprune.data.corpora import calibration_windows, evaluation_windows  # noqa: E402
from numprune.depth import SELECTIONS  # noqa: E402
from numprune.export import llamacpp  # noqa: E402
from numprune.models import load_model  # noqa: E402
from numprune.save import save_pruned  # noqa: E402

QUANTS = ("f16", "q8_0")


def build(args) -> None:
    model, tokenizer, _ = load_model("smollm2")
    layers = adapter_for(model).num_layers()
    tokens, _ = calibration_windows(tokenizer, "sotu", args.nsamples, args.seqlen, seed=0)
    dense_stats = numprune.calibrate(model, tokens, progress=False)
    shares = [float(s) for s in args.shares.split(",")]
    for share in shares:
        depth = round(share * layers)
        built = {"depth": numprune.prune(model, tokens, ratio=0, depth=depth,
                                         depth_selection=selection(args, depth / layers), progress=False),
                 "width": numprune.prune(model, tokens, ratio=share, stats=dense_stats, method="numerical-robust",
                                         heal=False, progress=False)}
        if share in [float(s) for s in args.split_shares.split(",") if s]:
            split = depth // 2
            width_share = 1 - (1 - share) * layers / (layers - split)
            built[f"depth{split}+width"] = numprune.prune(model, tokens, ratio=width_share, depth=split,
                                                          depth_selection=selection(args, split / layers),
                                                          method="numerical-robust", progress=False)
        for kind, (pruned, report) in built.items():
            save_pruned(pruned, tokenizer, report, args.out / f"{kind}-{share:g}", overwrite=True)
            print(f"{kind}-{share:g}: {adapter_for(pruned).num_layers()} layers, "
                  f"achieved {report['parameters']['achieved_ratio']:.3f}", flush=True)


def selection(args, layer_share: float) -> str:
    return "scattered" if layer_share >= args.scattered_from else args.depth_selection


def bench(args) -> None:
    dense = smollm2_folder()
    folders = sorted((p for p in args.out.iterdir() if (p / "config.json").exists()),
                     key=lambda p: (float(p.name.rsplit("-", 1)[1]), p.name))
    models = [("dense", dense), *((p.name, p) for p in folders)]
    windows, info = evaluation_windows(AutoTokenizer.from_pretrained(dense), args.ppl_text, args.ppl_seqlen,
                                       args.ppl_windows)
    with tempfile.TemporaryDirectory(prefix="depth-speed-") as workdir:
        results = llamacpp.bench(models, QUANTS, workdir=workdir, windows=windows, repeats=args.repeats)
    results["perplexity_text"] = {"name": args.ppl_text, **info}
    (args.out / "llama_cpp.json").write_text(json.dumps(results, indent=2) + "\n")
    print(llamacpp.format_table(results))
    points = [{"model": r["model"], "kind": kind(r["model"]), "quant": r["quant"],
               "decode_speedup": r["vs_reference"]["decode_speedup"],
               "prefill_speedup": r["vs_reference"]["prefill_speedup"],
               "parameter_ratio": r["vs_reference"]["parameter_ratio"], "ppl": r["perplexity"]["ppl"]}
              for r in results["runs"]]
    (args.out / "pareto.json").write_text(json.dumps({"perplexity_text": results["perplexity_text"],
                                                      "points": points}, indent=2) + "\n")
    for line in dominance(points):
        print(line)
    plot(points, args.out / "pareto.png", args.ppl_text)


def kind(name: str) -> str:
    return "dense" if name == "dense" else "depth+width" if "+" in name else name.rsplit("-", 1)[0]


def dominance(points: list[dict]) -> list[str]:
    """For each depth + width point: the width-alone points (same type) it dominates (at least as fast, lower
    perplexity) and those that dominate it."""
    lines = []
    for p in (p for p in points if p["kind"] == "depth+width"):
        widths = [w for w in points if w["quant"] == p["quant"] and w["kind"] == "width"]
        beats = [w["model"] for w in widths if p["decode_speedup"] >= w["decode_speedup"] and p["ppl"] < w["ppl"]]
        beaten = [w["model"] for w in widths if w["decode_speedup"] >= p["decode_speedup"] and w["ppl"] < p["ppl"]]
        lines.append(f"{p['model']} {p['quant']}: decode {p['decode_speedup']:.2f}x, ppl {p['ppl']:.2f}; dominates "
                     f"{', '.join(beats) or 'no width point'}; dominated by {', '.join(beaten) or 'no width point'}")
    return lines


def plot(points: list[dict], path: Path, text: str) -> None:
    figure, panels = plt.subplots(1, len(QUANTS), figsize=(12, 5), sharey=True)
    for axes, quant in zip(panels, QUANTS):
        for name in ("width", "depth", "depth+width"):
            series = [(p["decode_speedup"], p["ppl"]) for p in points if p["quant"] == quant and p["kind"] == name]
            if series:
                axes.plot(*zip(*series), marker="o", linestyle="-" if name != "depth+width" else ":", label=name)
        dense = [p for p in points if p["quant"] == quant and p["kind"] == "dense"]
        axes.scatter([1.0], [dense[0]["ppl"]], marker="*", s=120, color="black", label="dense")
        axes.set_title(f"llama.cpp {quant}")
        axes.set_xlabel("decode speed-up, batch 1 (x dense)")
        axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel(f"perplexity, {text} (llama.cpp)")
    panels[0].legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("build", "bench"))
    p.add_argument("--out", type=Path, default=Path("runs/depth-speed"))
    p.add_argument("--shares", default="0.1,0.2,0.3,0.5", help="removed shares of attention+MLP parameters")
    p.add_argument("--split-shares", default="0.3,0.5", help="shares also built as depth (half the layers) + width")
    p.add_argument("--depth-selection", default="patched", choices=SELECTIONS)
    p.add_argument("--scattered-from", type=float, default=0.3,
                   help="share of the layers from which depth steps use the scattered selection instead")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timing rounds over every file (default 3)")
    p.add_argument("--ppl-text", default="sotu-val", help="validation text for the perplexity axis")
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-seqlen", type=int, default=512)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build(args) if args.step == "build" else bench(args)


if __name__ == "__main__":
    main()
