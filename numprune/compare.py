"""Side-by-side comparison: methods x ratios x evaluation sets, calibrated once.

One calibration pass collects the statistics every criterion needs (Gram matrices, means,
variances of the output projections' inputs); each method and ratio then reuses them, so a grid
costs one calibration plus one cheap scoring/compensation/surgery per cell. A method entry is a
name with optional overrides, e.g. ``numerical``, ``numerical:compensation=none`` or
``numerical:compensation_stats=sequential:iterations=1``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from numprune.api import PruneOptions, calibrate, prune
from numprune.errors import NumpruneError
from numprune.evaluate.perplexity import perplexity
from numprune.save import atomic_folder

SCORE_OPTIONS = {"lambda_rel": float, "damp": float, "iterations": int, "seed": int}
PRUNE_OPTIONS = {"allocation": str, "gqa_unit": str, "round_to": int, "compensation": str,
                 "compensation_stats": str, "compensation_damp": float}


def parse_method(entry: str) -> tuple[str, dict]:
    """``name:key=value:...`` -> (name, prune options), every value checked."""
    name, *overrides = entry.strip().split(":")
    options, score = {}, {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in PRUNE_OPTIONS | SCORE_OPTIONS:
            known = ", ".join(sorted(PRUNE_OPTIONS | SCORE_OPTIONS))
            raise NumpruneError(f"bad method option {item!r} in {entry!r}; use key=value with key in: {known}")
        cast = (PRUNE_OPTIONS | SCORE_OPTIONS)[key]
        try:
            (score if key in SCORE_OPTIONS else options)[key] = cast(value)
        except ValueError:
            raise NumpruneError(f"bad value {value!r} for {key} in {entry!r}") from None
    if score:
        options["score_options"] = score
    PruneOptions(ratio=0.5, method=name, **options).resolve()
    return name, options


def run_grid(model, tokens, methods: list[str], ratios: list[float], eval_sets: dict, *, calibration_info: dict,
             batch_size: int = 8, progress: bool = True) -> dict:
    """Prune and evaluate every method at every ratio; returns the results with their protocol."""
    parsed = [(entry, *parse_method(entry)) for entry in methods]

    def ppl(m):
        return {spec: perplexity(m, windows, progress=False)["ppl"] for spec, (windows, _) in eval_sets.items()}

    start = time.perf_counter()
    stats = calibrate(model, tokens, batch_size, progress)
    calibration_s = time.perf_counter() - start
    rows = [{"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0, "ppl": ppl(model),
             "params": sum(p.numel() for p in model.parameters())}]
    for entry, name, options in parsed:
        for ratio in ratios:
            row = {"method": entry, "ratio": ratio}
            try:
                pruned, report = prune(model, tokens, ratio=ratio, stats=stats, batch_size=batch_size,
                                       progress=False, method=name, **options)
            except NumpruneError as error:
                rows.append({**row, "error": str(error)})
                continue
            row.update(achieved_ratio=report["parameters"]["achieved_ratio"],
                       params=report["parameters"]["total_after"], options=report["options"],
                       time_s=report["time_s"], ppl=ppl(pruned))
            rows.append(row)
            if progress:
                print(f"{entry} @ {ratio:.0%}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items()), flush=True)
    sweep_s = time.perf_counter() - start
    runs = sum(1 for r in rows[1:] if "ppl" in r)
    return {"calibration": {**calibration_info, "tokens": int(tokens.numel())},
            "evaluation": {spec: info for spec, (_, info) in eval_sets.items()},
            "calibration_s": round(calibration_s, 2), "sweep_s": round(sweep_s, 2),
            "calibration_saved_s": round(calibration_s * max(runs - 1, 0), 2), "rows": rows}


def markdown(results: dict) -> str:
    specs = list(results["evaluation"])
    lines = ["| method | ratio | achieved | " + " | ".join(specs) + " |", "|---" * (3 + len(specs)) + "|"]
    for row in results["rows"]:
        cells = [f"{row['ppl'][s]:.2f}" for s in specs] if "ppl" in row else [row["error"]] * len(specs)
        achieved = f"{row['achieved_ratio']:.1%}" if "achieved_ratio" in row else "-"
        lines.append(f"| {row['method']} | {row['ratio']:.0%} | {achieved} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(results: dict) -> str:
    specs = list(results["evaluation"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "ratio", "achieved_ratio", "params", *[f"ppl_{s}" for s in specs], "error"])
    for row in results["rows"]:
        writer.writerow([row["method"], row["ratio"], row.get("achieved_ratio", ""), row.get("params", ""),
                         *[row["ppl"][s] if "ppl" in row else "" for s in specs], row.get("error", "")])
    return buffer.getvalue()


def plot(results: dict, path: Path) -> None:
    """Perplexity against ratio, log scale, one line per method, one panel per evaluation set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(results["evaluation"])
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4.2), squeeze=False)
    dense = results["rows"][0]
    methods = list(dict.fromkeys(r["method"] for r in results["rows"][1:]))
    for ax, spec in zip(axes[0], specs):
        for method in methods:
            points = [(r["achieved_ratio"], r["ppl"][spec]) for r in results["rows"] if r["method"] == method
                      and "ppl" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(dense["ppl"][spec], color="black", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("removed share of attention+MLP parameters")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(spec)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out: Path, overwrite: bool) -> Path:
    """results.json, results.csv, results.md and perplexity.png, written atomically into ``out``."""
    with atomic_folder(out, overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.csv").write_text(table_csv(results))
        (tmp / "results.md").write_text(markdown(results))
        plot(results, tmp / "perplexity.png")
    return Path(out)

