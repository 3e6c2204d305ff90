"""Depth pruning (numprune.depth): the patch against a direct solve on stored activations, exactness on a linear
span, the renumbered model against the original with the layers skipped, fresh-process and llama.cpp reloads,
determinism, refusals and the report."""

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import break_symmetry, needs_llama_cpp, reload_all, tiny, tiny_llama, tiny_tokens
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from numprune import compare, depth
from numprune.adapters import adapter_for
from numprune.api import calibrate, prune
from numprune.card import write_pruned_card
from numprune.cli import main
from numprune.depth import (
    DEFAULT_RIDGE,
    collect_depth_stats,
    layers_for_ratio,
    patch_weight,
    remove_scattered,
    without_layers,
)
from numprune.errors import NumpruneError
from numprune.evaluate.perplexity import Perplexity, perplexity
from numprune.export import export_gguf, llamacpp
from numprune.save import REPORT_NAME, save_pruned


def activations(model, tokens, before: int, after: int):
    """Stored, by hooks: layer ``before``'s MLP output projection inputs ``a``, the stream ``r`` before its MLP, and
    the stream leaving layer ``after - 1``, as float64 rows."""
    layers, seen = model.model.layers, {}
    hooks = [layers[before].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.update(a=i[0], m=o)),
             layers[before].register_forward_hook(lambda m, i, o: seen.update(h=o[0] if isinstance(o, tuple) else o)),
             layers[after - 1].register_forward_hook(lambda m, i, o: seen.update(j=o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    rows = {k: v.reshape(-1, v.shape[-1]).double() for k, v in seen.items()}
    return rows["a"], rows["h"] - rows["m"], rows["j"]


def direct_patch(model, tokens, start: int, end: int, ridge: float) -> torch.Tensor:
    """Layer ``start - 1``'s down_proj weight patched for removing ``[start, end)``, solved on stored activations:
    the ridge toward the original weight as [a; sqrt(lam) I] X = [h_j - r; sqrt(lam) W^T], by lstsq."""
    weight = model.model.layers[start - 1].mlp.down_proj.weight.detach().double()
    a, r, h_j = activations(model, tokens, start - 1, end)
    lam = ridge * float((a * a).sum(0).mean())
    eye = torch.eye(a.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(torch.cat([a, lam ** 0.5 * eye]), torch.cat([h_j - r, lam ** 0.5 * weight.T])).solution.T


def test_patch_equals_a_direct_least_squares_solve_on_stored_activations():
    model, tokens, ridge = tiny_llama("gqa", layers=5).double(), tiny_tokens(6, 16), 1e-3
    stats = collect_depth_stats(model, tokens, depth=2, batch_size=4, progress=False)
    for i in (1, 2, 3):
        weight = model.model.layers[i - 1].mlp.down_proj.weight.detach()
        a, r, h_j = activations(model, tokens, i - 1, i + 2)
        direct = direct_patch(model, tokens, i, i + 2, ridge)
        patched, before, after = patch_weight(stats, i, weight, ridge)
        torch.testing.assert_close(patched, direct, rtol=1e-8, atol=1e-10)
        norm = float(h_j.square().sum())
        assert before == pytest.approx(float((h_j - (r + a @ weight.T)).square().sum()) / norm, rel=1e-8)
        assert after == pytest.approx(float((h_j - (r + a @ direct.T)).square().sum()) / norm, rel=1e-8)
        assert after < before
    only = collect_depth_stats(model, tokens, depth=2, batch_size=4, progress=False, starts=[2])  # that span's sums
    assert set(only.grams) == {2} and only.target_sq == {2: stats.target_sq[2]}
    torch.testing.assert_close(only.cross[2], stats.cross[2], rtol=0, atol=0)


def test_scattered_patches_each_run_on_the_model_without_the_earlier_runs():
    model, tokens, ridge = tiny_llama("gqa", layers=7).double(), tiny_tokens(6, 16), 1e-3
    pruned, patched, errors = remove_scattered(model, tokens, [0, 2, 4, 5], ridge, batch_size=4, progress=False)
    assert patched == [1, 3] and len(errors) == 2 and all(after < before for before, after in errors)
    # by hand: layer 0 goes unpatched (nothing before it); then layer 2 (now 1) patched in layer 1 (now 0), solved on
    # the stored activations of the model without layer 0; then layers 4-5 (now 2-3) patched in layer 3 (now 1)
    step = without_layers(model, [0])
    first = direct_patch(step, tokens, 1, 2, ridge)
    step = without_layers(step, [1], (0, first))
    second = direct_patch(step, tokens, 2, 4, ridge)
    assert pruned.config.num_hidden_layers == 3
    torch.testing.assert_close(pruned.model.layers[0].mlp.down_proj.weight, first, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pruned.model.layers[1].mlp.down_proj.weight, second, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pruned.model.layers[2].mlp.down_proj.weight, model.model.layers[6].mlp.down_proj.weight)


def test_scattered_selection_removes_shortgpts_layers_and_patches_before_each_run(tmp_path):
    model, tokens = tiny_llama("gqa", layers=6), tiny_tokens(6, 16)
    _, plain = prune(model, tokens, ratio=0, depth=3, depth_selection="shortgpt", progress=False)
    pruned, report = prune(model, tokens, ratio=0, depth=3, depth_selection="scattered", progress=False)
    record, removed = report["depth"], plain["depth"]["removed_layers"]
    assert record["selection"] == "scattered" and record["removed_layers"] == removed
    starts = [l for l in removed if l - 1 not in removed]  # each run's first layer
    assert record["patched_layers"] == [l - 1 for l in starts if l > 0] and len(record["patch_errors"]) == len(
        record["patched_layers"])
    assert report["options"]["depth_selection"] == "scattered" and record["ridge"] == DEFAULT_RIDGE
    card = write_pruned_card(tmp_path, report.to_json(), None).read_text()  # names every patched layer
    patched = record["patched_layers"]
    assert f"folded into layer{'s' * (len(patched) > 1)} {', '.join(map(str, patched))}, ridge" in card
    expected, _, _ = remove_scattered(model, tokens, removed, DEFAULT_RIDGE, progress=False)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[name], tensor, rtol=0, atol=0)


class Ones(nn.Linear):
    """A gate that always opens (its weight only counted): with a linear activation the MLP is then down(up(x))."""

    def forward(self, x):
        return x.new_ones(*x.shape[:-1], self.out_features)


def linear_span_model():
    """4 layers, stream split in halves S1 | S2. The embedding and layer 0's attention write S1 only, layer 0's MLP
    S2 only; layers 1 and 2 are linear (no norms, no attention output, a linear MLP) and read only S2. The stream
    leaving layer 2 is then r + (a linear map of layer 0's MLP output): a patch of layer 0's down_proj carries
    layers 1-2 exactly."""
    model = tiny_llama("mha", layers=4).double()
    half = model.config.hidden_size // 2
    layers = model.model.layers
    with torch.no_grad():
        model.model.embed_tokens.weight[:, half:] = 0  # tied: the head reads S1 only too, which is fine
        layers[0].self_attn.o_proj.weight[half:] = 0
        layers[0].mlp.down_proj.weight[:half] = 0
        for layer in layers[1:3]:
            layer.input_layernorm, layer.post_attention_layernorm = nn.Identity(), nn.Identity()
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate_proj = Ones(half * 2, model.config.intermediate_size, bias=False, dtype=torch.float64)
            layer.mlp.act_fn = nn.Identity()
            layer.mlp.up_proj.weight[:, :half] = 0
    return model


def test_patch_is_exact_on_a_linear_span():
    model = linear_span_model()
    pruned, report = prune(model, tiny_tokens(8, 16), ratio=0, depth=2, depth_ridge=0.0, progress=False)
    assert report["depth"]["removed_layers"] == [1, 2] and report["depth"]["patched_layer"] == 0
    assert report["depth"]["relative_error_after_patch"] < 1e-12 < report["depth"]["relative_error_before_patch"]
    probe = tiny_tokens(3, 20, seed=7)  # not the calibration tokens
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe).logits, model(probe).logits, rtol=1e-9, atol=1e-9)


class Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipping(model, removed, patch):
    """The original model with ``removed`` layers passing the stream through and the patch written in place."""
    model = copy.deepcopy(model)
    layer, weight = patch
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight.copy_(weight)
    for l in removed:
        model.model.layers[l] = Skip()
    return model


def sliding_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, num_hidden_layers=5, max_position_embeddings=128, hidden_size=48,
                         num_attention_heads=6, num_key_value_heads=2, intermediate_size=40, use_sliding_window=True,
                         sliding_window=4, layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"])
    return break_symmetry(Qwen2ForCausalLM(config).eval())


@pytest.mark.parametrize("make", [lambda: tiny_llama("gqa", layers=5), sliding_qwen2, lambda: tiny("qwen3"),
                                  lambda: tiny("mistral"), lambda: tiny("phi3")],
                         ids=["llama", "qwen2 sliding", "qwen3", "mistral", "phi3"])
def test_renumbered_model_equals_the_original_with_the_layers_skipped(make):
    model, tokens = make(), tiny_tokens(6, 16)
    depth = 2 if model.config.num_hidden_layers > 3 else 1
    pruned, report = prune(model, tokens, ratio=0, depth=depth, progress=False)
    record = report["depth"]
    removed = record["removed_layers"]
    assert pruned.config.num_hidden_layers == model.config.num_hidden_layers - depth
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(pruned.config.num_hidden_layers))
    kept = [l for l in range(model.config.num_hidden_layers) if l not in removed]
    types = getattr(model.config, "layer_types", None)
    assert getattr(pruned.config, "layer_types", None) == (types and [types[l] for l in kept])
    if isinstance(model, Qwen2ForCausalLM):
        assert len(set(pruned.config.layer_types)) == 2  # sliding and full layers both remain, renumbered
    patch = (record["patched_layer"], pruned.model.layers[kept.index(record["patched_layer"])].mlp.down_proj.weight)
    probe = tiny_tokens(2, 24, seed=4)
    with torch.no_grad():
        expected = skipping(model, removed, patch)(probe).logits
        torch.testing.assert_close(pruned(probe).logits, expected, rtol=1e-5, atol=1e-5)
        # the KV cache is indexed by the new numbers: token-by-token decoding equals the whole-window pass
        out, steps = pruned(probe[:, :12], use_cache=True), []
        for t in range(12, 24):
            out = pruned(probe[:, t:t + 1], cache=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, 1), expected[:, 12:], rtol=1e-4, atol=1e-4)


def test_shortgpt_removes_the_least_influential_layers_unpatched():
    model, tokens = tiny_llama("gqa", layers=5), tiny_tokens(6, 16)
    pruned, report = prune(model, tokens, ratio=0, depth=2, depth_selection="shortgpt", progress=False)
    with torch.no_grad():  # hidden_states[l] enters layer l (the last one is after the final norm: not used)
        states = model(tokens, output_hidden_states=True).hidden_states
    influence = [float((1 - nn.functional.cosine_similarity(states[l], states[l + 1], dim=-1)).mean()) for l in range(4)]
    recorded = report["depth"]["candidates"]
    assert [recorded[str(l)] for l in range(4)] == pytest.approx(influence, rel=1e-5)
    assert report["depth"]["removed_layers"] == sorted(sorted(range(5), key=lambda l: recorded[str(l)])[:2])
    assert report["options"]["compensation"] == "none" and report["depth"]["patched_layer"] is None
    reference = without_layers(model, report["depth"]["removed_layers"])  # no patch: the other weights as they were
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[name], tensor, rtol=0, atol=0)


def test_report_counts_the_removed_layers_and_the_width_step_after_depth(tmp_path):
    model, tokens = tiny_llama("gqa", layers=5), tiny_tokens(6, 16)
    pruned, report = prune(model, tokens, ratio=0, depth=2, progress=False)
    per_layer = adapter_for(model).prunable_parameters(0)
    params = report["parameters"]
    assert params["attention_mlp_before"] - params["attention_mlp_after"] == 2 * per_layer
    assert params["achieved_ratio"] == params["target_ratio"] == pytest.approx(2 / 5)
    assert report["method"] == "depth" and report["loads_without_numprune"]
    record = report["depth"]
    assert record["layers_before"] == 5 and record["ridge"] == DEFAULT_RIDGE and len(record["removed_layers"]) == 2
    best = min(record["candidates"].values())
    assert record["relative_error_after_patch"] == best < record["relative_error_before_patch"]
    assert report["layers"] == [{"heads": 6, "kv_heads": 2, "channels": 40, "kept_heads": list(range(6)),
                                 "kept_kv_heads": [0, 1]}] * 3

    both, combined = prune(model, tokens, ratio=0.3, depth=2, allocation="uniform", progress=False)
    assert combined["depth"] == record and combined["method"] == "numerical-robust"
    assert combined["parameters"]["attention_mlp_before"] == params["attention_mlp_before"]
    assert combined["parameters"]["target_ratio"] == pytest.approx(1 - 0.6 * 0.7)
    assert abs(combined["parameters"]["achieved_ratio"] - combined["parameters"]["target_ratio"]) < 0.05
    assert len(combined["layers"]) == 3 and "depth" in combined["time_s"]
    out = save_pruned(both, None, combined, tmp_path / "out")
    assert json.loads((out / REPORT_NAME).read_text())["depth"] == record
    card = (out / "README.md").read_text()
    assert "(2 whole decoder layers of 5 and attention heads and MLP channels" in card
    assert f"| layers removed | {record['removed_layers']} (patched; least-squares patch folded into layer" in card


def test_depth_is_deterministic():
    model, tokens = tiny_llama("gqa", layers=5), tiny_tokens(6, 16)
    runs = [prune(model, tokens, ratio=0.2, depth=2, progress=False) for _ in range(2)]
    assert runs[0][1]["depth"] == runs[1][1]["depth"]
    for name, tensor in runs[0][0].state_dict().items():
        assert torch.equal(tensor, runs[1][0].state_dict()[name]), name


def test_spans_collected_a_group_at_a_time_choose_what_one_pass_chooses(monkeypatch):
    """With memory for one span's sums at a time, every candidate span gets its own pass, and the removed span,
    the patch and every candidate's error are those of the single pass over all spans."""
    model, tokens = tiny_llama("gqa", layers=6), tiny_tokens(6, 16)
    at_once, one_pass = prune(model, tokens, ratio=0, depth=2, progress=False)
    passes = []
    collect = depth.collect_depth_stats
    monkeypatch.setattr(depth, "collect_depth_stats", lambda *a, starts=None, **k: passes.append(starts) or collect(
        *a, starts=starts, **k))
    hidden, width = model.model.layers[0].mlp.down_proj.weight.shape
    span = 8 * width * (width + hidden)  # one span's float64 G (width x width) and C (width x hidden)
    monkeypatch.setattr(depth, "free_memory", lambda device: 2 * span + 1)
    grouped, report = prune(model, tokens, ratio=0, depth=2, progress=False)
    assert passes == [[1], [2], [3], [4]]
    assert report["depth"] == one_pass["depth"]
    for name, tensor in at_once.state_dict().items():
        assert torch.equal(tensor, grouped.state_dict()[name]), name


@pytest.mark.parametrize("model,options,message", [
    (lambda: tiny_llama("gqa", layers=3), dict(depth=3), "cannot remove 3 of this model's 3 layers; remove at most 2"),
    (lambda: tiny_llama("gqa", layers=3), dict(depth=-1), "depth must be an integer >= 0"),
    (lambda: tiny_llama("gqa", layers=3), dict(depth=1.5), "depth must be an integer >= 0"),
    (lambda: tiny_llama("gqa", layers=3), dict(depth=1, depth_selection="cosine"), "unknown depth selection 'cosine'"),
    (lambda: tiny_llama("gqa", layers=3), dict(depth=1, depth_ridge=-1.0), "depth ridge must be a finite number"),
    (lambda: tiny("gemma3_text"), dict(depth=1), "depth pruning supports the llama, mistral, phi3, qwen2, qwen3 families, "
                                                 "not gemma3_text"),
    (lambda: tiny("gpt2"), dict(depth=1), "not gpt2"),
    (lambda: tiny_llama("gqa", layers=3), dict(depth=1, method="flap"), "method applies to width pruning"),
    (lambda: tiny_llama("gqa", layers=3), dict(depth=1, ratio=1.5), "ratio must be between 0 and 1"),
])
def test_refusals_are_one_line_before_any_work(model, options, message):
    options = {"ratio": 0, **options}
    with pytest.raises(NumpruneError, match=message.replace("(", r"\(")):
        prune(model(), tiny_tokens(), progress=False, **options)


def test_depth_needs_tokens_not_dense_statistics():
    model, tokens = tiny_llama("gqa"), tiny_tokens()
    with pytest.raises(NumpruneError, match="give tokens, not stats"):
        prune(model, tokens, ratio=0.2, depth=1, stats=calibrate(model, tokens, progress=False))
    with pytest.raises(NumpruneError, match="calibration tokens are needed"):
        prune(model, None, ratio=0, depth=1)
    assert layers_for_ratio(30, 0.1) == 3 and layers_for_ratio(5, 0.01) == 1
    with pytest.raises(NumpruneError, match="depth ratio must be between 0 and 1"):
        layers_for_ratio(30, 1.0)


@pytest.mark.parametrize("ratio", [None, 0.3])
def test_depth_alone_and_with_uniform_width_load_in_plain_transformers_in_a_fresh_process(ratio, tmp_path):
    model, tokens = tiny_llama("gqa", layers=5), tiny_tokens(6, 16)
    width = dict(ratio=ratio, allocation="uniform") if ratio else dict(ratio=0)
    pruned, report = prune(model, tokens, depth=2, progress=False, **width)
    assert report["loads_without_numprune"] and report["config_class"] == "LlamaConfig"
    out = save_pruned(pruned, None, report, tmp_path / "out")
    probe = tiny_tokens(2, 12, seed=5)
    [(logits, (cls, had_numprune))] = reload_all([out], [], probe, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits, pruned(probe).logits, rtol=1e-5, atol=1e-5)
    assert (cls, had_numprune) == ("LlamaForCausalLM", "False")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    card = (out / "README.md").read_text()  # depth alone: nothing allocated or refitted; the whole run's target
    assert ("| allocation |" in card) == bool(ratio) and ("| compensation |" in card) == bool(ratio)
    assert f"| ratio | target {report['parameters']['target_ratio']:.4g}, achieved" in card


def test_prune_command_removes_layers_and_refuses_bad_depth(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "shallow"
    status = main(["prune", "--model", str(tiny_model_folder), "--depth", "1", "--nsamples", "2", "--seqlen", "16",
                   "--out", str(out), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "depth:  removed layers [1] of 2 (patched, patch in layer 0" in printed
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["depth"]["removed_layers"] == [1] and report["loads_without_numprune"]
    for extra, message in (([], "nothing to remove: give --ratio, --recipe, --depth or --depth-ratio"),
                           (["--depth", "2"], "cannot remove 2 of this model's 2 layers"),
                           (["--depth", "1", "--depth-ratio", "0.5"], "--depth-ratio: not allowed with argument --depth"),
                           (["--depth", "0"], "--depth: must be a positive integer, got 0"),
                           (["--depth-ratio", "1"], "--depth-ratio: must be between 0 and 1 (exclusive)"),
                           (["--depth", "1", "--depth-selection", "x"], "argument --depth-selection: invalid choice: 'x'")):
        status = main(["prune", "--model", str(tiny_model_folder), "--nsamples", "2", "--seqlen", "16",
                       "--out", str(tmp_path / "refused"), "--quiet", *extra])
        assert status == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


@needs_llama_cpp
@pytest.mark.parametrize("ratio", [None, 0.3])
def test_depth_pruned_export_runs_in_llama_cpp_as_in_transformers(ratio, tmp_path):
    model, tokens = tiny_llama("gqa", layers=5), tiny_tokens(6, 16)
    width = dict(ratio=ratio, allocation="uniform") if ratio else dict(ratio=0)
    pruned, report = prune(model, tokens, depth=2, progress=False, **width)
    folder = save_pruned(pruned, None, report, tmp_path / "pruned")
    result = export_gguf(folder, tmp_path / "pruned.gguf", "f32")
    assert result.architecture == "llama"
    llm = llamacpp.load(result.path, n_ctx=128, exact=True)
    probe = tiny_tokens(1, 48, seed=5)[0]
    with torch.no_grad():
        expected = torch.log_softmax(pruned(probe[None]).logits[0].double(), -1).numpy()
    assert np.abs(llamacpp.log_probs(llm, probe) - expected).max() < 1e-4
    llm.close()


def test_compare_entries_take_depth_first_and_match_prune():
    model, tokens, windows = tiny_llama("gqa", layers=4), tiny_tokens(), tiny_tokens(2, 12, seed=7)
    evaluation = Perplexity({"w": (windows, {})})
    entries = ["numerical", "numerical:depth=1:depth_ridge=0.1"]
    results = compare.run_grid(model, tokens, compare.recipes(entries, [0.3]), evaluation, calibration_info={},
                               progress=False)
    row = results["rows"][2]
    alone, report = prune(model, tokens, ratio=0.3, depth=1, depth_ridge=0.1, method="numerical", progress=False)
    assert row["depth"] == report["depth"] and row["depth"]["ridge"] == 0.1
    assert row["ppl"]["w"] == pytest.approx(perplexity(alone, windows, progress=False)["ppl"], rel=1e-6)
    for entry, message in (("numerical:depth=-1", "depth must be an integer >= 0"),
                           ("numerical:depth_ridge=0.1", "depth_ridge is a depth option; it applies only with depth > 0"),
                           ("numerical:depth=1:depth_selection=cosine", "unknown depth selection 'cosine'"),
                           ("numerical:depth=x", "bad value 'x' for depth")):
        with pytest.raises(NumpruneError, match=message):
            compare.recipes([entry], [0.3])


def test_depth_pruned_export_is_a_llama_gguf_with_fewer_blocks(tmp_path):
    """Without llama.cpp: the file llama.cpp would load (the test above runs it where the bindings are)."""
    pruned, report = prune(tiny_llama("gqa", layers=5), tiny_tokens(6, 16), ratio=0, depth=2, progress=False)
    result = export_gguf(save_pruned(pruned, None, report, tmp_path / "pruned"), tmp_path / "pruned.gguf", "f32")
    fields = gguf.GGUFReader(result.path).fields
    assert result.architecture == "llama" and fields["llama.block_count"].contents() == 3
    names = {t.name for t in gguf.GGUFReader(result.path).tensors}
    assert {"blk.2.ffn_down.weight"} <= names and not any(n.startswith("blk.3.") for n in names)
    assert fields["numprune.method"].contents() == "depth"
