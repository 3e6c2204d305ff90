"""The evaluation seam: an Evaluation written here, outside numprune, plugs into compare's grid, tables, plot and
folder as its own columns with its own formats, without a line of compare.py knowing it."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokens

from numprune import compare
from numprune.api import prune
from numprune.evaluate.base import Column, Evaluation, Measurement

METHODS, RATIOS = ["magnitude", "numerical:compensation=none"], [0.3]


class NextTokenAccuracy(Evaluation):
    """A held-out accuracy as a newcomer would add it: top-1 next-token accuracy and mean NLL on fixed windows."""

    row_key = "accuracy"
    report_key = "next_token_accuracy"
    plot_name = "accuracy.png"
    artefact_names = ("predictions.txt",)

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def describe(self) -> dict:
        return {"windows": list(self.windows.shape)}

    def columns(self) -> list[Column]:
        return [Column("top1", "top-1 accuracy", ".1%"),
                Column("nll", "mean NLL", ".4f", csv_name="nll_nats", quantity="nats per token", log_scale=True)]

    @torch.no_grad()
    def measure(self, model) -> Measurement:
        predicted = model(self.windows).logits[:, :-1].argmax(-1)
        top1 = (predicted == self.windows[:, 1:]).double().mean().item()
        nll = model(self.windows, labels=self.windows).loss.item()
        return Measurement({"top1": top1, "nll": nll}, artefact=predicted)

    def summary(self, dense: dict, pruned: dict) -> list[str]:
        return [f"top-1 {dense['top1']:.1%} -> {pruned['top1']:.1%}"]

    def write_artefacts(self, artefacts: dict, folder) -> None:
        (folder / "predictions.txt").write_text("".join(f"{name}: {p.flatten().tolist()}\n"
                                                        for name, p in artefacts.items()))


@torch.no_grad()
def figures_of(model, windows: torch.Tensor) -> dict:
    """The two figures computed here, apart from the evaluation: argmax hits counted and transformers' own loss."""
    logits = model(windows).logits
    hits = sum(int(logits[i, t].argmax() == windows[i, t + 1]) for i in range(len(windows))
               for t in range(windows.shape[1] - 1))
    return {"top1": hits / (len(windows) * (windows.shape[1] - 1)), "nll": model(windows, labels=windows).loss.item()}


@pytest.fixture(scope="module")
def grid():
    model, tokens, windows = tiny_llama("gqa"), tiny_tokens(), tiny_tokens(n=3, length=12, seed=7)
    evaluation = NextTokenAccuracy(windows)
    options = compare.recipes(METHODS, RATIOS)
    results = compare.run_grid(model, tokens, options, evaluation, calibration_info={}, progress=False)
    pruned = {entry: prune(model, tokens, options[entry, RATIOS[0]], progress=False)[0] for entry in METHODS}
    return model, windows, evaluation, results, pruned


def test_every_row_holds_the_evaluations_figures_of_its_model(grid):
    model, windows, _, results, pruned = grid
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["dense", *METHODS]
    assert rows[0]["accuracy"] == pytest.approx(figures_of(model, windows), rel=1e-6)
    for row in rows[1:]:
        assert row["accuracy"] == pytest.approx(figures_of(pruned[row["method"]], windows), rel=1e-6)
    assert results["evaluation"] == {"windows": [3, 12]}
    assert list(results["artefacts"]) == ["dense", *(f"{m} 30%" for m in METHODS)]


def test_markdown_and_csv_show_the_evaluations_columns_in_its_formats(grid):
    _, _, evaluation, results, _ = grid
    rows = results["rows"]
    expected = ["| method | ratio | achieved | top-1 accuracy | mean NLL |", "|---|---|---|---|---|"]
    for r in rows:
        expected.append(f"| {r['method']} | {round(100 * r['ratio'])}% | {100 * r['achieved_ratio']:.1f}% | "
                        f"{100 * r['accuracy']['top1']:.1f}% | {r['accuracy']['nll']:.4f} |")
    assert compare.markdown(results, evaluation) == "\n".join(expected) + "\n"
    table = list(csv.reader(io.StringIO(compare.table_csv(results, evaluation))))
    assert table[0] == ["method", "ratio", "achieved_ratio", "params", "top1", "nll_nats", "error"]
    for line, r in zip(table[1:], rows, strict=True):
        assert line[0] == r["method"] and [float(v) for v in line[4:6]] == [r["accuracy"]["top1"], r["accuracy"]["nll"]]


def test_the_folder_has_the_evaluations_plot_and_artefacts(grid, tmp_path, saved_figures):
    _, _, evaluation, results, _ = grid
    out = compare.write({**results, "model": "tiny"}, evaluation, tmp_path / "cmp", overwrite=False)
    saved = json.loads((out / "results.json").read_text())
    assert "artefacts" not in saved and saved["rows"] == json.loads(json.dumps(results["rows"]))
    (figure, path), = saved_figures
    assert path.name == "accuracy.png" and (out / "accuracy.png").is_file()
    assert [(ax.get_title(), ax.get_ylabel(), ax.get_yscale()) for ax in figure.axes] == [
        ("top-1 accuracy", "top-1 accuracy", "linear"), ("mean NLL", "nats per token (log scale)", "log")]
    lines = (out / "predictions.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in lines] == list(results["artefacts"])
    assert lines[0] == f"dense: {results['artefacts']['dense'].flatten().tolist()}"
