"""One recipe from the command line to the last layer: the API, the command line and compare prune the same model from
the same recipe, and a recipe file written by one run (its pruning_report.json) reproduces it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from numprune import compare, prune, save_pruned
from numprune.cli import main, parser
from numprune.cli.compare import DEFAULT_METHODS
from numprune.cli.prune import prune_options
from numprune.data.corpora import calibration_windows
from numprune.errors import NumpruneError
from numprune.evaluate.base import Column, Evaluation, Measurement
from numprune.models import load_model
from numprune.recipe import DEFAULT_METHOD, PruneOptions, read_recipe

CALIBRATION = ["--nsamples", "4", "--seqlen", "16", "--seed", "0"]
WEIGHTS = "model.safetensors"


@pytest.fixture
def calibration_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the tired cat sleeps in the sun. " * 30)
    return text


def run_prune(folder, text, out, *flags) -> None:
    status = main(["prune", "--model", str(folder), "--calib", str(text), *CALIBRATION, "--out", str(out), "--quiet",
                   *flags])
    assert status == 0


class StateOf(Evaluation):
    """An evaluation that keeps each model's weights, so a compare cell's model can be read back."""

    row_key, report_key, plot_name = "state", "state", "state.png"

    def describe(self) -> dict:
        return {}

    def columns(self) -> list[Column]:
        return [Column("params", "parameters", ".0f")]

    def summary(self, dense: dict, pruned: dict) -> list[str]:
        return []

    def measure(self, model) -> Measurement:
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        return Measurement({"params": float(sum(p.numel() for p in model.parameters()))}, artefact=state)


def test_the_default_method_is_one_everywhere():
    args = parser().parse_args(["prune", "--ratio", "0.3", "--out", "unused"])
    assert prune_options(args) == PruneOptions(ratio=0.3) == PruneOptions.checked(0.3)
    assert PruneOptions(ratio=0.3).method == DEFAULT_METHOD == "numerical-robust" == DEFAULT_METHODS[0]
    assert compare.recipes([DEFAULT_METHOD], [0.3])[DEFAULT_METHOD, 0.3] == PruneOptions(ratio=0.3)


def test_the_api_the_command_line_and_compare_give_the_same_weights(tiny_model_folder, calibration_text, tmp_path):
    flags = ["--ratio", "0.3", "--method", "numerical", "--allocation", "flap-widths", "--compensation", "affine"]
    run_prune(tiny_model_folder, calibration_text, tmp_path / "cli", *flags)
    recipe = prune_options(parser().parse_args(["prune", *flags, "--out", "unused"]))
    model, tokenizer, _ = load_model(str(tiny_model_folder))
    tokens, _ = calibration_windows(tokenizer, str(calibration_text), 4, 16, 0)

    pruned, report = prune(model, tokens, recipe, progress=False)
    save_pruned(pruned, tokenizer, report, tmp_path / "api")
    assert (tmp_path / "api" / WEIGHTS).read_bytes() == (tmp_path / "cli" / WEIGHTS).read_bytes()

    # compare calibrates once and prunes every cell from those statistics
    grid = compare.recipes(["numerical:allocation=flap-widths:compensation=affine"], [0.3])
    assert list(grid.values()) == [recipe]
    results = compare.run_grid(model, tokens, grid, StateOf(), calibration_info={}, progress=False)
    state = results["artefacts"]["numerical:allocation=flap-widths:compensation=affine 30%"]
    saved = load_file(tmp_path / "cli" / WEIGHTS)
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name


def test_a_report_is_a_recipe_that_reproduces_its_run(tiny_model_folder, calibration_text, tmp_path):
    run_prune(tiny_model_folder, calibration_text, tmp_path / "first", "--ratio", "0.4", "--method", "flap",
              "--allocation", "compensated-error", "--allocation-compensation", "least-squares", "--round-to", "2")
    report = tmp_path / "first" / "pruning_report.json"
    run_prune(tiny_model_folder, calibration_text, tmp_path / "again", "--recipe", str(report))
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (tmp_path / "first" / WEIGHTS).read_bytes()
    options = [json.loads((tmp_path / run / "pruning_report.json").read_text())["options"] for run in ("first", "again")]
    assert options[0] == options[1] and options[0]["allocation_compensation"] == "least-squares"
    # The recipe alone, written by hand as YAML, is the same recipe.
    written = tmp_path / "recipe.yaml"
    written.write_text("ratio: 0.4\nmethod: flap\nallocation: compensated-error\nallocation_compensation: least-squares\n"
                       "round_to: 2\n")
    # (it leaves healing to the run, which decides what the report records: FLAP does not heal unless asked)
    assert read_recipe(written).decide_healing(True) == read_recipe(report) == PruneOptions.checked(**options[0])


@pytest.mark.parametrize("flags", [["--depth", "1"], ["--depth-ratio", "0.5", "--ratio", "0.3",
                                                       "--depth-selection", "shortgpt"]],
                         ids=["depth alone", "depth and width"])
def test_a_depth_report_is_a_recipe_that_reproduces_its_run(flags, tiny_model_folder, calibration_text, tmp_path):
    run_prune(tiny_model_folder, calibration_text, tmp_path / "first", *flags)
    report = tmp_path / "first" / "pruning_report.json"
    run_prune(tiny_model_folder, calibration_text, tmp_path / "again", "--recipe", str(report))
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (tmp_path / "first" / WEIGHTS).read_bytes()
    first, again = (json.loads((tmp_path / run / "pruning_report.json").read_text()) for run in ("first", "again"))
    assert first["options"] == again["options"] and first["depth"] == again["depth"]
    assert first["options"]["depth"] == 1 and len(first["depth"]["removed_layers"]) == 1  # --depth-ratio: a count
    written = tmp_path / "recipe.yaml"  # the same recipe by hand, as YAML
    written.write_text("depth: 1\n" if "--ratio" not in flags else "ratio: 0.3\ndepth: 1\ndepth_selection: shortgpt\n")
    # (healing left to the run, which never heals a depth run unless asked: refused)
    assert read_recipe(written).decide_healing(True) == read_recipe(report) == PruneOptions.checked(**first["options"])
    run_prune(tiny_model_folder, calibration_text, tmp_path / "yaml", "--recipe", str(written))
    assert (tmp_path / "yaml" / WEIGHTS).read_bytes() == (tmp_path / "first" / WEIGHTS).read_bytes()


def test_recipe_flags_change_a_recipe_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"ratio": 0.3, "method": "numerical", "compensation_damp": 0.05}))
    args = parser().parse_args(["prune", "--recipe", str(path), "--ratio", "0.2", "--iterations", "7", "--out", "o"])
    assert prune_options(args) == PruneOptions(ratio=0.2, method="numerical", compensation_damp=0.05,
                                               score_options={"iterations": 7})


def test_replace_derives_again_what_the_changed_fields_imply():
    default = PruneOptions(ratio=0.3)
    assert default.replace(ratio=0.1) == PruneOptions(ratio=0.1)  # the blend weight follows the ratio's schedule
    assert default.replace(method="flap") == PruneOptions(ratio=0.3, method="flap")  # flap's allocation, compensation
    set_by_hand = PruneOptions(ratio=0.3, blend_weight=0.2, compensation_damp=0.5)
    assert set_by_hand.replace(ratio=0.4) == PruneOptions(ratio=0.4, blend_weight=0.2, compensation_damp=0.5)
    assert set_by_hand.requested() == {"ratio": 0.3, "blend_weight": 0.2, "compensation_damp": 0.5}
    with pytest.raises(NumpruneError, match="applies to the blend allocation only"):
        set_by_hand.replace(allocation="global")


def test_a_recipe_is_frozen_and_complete():
    recipe = PruneOptions(ratio=0.3, method="numerical")
    with pytest.raises(AttributeError):
        recipe.ratio = 0.5
    assert (recipe.allocation, recipe.compensation, recipe.compensation_damp) == ("global", "least-squares", 0.01)
    assert recipe.score_options == {"lambda_rel": 1.0, "damp": 0.01, "iterations": 50, "centred": False}


@pytest.mark.parametrize("content,message", [
    ("{", "is not JSON"), ("[1, 2]", "must hold a mapping of options, got list"),
    ('{"ratio": 0.3, "methd": "flap"}', "unknown option 'methd'"), ('{"method": "flap"}', "ratio must be a number"),
])
def test_a_bad_recipe_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(NumpruneError, match=message):
        read_recipe(path)
    with pytest.raises(NumpruneError, match="cannot read the recipe"):
        read_recipe(tmp_path / "missing.json")


def test_a_recipe_and_overrides_in_the_api(tmp_path):
    from conftest import tiny_llama, tiny_tokens

    model, tokens = tiny_llama("gqa"), tiny_tokens()
    _, from_recipe = prune(model, tokens, PruneOptions(ratio=0.3, method="magnitude"), ratio=0.2, progress=False)
    _, from_keywords = prune(model, tokens, ratio=0.2, method="magnitude", progress=False)
    assert from_recipe["options"] == from_keywords["options"]
    with pytest.raises(NumpruneError, match="recipe must be a PruneOptions, got dict"):
        prune(model, tokens, {"ratio": 0.3}, progress=False)
