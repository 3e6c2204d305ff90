"""Side-by-side comparison: methods x ratios x evaluation sets, calibrated once.

One calibration pass collects the statistics every criterion needs (Gram matrices, means,
variances of the output projections' inputs); each method and ratio then reuses them, so a grid
costs one calibration plus one cheap scoring/compensation/surgery per cell. A method entry is a
name with optional overrides, e.g. ``numerical``, ``numerical:compensation=none``,
``numerical:compensation_stats=sequential:iterations=1`` or
``numerical:allocation=flap-widths:compensation=affine:compensation_damp=0.1:centred=true``: any
PruneOptions field or keyword option of the method's criterion, parsed by its declared type
(``PruneOptions.parse``).

On an image generator the columns are image measures (``numprune.evaluate.image``) instead of
perplexities, and each model's samples are kept for one side-by-side picture, ``samples.png``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

from numprune.api import calibrate, prune
from numprune.errors import NumpruneError
from numprune.evaluate.perplexity import perplexity
from numprune.image.grid import by_class, grid_image, save_png, side_by_side
from numprune.io.output import output_folder
from numprune.io.table import markdown_table
from numprune.recipe import PruneOptions

IMAGE_MEASURES = {"frechet_distance": "Fréchet distance", "class_accuracy": "class accuracy",
                  "heldout_nll": "held-out NLL"}
GRID_COLUMNS = 8  # samples per class shown in samples.png


def recipes(methods: list[str], ratios: list[float]) -> dict[tuple[str, float], PruneOptions]:
    """Every method entry at every ratio as checked options, so that a bad entry fails before any work."""
    return {(entry, ratio): PruneOptions.parse(entry, ratio) for entry in methods for ratio in ratios}


def run_grid(model, tokens, methods: list[str], ratios: list[float], eval_sets: dict, *, calibration_info: dict,
             batch_size: int = 8, progress: bool = True, images=None) -> dict:
    """Prune and evaluate every method at every ratio; returns the results with their protocol.

    ``images``, a ``DigitsEvaluator``, replaces perplexity on ``eval_sets`` with image measures and
    keeps each model's samples under ``results["samples"]`` (not saved in results.json).
    """
    checked = recipes(methods, ratios)
    samples = {}

    def evaluate(m, name: str) -> dict:
        if images is None:
            return {"ppl": {spec: perplexity(m, windows, progress=False)["ppl"]
                            for spec, (windows, _) in eval_sets.items()}}
        measures, pictures, labels = images(m)
        samples[name] = (pictures, labels)
        return {"measures": measures}

    start = time.perf_counter()
    stats = calibrate(model, tokens, batch_size, progress)
    calibration_s = time.perf_counter() - start
    rows = [{"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0, **evaluate(model, "dense"),
             "params": sum(p.numel() for p in model.parameters())}]
    if progress:
        _print_row(rows[0])
    for entry in methods:
        for ratio in ratios:
            row = {"method": entry, "ratio": ratio}
            try:
                pruned, report = prune(model, tokens, stats=stats, batch_size=batch_size, progress=False,
                                       **asdict(checked[entry, ratio]))
            except NumpruneError as error:
                rows.append({**row, "error": str(error)})
                continue
            row.update(achieved_ratio=report["parameters"]["achieved_ratio"],
                       params=report["parameters"]["total_after"], options=report["options"],
                       time_s=report["time_s"], **evaluate(pruned, f"{entry} {ratio:.0%}"))
            rows.append(row)
            if progress:
                _print_row(row)
    sweep_s = time.perf_counter() - start
    runs = sum(1 for r in rows[1:] if "error" not in r)
    evaluation = images.describe() if images is not None else {spec: info for spec, (_, info) in eval_sets.items()}
    return {"calibration": {**calibration_info, "tokens": int(tokens.numel())}, "evaluation": evaluation,
            "calibration_s": round(calibration_s, 2), "sweep_s": round(sweep_s, 2),
            "calibration_saved_s": round(calibration_s * max(runs - 1, 0), 2), "rows": rows,
            **({"samples": samples} if images is not None else {})}


def _print_row(row: dict) -> None:
    """One finished cell, as soon as it is measured (a long grid shows its results as it goes)."""
    print(f"{row['method']} @ {row['ratio']:.0%}: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                               row.get("ppl", row.get("measures")).items()), flush=True)


def _columns(results: dict) -> list[tuple[str, str, str]]:
    """``(row key, name, title)`` of each result column: perplexity per evaluation set, or the image measures."""
    if "samples" in results or any("measures" in r for r in results["rows"]):
        return [("measures", name, title) for name, title in IMAGE_MEASURES.items()]
    return [("ppl", spec, spec) for spec in results["evaluation"]]


def _cell(key: str, name: str, row: dict) -> str:
    if key not in row:
        return row["error"]
    value = row[key][name]
    return f"{value:.1%}" if name == "class_accuracy" else f"{value:.3f}" if key == "measures" else f"{value:.2f}"


def markdown(results: dict) -> str:
    """results.md: one row per method and ratio, one column per evaluation set or image measure."""
    columns = _columns(results)
    rows = [(row["method"], f"{row['ratio']:.0%}", f"{row['achieved_ratio']:.1%}" if "achieved_ratio" in row else "-",
             *(_cell(key, name, row) for key, name, _ in columns)) for row in results["rows"]]
    return markdown_table(("method", "ratio", "achieved", *(title for _, _, title in columns)), rows) + "\n"


def table_csv(results: dict) -> str:
    columns = _columns(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "ratio", "achieved_ratio", "params",
                     *[f"ppl_{name}" if key == "ppl" else name for key, name, _ in columns], "error"])
    for row in results["rows"]:
        writer.writerow([row["method"], row["ratio"], row.get("achieved_ratio", ""), row.get("params", ""),
                         *[row[key][name] if key in row else "" for key, name, _ in columns], row.get("error", "")])
    return buffer.getvalue()


def plot(results: dict, path: Path) -> None:
    """Each column (perplexity on a log scale, or an image measure) against ratio, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(results)
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4.2), squeeze=False)
    dense = results["rows"][0]
    methods = list(dict.fromkeys(r["method"] for r in results["rows"][1:]))
    for ax, (key, name, title) in zip(axes[0], columns):
        for method in methods:
            points = [(r["achieved_ratio"], r[key][name]) for r in results["rows"] if r["method"] == method
                      and key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(dense[key][name], color="black", linestyle="--", label="dense")
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("removed share of attention+MLP parameters")
        ax.set_ylabel("perplexity (log scale)" if key == "ppl" else title)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RESULTS_NAME = "results.json"


def write(results: dict, out: Path, overwrite: bool, inputs=()) -> Path:
    """results.json, results.csv, results.md and perplexity.png (an image generator: measures.png and
    samples.png, every model's samples side by side), written atomically into ``out`` (never over ``inputs``)."""
    with output_folder(out, overwrite=overwrite, inputs=inputs, marker=RESULTS_NAME) as tmp:
        saved = {k: v for k, v in results.items() if k != "samples"}
        (tmp / RESULTS_NAME).write_text(json.dumps(saved, indent=2) + "\n")
        (tmp / "results.csv").write_text(table_csv(results))
        (tmp / "results.md").write_text(markdown(results))
        plot(results, tmp / ("measures.png" if "samples" in results else "perplexity.png"))
        if "samples" in results:
            save_png(samples_picture(results["samples"], results["evaluation"]["classes"]), tmp / "samples.png")
    return Path(out)


def samples_picture(samples: dict, classes: list[int]):
    """Every model's samples as a grid (rows: classes), the grids side by side, captioned with the model."""
    per_row = min(GRID_COLUMNS, min(int((labels == c).sum()) for _, labels in samples.values() for c in classes))
    return side_by_side({name: grid_image(by_class(images, labels, classes, per_row))
                         for name, (images, labels) in samples.items()})

