"""Side-by-side comparison: methods x ratios x evaluation sets, calibrated once.

One calibration pass collects the statistics every criterion needs (Gram matrices, means,
variances of the output projections' inputs); each method and ratio then reuses them, so a grid
costs one calibration plus one cheap scoring/compensation/surgery per cell. A method entry is a
name with optional overrides, e.g. ``numerical-robust`` (the default method), ``numerical``, ``numerical:compensation=none``,
``numerical:compensation_stats=sequential:iterations=1`` or
``numerical:allocation=flap-widths:compensation=affine:compensation_damp=0.1:centred=true``: any
PruneOptions field or keyword option of the method's criterion, parsed by its declared type
(``PruneOptions.parse``). ``depth=N`` (with ``depth_selection``, ``depth_ridge``), recipe fields too, removes N
layers first (numprune.depth); the ratio is then the width step's, on the remaining layers, calibrated anew.

What each model is measured on is one ``Evaluation`` (``numprune.evaluate.base``): perplexity on
named texts, or an image generator's measures, whose samples of every model are drawn side by side
in ``samples.png``. The tables and the plot take their columns, formats and scales from it.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from numprune.allocate import AUTO
from numprune.api import calibrate, prune
from numprune.errors import NumpruneError
from numprune.evaluate.base import Evaluation
from numprune.extras import need
from numprune.io.output import output_folder
from numprune.io.table import markdown_table
from numprune.recipe import PruneOptions


def recipes(methods: list[str], ratios: list[float]) -> dict[tuple[str, float], PruneOptions]:
    """Every method entry at every ratio as its recipe, method by method, so that a bad entry fails before any
    work."""
    for what, items in (("method entry", [m.strip() if isinstance(m, str) else m for m in methods]),
                        ("ratio", ratios)):
        repeated = next((item for item in items if items.count(item) > 1), None)
        if repeated is not None:
            raise NumpruneError(f"{what} {repeated!r} is given twice; each cell of the grid is run once")
    return {(entry, ratio): PruneOptions.parse(entry, ratio) for entry in methods for ratio in ratios}


def run_grid(model, tokens, grid: dict[tuple[str, float], PruneOptions], evaluation: Evaluation, *,
             calibration_info: dict, batch_size: int = 8, progress: bool = True, holdout=None) -> dict:
    """Prune and measure every cell of ``grid`` (``recipes``: method entry and ratio -> its recipe); returns the
    results with their protocol.

    ``holdout`` (numprune.auto) is what the entries with the ``auto`` allocation choose on.

    Each row holds the model's figures under ``evaluation.row_key``; every model's artefact (if the
    evaluation keeps one) is under ``results["artefacts"]``, for ``write``, and not saved in results.json.
    """
    artefacts = {}

    def measured(m, name: str) -> dict:
        measurement = evaluation.measure(m)
        if measurement.artefact is not None:
            artefacts[name] = measurement.artefact
        return {evaluation.row_key: measurement.figures}

    start = time.perf_counter()
    stats = calibrate(model, tokens, batch_size, progress)
    calibration_s = time.perf_counter() - start
    rows = [{"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0, **measured(model, "dense"),
             "params": sum(p.numel() for p in model.parameters())}]
    if progress:
        _print_row(rows[0], evaluation)
    for (entry, ratio), recipe in grid.items():
        row = {"method": entry, "ratio": ratio}
        try:
            # depth first: the width step calibrates on the shallower model
            pruned, report = prune(model, tokens, recipe, stats=None if recipe.depth else stats, batch_size=batch_size,
                                   progress=False, holdout=holdout if recipe.allocation == AUTO else None)
        except NumpruneError as error:
            rows.append({**row, "error": str(error)})
            continue
        if recipe.allocation == AUTO:
            row["auto_allocation"] = report["auto_allocation"]
        row.update(achieved_ratio=report["parameters"]["achieved_ratio"],
                   params=report["parameters"]["total_after"], options=report["options"],
                   time_s=report["time_s"], **({"depth": report["depth"]} if "depth" in report else {}),
                   **measured(pruned, f"{entry} {ratio:.0%}"))
        rows.append(row)
        if progress:
            _print_row(row, evaluation)
    sweep_s = time.perf_counter() - start
    runs = sum(1 for r in rows[1:] if "error" not in r)
    return {"calibration": {**calibration_info, "tokens": int(tokens.numel())}, "evaluation": evaluation.describe(),
            "calibration_s": round(calibration_s, 2), "sweep_s": round(sweep_s, 2),
            "calibration_saved_s": round(calibration_s * max(runs - 1, 0), 2), "rows": rows, "artefacts": artefacts}


def _print_row(row: dict, evaluation: Evaluation) -> None:
    """One finished cell, as soon as it is measured (a long grid shows its results as it goes)."""
    print(f"{row['method']} @ {row['ratio']:.0%}: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                               row[evaluation.row_key].items()), flush=True)


def _cell(column, row: dict, evaluation: Evaluation) -> str:
    """A row's value in ``column``, formatted as the column says; a failed cell says why."""
    return column.format(row[evaluation.row_key][column.key]) if evaluation.row_key in row else row["error"]


def markdown(results: dict, evaluation: Evaluation) -> str:
    """results.md: one row per method and ratio, one column per figure of ``evaluation``."""
    columns = evaluation.columns()
    rows = [(row["method"], f"{row['ratio']:.0%}", f"{row['achieved_ratio']:.1%}" if "achieved_ratio" in row else "-",
             *(_cell(column, row, evaluation) for column in columns)) for row in results["rows"]]
    return markdown_table(("method", "ratio", "achieved", *(column.title for column in columns)), rows) + "\n"


def table_csv(results: dict, evaluation: Evaluation) -> str:
    columns, key = evaluation.columns(), evaluation.row_key
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "ratio", "achieved_ratio", "params", *[column.csv_header for column in columns],
                     "error"])
    for row in results["rows"]:
        writer.writerow([row["method"], row["ratio"], row.get("achieved_ratio", ""), row.get("params", ""),
                         *[row[key][column.key] if key in row else "" for column in columns], row.get("error", "")])
    return buffer.getvalue()


def plot(results: dict, evaluation: Evaluation, path: Path) -> None:
    """Each column of ``evaluation`` against ratio (on its own scale), one line per method, dense as a level."""
    matplotlib = need("matplotlib", "the plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, key = evaluation.columns(), evaluation.row_key
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4.2), squeeze=False)
    dense = results["rows"][0]
    methods = list(dict.fromkeys(r["method"] for r in results["rows"][1:]))
    for ax, column in zip(axes[0], columns):
        for method in methods:
            points = [(r["achieved_ratio"], r[key][column.key]) for r in results["rows"] if r["method"] == method
                      and key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(dense[key][column.key], color="black", linestyle="--", label="dense")
        if column.log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("removed share of attention+MLP parameters")
        ax.set_ylabel(column.axis_label)
        ax.set_title(column.title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RESULTS_NAME = "results.json"


def write(results: dict, evaluation: Evaluation, out: Path, overwrite: bool, inputs=()) -> Path:
    """results.json, results.csv, results.md, the evaluation's plot and its artefacts' files (an image
    generator: every model's samples side by side), written atomically into ``out`` (never over ``inputs``)."""
    with output_folder(out, overwrite=overwrite, inputs=inputs, marker=RESULTS_NAME) as tmp:
        saved = {k: v for k, v in results.items() if k != "artefacts"}
        (tmp / RESULTS_NAME).write_text(json.dumps(saved, indent=2) + "\n")
        (tmp / "results.csv").write_text(table_csv(results, evaluation))
        (tmp / "results.md").write_text(markdown(results, evaluation))
        plot(results, evaluation, tmp / evaluation.plot_name)
        evaluation.write_artefacts(results["artefacts"], tmp)
    return Path(out)
