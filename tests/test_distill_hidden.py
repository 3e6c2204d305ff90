"""Distillation's hidden-state term (HealOptions.hidden, numprune.distill.hidden_gap) on tiny random LLaMA models: at
weight 0 nothing changes (the models are never asked for their hidden states); the term is 0 for a model against
itself and equals a direct computation from hooks on the decoder layers and the final norm; distilling with it lowers
the layers' output error more than the KL alone does; the weight is recorded, and bad weights are refused in one line.
"""

import copy
import json

import pytest
import torch
from conftest import tiny, tiny_llama, tiny_tokens
from hostile import refused

from numprune.adapters import adapter_for
from numprune.api import prune
from numprune.cli import main
from numprune.distill import hidden_gap, outputs
from numprune.errors import NumpruneError
from numprune.heal import heal
from numprune.recipe import HealOptions, PruneOptions


def layer_outputs(model, tokens) -> list[torch.Tensor]:
    """Each decoder layer's output in float64 caught by forward hooks, the last one through the final norm: the base
    model's last hidden state."""
    caught = []
    hooks = [layer.register_forward_hook(lambda _, __, out: caught.append(out[0] if isinstance(out, tuple) else out))
             for layer in adapter_for(model).layers()[:-1]]
    try:
        with torch.no_grad():
            last = model.base_model(tokens).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return [state.double() for state in (*caught, last)]


def direct_gap(dense, pruned, tokens) -> float:
    """The hidden-state term written out: per layer, sum of squared errors over the dense output's sum of squares
    (the same as the mean square over the mean square), averaged over the layers."""
    pairs = zip(layer_outputs(dense, tokens), layer_outputs(pruned, tokens), strict=True)
    gaps = [float(((p - d) ** 2).sum() / (d ** 2).sum()) for d, p in pairs]
    return sum(gaps) / len(gaps)


def gap(dense, pruned, tokens) -> float:
    with torch.no_grad():
        return float(hidden_gap(outputs(dense, tokens, True).hidden_states, outputs(pruned, tokens, True).hidden_states))


@pytest.fixture(scope="module")
def pair():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.4, heal=False, progress=False)
    return dense, pruned, tokens


def test_weight_zero_never_asks_for_hidden_states_and_trains_the_same(pair, monkeypatch):
    dense, pruned, tokens = pair
    asked = []
    for kind in {type(dense), type(pruned)}:
        forward = kind.forward
        monkeypatch.setattr(kind, "forward", lambda self, *a, _f=forward, **k: asked.append(k.get("output_hidden_states"))
                            or _f(self, *a, **k))
    plain, record = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", distill_lr=3e-3,
                         tokens=64)
    zero, _ = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", distill_lr=3e-3, tokens=64,
                   hidden=0.0)
    assert asked and not any(asked)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), zero.parameters()))
    assert all(set(point) == {"step", "tokens", "seconds", "kl"} for point in record.distillation.curve)


def test_the_term_is_zero_for_a_model_against_itself_and_matches_a_direct_computation(pair):
    dense, pruned, tokens = pair
    assert gap(dense, copy.deepcopy(dense), tokens) == 0.0
    expected = direct_gap(dense, pruned, tokens)
    assert expected > 0.05
    assert gap(dense, pruned, tokens) == pytest.approx(expected, rel=1e-5)
    # the embeddings are skipped: they are the same in both; one term per decoder layer
    assert len(outputs(dense, tokens, True).hidden_states) == len(dense.model.layers) + 1
    _, record = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", hidden=1.0, batch=6,
                     epochs=1)  # one step over every window: its recorded term is the one before any update
    assert record.distillation.curve[0]["hidden"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["gemma3_text", "opt", "gpt2"])
def test_the_term_is_each_layers_relative_error_in_other_families(family):
    """Other layouts (Gemma's sandwich norms, OPT's and GPT-2's own stacks): the term against a model whose MLP outputs
    were changed is the direct computation's."""
    dense, tokens = tiny(family), tiny_tokens(4, 12)
    changed = copy.deepcopy(dense)
    adapter = adapter_for(changed)
    torch.manual_seed(0)
    with torch.no_grad():  # noise, not a scale: Gemma's norm after the MLP would undo a scale
        for layer in adapter.layers():
            weight = adapter.mlp_output(layer).weight
            weight.add_(0.3 * weight.std() * torch.randn_like(weight))
    expected = direct_gap(dense, changed, tokens)
    assert expected > 1e-3 and gap(dense, copy.deepcopy(dense), tokens) == 0.0
    assert gap(dense, changed, tokens) == pytest.approx(expected, rel=1e-5)


def test_distilling_with_the_term_lowers_it_more_than_the_kl_alone(pair):
    dense, pruned, tokens = pair
    before = direct_gap(dense, pruned, tokens)
    after = {}
    for weight in (0.0, 1.0):
        healed, record = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", distill_lr=3e-3,
                              epochs=4, hidden=weight)
        after[weight] = direct_gap(dense, healed, tokens)
    curve = record.distillation.curve
    assert after[1.0] < 0.9 * after[0.0] and after[0.0] < before
    assert curve[-1]["hidden"] < curve[0]["hidden"]


def test_the_weight_reaches_the_recipe_and_the_report(tiny_model_folder, tmp_path, capsys):
    assert PruneOptions.parse("numerical-robust:heal=true:heal_mode=distill:heal_hidden=2", 0.2).heal_options() \
        == HealOptions(mode="distill", hidden=2.0)
    out = tmp_path / "healed"
    calibration = ["--model", str(tiny_model_folder), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32"]
    assert main(["prune", *calibration, "--heal", "--heal-mode", "distill", "--heal-tokens", "64", "--heal-hidden",
                 "0.5", "--out", str(out), "--quiet"]) == 0
    assert "hidden-state term" in capsys.readouterr().out
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["options"]["heal_hidden"] == 0.5 and report["healing"]["options"]["hidden"] == 0.5
    assert "hidden" in report["healing"]["distillation"]["curve"][-1]
    refused("a negative hidden-state weight", "--heal-hidden: must be a finite number >= 0", "prune", *calibration,
            "--heal", "--heal-mode", "distill", "--heal-hidden", "-1", "--out", tmp_path / "out", "--quiet",
            inputs=[tiny_model_folder])
    refused("a hidden-state weight with the local mode", "the healing option hidden applies to distillation",
            "prune", *calibration, "--heal-mode", "local", "--heal-hidden", "1", "--out", tmp_path / "out", "--quiet",
            inputs=[tiny_model_folder])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,message", [
    (dict(mode="distill", hidden=-0.5), "distillation hidden-state weight must be a finite number >= 0, got -0.5"),
    (dict(mode="distill", hidden=float("nan")), "distillation hidden-state weight must be a finite number >= 0"),
    (dict(mode="distill", hidden=float("inf")), "distillation hidden-state weight must be a finite number >= 0"),
    (dict(mode="local", hidden=1.0), "the healing option hidden applies to distillation; the local mode does not distil"),
])
def test_bad_weights_are_refused(options, message):
    with pytest.raises(NumpruneError, match=message):
        HealOptions.checked(**options)
    with pytest.raises(NumpruneError, match=message):
        PruneOptions.checked(0.2, heal=True, **{f"heal_{k}": v for k, v in options.items()})
    with pytest.raises(NumpruneError, match="heal_hidden is a healing option; it applies only with heal=True"):
        PruneOptions.checked(0.2, heal=False, heal_hidden=1.0)
