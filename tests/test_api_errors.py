"""The Python API refuses what the command line refuses, with a NumpruneError, not a raw TypeError,
IndexError or RuntimeError, and before calibration wherever the inputs' shapes decide."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import torch
from conftest import tiny_llama, tiny_tokens
from transformers import GPT2Config, GPT2LMHeadModel

import numprune.pipeline
from numprune import NumpruneError, calibrate, prune, save_pruned
from numprune.compare import recipes
from numprune.export import export_gguf

TOKENS = tiny_tokens()
BAD_CALLS = {
    "ratio as a string": (dict(ratio="0.3"), "ratio must be a number"),
    "ratio NaN": (dict(ratio=float("nan")), "ratio must be a number"),
    "unknown option": (dict(ratio=0.3, ratoi=0.3), "unknown option 'ratoi'"),
    "float tokens": (dict(ratio=0.3, tokens=TOKENS.float()), "integer tensor"),
    "1-D tokens": (dict(ratio=0.3, tokens=TOKENS[0]), "shape [samples, seqlen]"),
    "empty tokens": (dict(ratio=0.3, tokens=TOKENS[:0]), "shape [samples, seqlen]"),
    "tokens as a list": (dict(ratio=0.3, tokens=TOKENS.tolist()), "integer tensor"),
    "out-of-vocabulary tokens": (dict(ratio=0.3, tokens=TOKENS + 1000), "ids between 0 and 96"),
    "negative tokens": (dict(ratio=0.3, tokens=TOKENS - 1000), "ids between 0 and 96"),
    "batch_size=0": (dict(ratio=0.3, batch_size=0), "batch size must be a positive integer"),
    "round_to=2.5": (dict(ratio=0.3, round_to=2.5), "round_to must be a positive integer"),
    "round_to=100000": (dict(ratio=0.3, round_to=100000), "against a target of 30.0%"),
    "iterations=0": (dict(ratio=0.3, score_options={"iterations": 0}), "iterations must be a positive integer"),
    "damp NaN": (dict(ratio=0.3, score_options={"damp": float("nan")}), "damp must be a finite number"),
    "lambda_rel=-1": (dict(ratio=0.3, score_options={"lambda_rel": -1.0}), "lambda_rel must be a finite number"),
    "an option the method lacks": (dict(ratio=0.3, method="magnitude", score_options={"damp": 0.1}), "takes no option"),
    "compensation_damp NaN": (dict(ratio=0.3, compensation_damp=float("nan")), "compensation damping"),
    "device cpufoo": (dict(ratio=0.3, device="cpufoo"), "device must be cpu, cuda or cuda:N"),
    "ratio that empties a layer": (dict(ratio=0.99), "would leave"),
    "damping 0 on fewer tokens than inputs": (dict(ratio=0.3, tokens=TOKENS[:2], compensation="least-squares",
                                                   compensation_damp=0.0),
                                              "needs at least 48 calibration tokens for layer 0's self_attn.o_proj"),
    "damping 0 guiding the allocation": (dict(ratio=0.3, tokens=TOKENS[:2], allocation="compensated-error",
                                              allocation_compensation="affine", compensation_damp=0.0),
                                         "affine compensation at damping 0 needs at least 49"),
    "allocation_compensation beside the global allocation": (dict(ratio=0.3, allocation="global",
                                                                  allocation_compensation="affine"),
                                                             "guides the compensated-error allocation only, not global"),
    "stats as a string": (dict(ratio=0.3, stats="abc"), "stats must be what calibrate returns"),
    "stats as a list of strings": (dict(ratio=0.3, stats=["a", "b", "c"]), "stats must be what calibrate returns"),
    "dtype as a string": (dict(ratio=0.3, dtype="float32"), "dtype must be a torch floating dtype"),
    "calibration_info as a list": (dict(ratio=0.3, calibration_info=[1]), "calibration_info must be a dict"),
    "score_options as a list": (dict(ratio=0.3, score_options=[1]), "score options must be a dict"),
    "compensation as a list": (dict(ratio=0.3, compensation=["none"]), "compensation must be a name"),
    "inplace='no'": (dict(ratio=0.3, inplace="no"), "inplace must be True or False"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama("gqa")


@pytest.fixture
def no_calibration(monkeypatch):
    """Calibration fails loudly, so a refusal that comes first proves it came before calibration."""
    def calibration_started(*_, **__):
        raise AssertionError("calibration started")

    monkeypatch.setattr(numprune.pipeline.Compute, "stream", calibration_started)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_prune_refuses_before_calibration(case, model, no_calibration):
    kwargs, message = BAD_CALLS[case]
    kwargs = {"tokens": TOKENS, **kwargs}
    with pytest.raises(NumpruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prune(model, kwargs.pop("tokens"), progress=False, **kwargs)


def test_statistics_of_another_model_are_refused(model):
    other = calibrate(tiny_llama("mha"), TOKENS, progress=False)
    with pytest.raises(NumpruneError, match="do not belong to this model"):
        prune(model, TOKENS, ratio=0.3, stats=other, progress=False)
    with pytest.raises(NumpruneError, match="for 2 layers; this model has 3"):
        prune(model, TOKENS, ratio=0.3, stats=calibrate(tiny_llama("gqa", layers=2), TOKENS, progress=False),
              progress=False)


def test_calibrate_checks_its_inputs_too(model):
    with pytest.raises(NumpruneError, match="integer tensor"):
        calibrate(model, TOKENS.float())
    with pytest.raises(NumpruneError, match="batch size"):
        calibrate(model, TOKENS, batch_size=0)


def test_windows_past_a_position_table_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=97)).eval()
    with pytest.raises(NumpruneError, match="longer than this gpt2 model's 8 positions"):
        prune(gpt2, TOKENS, ratio=0.3, progress=False)


def test_activations_that_cannot_fit_in_memory_are_refused_before_a_layer_runs(model, monkeypatch):
    """Refused once the first batch is captured (it shows what every batch keeps), before any decoder layer runs."""
    class Scarce:
        available = 1000  # bytes

    ran = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: ran.append(1))  # the capture runs no layer's MLP
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce)
    with pytest.raises(NumpruneError, match="GiB of activations"):
        prune(model, TOKENS, ratio=0.3, progress=False)
    assert not ran


@pytest.mark.parametrize("not_a_model", ["model", None, 3])
def test_what_is_not_a_model_is_refused_by_name(not_a_model, tmp_path):
    for call in (lambda: prune(not_a_model, TOKENS, ratio=0.3), lambda: calibrate(not_a_model, TOKENS)):
        with pytest.raises(NumpruneError, match=f"expected a loaded transformers model .*got {type(not_a_model).__name__}"):
            call()
    with pytest.raises(NumpruneError, match="got " + type(not_a_model).__name__):
        save_pruned(not_a_model, None, {}, tmp_path / "out")
    if not isinstance(not_a_model, str):  # a string is a folder's name
        with pytest.raises(NumpruneError, match="expected a model folder or a loaded transformers model"):
            export_gguf(not_a_model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_flags_must_be_booleans_and_a_grid_names_each_cell_once(model, tmp_path):
    for call in (lambda: export_gguf(model, tmp_path / "m.gguf", overwrite="no"),
                 lambda: save_pruned(model, None, {}, tmp_path / "out", overwrite="yes")):
        with pytest.raises(NumpruneError, match="overwrite must be True or False"):
            call()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NumpruneError, match="method entry 'numerical' is given twice"):
        recipes(["numerical", " numerical"], [0.3])
    with pytest.raises(NumpruneError, match="ratio 0.3 is given twice"):
        recipes(["numerical"], [0.3, 0.3])


@pytest.mark.parametrize("ratio", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25).double()])
def test_numpy_and_torch_scalars_are_numbers(model, ratio):
    """They prune exactly as the Python float they hold (0.25 is exact in every float type)."""
    _, expected = prune(model, TOKENS, ratio=0.25, round_to=2, progress=False, score_options={"iterations": 50})
    _, report = prune(model, TOKENS, ratio=ratio, round_to=np.int64(2), progress=False,
                      score_options={"iterations": torch.tensor(50)})
    assert report["layers"] == expected["layers"] and report["options"] == expected["options"]
    assert type(report["options"]["ratio"]) is float and type(report["options"]["round_to"]) is int


def test_save_pruned_refuses_an_empty_path(model):
    for out in ("", "   "):
        with pytest.raises(NumpruneError, match="output path is empty"):
            save_pruned(model, None, {}, out)


@pytest.mark.parametrize("compensation", ["least-squares", "affine"])
def test_singular_statistics_at_damping_0_are_one_line_naming_the_layer(model, compensation):
    """Enough tokens for the up-front count check, but a channel that is never active (its row and column of
    X^T X exactly zero): the undamped factorisation fails, and the user gets the layer and what to change."""
    stats = list(calibrate(model, tiny_tokens(8, 16), progress=False))
    dead = stats[1].mlp
    dead.gram[0, :] = dead.gram[:, 0] = 0
    dead.total[0] = 0
    with pytest.raises(NumpruneError, match="compensation of layer 1 failed: its calibration statistics are singular"):
        prune(model, None, ratio=0.1, method="magnitude", stats=stats, compensation=compensation,
              compensation_damp=0.0, progress=False)
