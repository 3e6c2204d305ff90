"""Block-local healing (numprune.heal) on tiny random LLaMA models: it recovers what the kept weights can represent,
never raises a layer's calibration loss (checked against losses computed here, layer by layer), is deterministic,
and its result saves and reloads like any pruned model; the command line records it and refuses bad options."""

import copy
import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import reload_all, tiny_llama, tiny_tokens
from hostile import hashes, refused

from numprune.adapters import adapter_for
from numprune.api import calibrate, prune
from numprune.cli import main
from numprune.errors import NumpruneError
from numprune.heal import heal
from numprune.recipe import HealOptions, PruneOptions
from numprune.save import save_pruned
from numprune.shrink import shrink
from numprune.stream import prune_streaming

DEAD = 6  # MLP channels of every layer that are dead in the dense model


def dense_with_dead_channels():
    """A tiny LLaMA whose first DEAD MLP channels of every layer contribute nothing (zero gate/up rows, zero
    down_proj columns), and the model without them: a pruned model whose kept weights represent it exactly."""
    model = tiny_llama("mha", layers=2)
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in adapter.layers():
            layer.mlp.gate_proj.weight[:DEAD] = 0
            layer.mlp.up_proj.weight[:DEAD] = 0
            layer.mlp.down_proj.weight[:, :DEAD] = 0
    plans = [replace(adapter.full_plan(i), channels=tuple(range(DEAD, adapter.mlp_width(i))))
             for i in range(adapter.num_layers())]
    return model, shrink(adapter, plans)


def layer_outputs(model, tokens) -> list[torch.Tensor]:
    """Every decoder layer's output on ``tokens``, from one forward of the whole model."""
    outputs, layers = [], adapter_for(model).layers()
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return outputs


def layer_loss(dense, pruned, tokens, i) -> float:
    """Layer ``i``'s calibration loss (mse): its output on the pruned model's stream against the dense layer's."""
    return float((layer_outputs(pruned, tokens)[i] - layer_outputs(dense, tokens)[i]).pow(2).mean())


def test_a_pruned_model_that_can_represent_the_dense_one_is_recovered():
    dense, pruned = dense_with_dead_channels()
    tokens = tiny_tokens(8, 16)
    probe = tiny_tokens(3, 20, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe).logits, dense(probe).logits, rtol=1e-5, atol=1e-5)
        for layer in adapter_for(pruned).layers():  # perturb the kept norms, which the fit may move
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(1 + 0.1 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(3)))
        assert (pruned(probe).logits - dense(probe).logits).abs().max() > 1e-2
    healed, record = heal(dense, pruned, tokens, progress=False, params="norms", lr=1e-2, epochs=300, batch=8)
    assert healed is pruned and all(layer.kept for layer in record.layers)
    assert record.layers[-1].after < 1e-10
    for got, want in zip(layer_outputs(healed, probe), layer_outputs(dense, probe)):  # on tokens it never saw
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "relative"])
def test_healing_never_raises_a_layer_loss(loss):
    dense = tiny_llama("gqa", layers=3)
    tokens = tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.4, progress=False)
    for lr in (3e-3, 10.0):  # a useful step, and one that makes every fit worse
        original = copy.deepcopy(pruned)
        healed, record = heal(dense, copy.deepcopy(pruned), tokens, progress=False, lr=lr, epochs=2, batch=2, loss=loss)
        kept = [layer.kept for layer in record.layers]
        assert all(kept) if lr == 3e-3 else not any(kept)
        for i, (old, new) in enumerate(zip(adapter_for(original).layers(), adapter_for(healed).layers())):
            assert record.layers[i].after <= record.layers[i].before
            unchanged = all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))
            assert unchanged != kept[i]
            if loss == "mse":
                # before: layer i as pruned, fed by the healed layers above it; after: the healed layer i
                mixed = copy.deepcopy(healed)
                adapter_for(mixed).layers()[i].load_state_dict(old.state_dict())
                before, after = layer_loss(dense, mixed, tokens, i), layer_loss(dense, healed, tokens, i)
                assert record.layers[i].before == pytest.approx(before, rel=1e-4)
                assert record.layers[i].after == pytest.approx(min(after, before), rel=1e-4)
                assert after <= before * (1 + 1e-5)


def test_same_seed_same_weights():
    dense = tiny_llama("gqa")
    tokens = tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    runs = [heal(dense, copy.deepcopy(pruned), tokens, progress=False, lr=1e-3, seed=seed)[0] for seed in (5, 5, 6)]
    same = [all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), other.parameters())) for other in runs[1:]]
    assert same == [True, False]  # the seed orders the windows; another order is another fit


def test_a_healed_model_saves_and_reloads_with_its_record(tmp_path):
    dense = tiny_llama("gqa9")
    tokens = tiny_tokens(6, 16)
    pruned, report = prune(dense, tokens, ratio=0.3, heal=True, heal_lr=1e-3, progress=False)
    unhealed, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    # a block-local learning rate asks for block-local healing; the epochs the run left to itself are recorded
    assert report["options"]["heal_lr"] == 1e-3 and report["options"]["heal_mode"] == "local"
    assert report["options"]["heal_epochs"] == 1
    assert len(report["healing"]["layers"]) == 3 and "healing" in report["time_s"]
    assert report["healing"]["tokens"] == tokens.numel()
    probe = tiny_tokens(3, 20, seed=7)
    with torch.no_grad():
        assert not torch.allclose(pruned(probe).logits, unhealed(probe).logits, atol=1e-4)
        expected = pruned(probe).logits
    out = save_pruned(pruned, None, report, tmp_path / "healed")
    assert json.loads((out / "pruning_report.json").read_text())["healing"] == report["healing"]
    [(logits, _)] = reload_all([], [out], probe, tmp_path)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_compare_takes_healing_as_a_method_option(tiny_model_folder, tmp_path):
    opts = PruneOptions.parse("numerical-robust:heal=true:heal_lr=0.0003:heal_loss=relative", 0.2)
    assert opts.heal and opts.heal_options() == HealOptions(lr=3e-4, loss="relative")
    with pytest.raises(NumpruneError, match="heal_lr is a healing option; it applies only with heal=True"):
        PruneOptions.parse("numerical-robust:heal=false:heal_lr=0.0003", 0.2)
    assert PruneOptions.parse("flap:heal_lr=0.0003", 0.2).heal  # a healing option asks for healing
    out = tmp_path / "compare"
    assert main(["compare", "--model", str(tiny_model_folder), "--methods", "numerical-robust:heal=false,flap:heal=true",
                 "--ratios", "0.3", "--data", "moby-dick", "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32",
                 "--eval-windows", "2", "--out", str(out), "--quiet"]) == 0
    _, plain, healed = json.loads((out / "results.json").read_text())["rows"]
    assert healed["options"]["heal"] and "healing" in healed["time_s"] and "healing" not in plain["time_s"]
    assert healed["ppl"]["moby-dick"] != plain["ppl"]["moby-dick"]


@pytest.mark.parametrize("options,message", [
    (dict(lr=0), "healing learning rate must be a finite number > 0"),
    (dict(epochs=0), "healing epochs must be a positive integer"),
    (dict(params="weights"), "unknown healing parameters 'weights'; choose from all, norms"),
    (dict(loss="kl"), "unknown healing loss 'kl'; choose from mse, relative"),
    (dict(steps=3), "unknown healing option 'steps'"),
])
def test_bad_healing_options_are_refused(options, message):
    dense = tiny_llama("gqa")
    with pytest.raises(NumpruneError, match=message):
        heal(dense, copy.deepcopy(dense), tiny_tokens(), progress=False, **options)


def test_a_model_not_pruned_from_this_one_is_refused():
    dense = tiny_llama("gqa")
    tokens = tiny_tokens()
    pruned, _ = prune(dense, tokens, ratio=0.3, progress=False)
    cases = [(tiny_llama("gqa", seed=1), tokens, "embeddings .* differ"),
             (tiny_llama("gqa", layers=2), tokens, "has 2 layers and the dense model 3"),
             (pruned, None, "healing needs calibration tokens"),
             (dense, tokens, "the same model")]
    for model, calibration, message in cases:
        with pytest.raises(NumpruneError, match=message):
            heal(dense, model, calibration, progress=False)
    with pytest.raises(NumpruneError, match="wider than the dense model's"):
        heal(pruned, dense, tokens, progress=False)
    with pytest.raises(NumpruneError, match="inplace=True would share"):
        prune(dense, tokens, ratio=0.3, heal=True, inplace=True, progress=False)
    with pytest.raises(NumpruneError, match="calibration tokens are needed for healing"):
        prune(dense, None, ratio=0.3, heal_mode="local", stats=calibrate(dense, tokens, progress=False), progress=False)


def test_prune_heal_writes_the_record(tiny_model_folder, tmp_path):
    out = tmp_path / "healed"
    status = main(["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
                   "--heal", "--heal-epochs", "2", "--heal-params", "norms", "--out", str(out), "--quiet"])
    assert status == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["options"]["heal"] and report["options"]["heal_epochs"] == 2
    assert report["healing"]["options"]["params"] == "norms"
    assert [set(layer) for layer in report["healing"]["layers"]] == [{"before", "after", "kept", "seconds"}] * 2


@pytest.mark.parametrize("extra,message", [
    (["--heal", "--heal-lr", "0"], "--heal-lr: must be a finite number > 0"),
    (["--heal", "--heal-loss", "kl"], "argument --heal-loss: invalid choice: 'kl'"),
    (["--no-heal", "--heal-epochs", "2"], "heal_epochs is a healing option; it applies only with heal=True"),
    (["--heal", "--heal-mode", "distill", "--stream"], "the healing mode distill distils, which trains the whole "
     "pruned model at once; a streamed run holds one layer at a time"),
])
def test_bad_heal_flags_are_one_line(tiny_model_folder, tmp_path, extra, message):
    refused("heal flags", message, "prune", "--model", tiny_model_folder, "--ratio", "0.3", "--nsamples", "2",
            "--seqlen", "32", "--out", tmp_path / "out", "--quiet", *extra, inputs=[tiny_model_folder])
    assert not (tmp_path / "out").exists()


def test_heal_command_heals_a_saved_pruned_folder(tiny_model_folder, tmp_path):
    pruned = tmp_path / "pruned"
    calibration = ["--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert main(["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--out", str(pruned), *calibration]) == 0
    before = hashes(pruned)
    out = tmp_path / "healed"
    assert main(["heal", "--model", str(tiny_model_folder), "--pruned", str(pruned), "--heal-lr", "0.001",
                 "--out", str(out), *calibration]) == 0
    assert hashes(pruned) == before
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["options"]["heal"] and report["options"]["heal_lr"] == 0.001
    assert report["healing"]["calibration"]["nsamples"] == 4 and len(report["healing"]["layers"]) == 2
    probe = tiny_tokens(2, 12, seed=7)
    [(healed_logits, _), (pruned_logits, _)] = reload_all([], [out, pruned], probe, tmp_path)
    assert not torch.allclose(healed_logits, pruned_logits, atol=1e-4)
    for case, folder, message in [("not pruned", tiny_model_folder, "has no pruning_report.json"),
                                  ("onto its input", pruned, "would replace")]:
        refused(case, message, "heal", "--model", tiny_model_folder, "--pruned", folder, "--out", pruned,
                "--overwrite", *calibration, inputs=[tiny_model_folder, pruned])


def test_a_streamed_run_refuses_distillation(tiny_model_folder, tmp_path):
    for mode in ("distill", "local+distill"):
        message = f"the healing mode {re.escape(mode)} distils, .* a streamed run holds one layer"
        with pytest.raises(NumpruneError, match=message):
            prune_streaming(tiny_model_folder, tiny_tokens(2, 16), ratio=0.3, out=tmp_path / "out", heal=True,
                            heal_mode=mode, progress=False)
    assert not (tmp_path / "out").exists()
