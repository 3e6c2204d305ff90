"""The pruning stages on tiny random LLaMA-layout models: statistics, allocation, surgery."""

import copy
import json

import pytest
import torch
from conftest import SHAPES, assert_valid_groups, stages, tiny_llama, tiny_tokens

from numprune.adapters import adapter_for
from numprune.adapters.base import head_channels
from numprune.allocate import ALLOCATIONS, allocate
from numprune.api import prune
from numprune.calibrate import InputStats, LayerStream, collect_statistics
from numprune.criteria import LayerScores
from numprune.errors import NumpruneError
from numprune.save import save_pruned


def test_statistics_equal_a_brute_force_pass(tokens):
    model = tiny_llama("gqa")
    adapter = adapter_for(model)
    seen = {}
    hooks = [adapter.mlp_output(layer).register_forward_pre_hook(
        lambda _m, args, i=i: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(adapter.layers())]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    stats = collect_statistics(model, adapter, tokens, batch_size=4, progress=False)
    for i, s in enumerate(stats):
        x = torch.cat(seen[i]).double()
        # The layer-by-layer pass in batches of 4 and the whole-model pass round float32 differently.
        reference = x.T @ x
        torch.testing.assert_close(s.mlp.gram, reference, rtol=1e-4, atol=1e-6 * reference.abs().max().item())
        torch.testing.assert_close(s.mlp.total, x.sum(0), rtol=1e-5, atol=1e-6)
        assert s.mlp.count == tokens.numel()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("gqa_unit", ["query", "kv-group"])
def test_shrunk_model_equals_masked_model(shape, allocation, gqa_unit, tokens):
    model = tiny_llama(shape)
    compensation = "affine" if allocation == "compensated-error" else None  # affine's bias survives the surgery
    masked, shrunk, plans = stages(model, tokens, allocation=allocation, gqa_unit=gqa_unit, compensation=compensation)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    probe = tiny_tokens(3, 20, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(probe).logits, masked(probe).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(shrunk(probe).logits, model(probe).logits, atol=1e-3)


@pytest.mark.parametrize("shape", ["gqa", "gqa9"])
def test_gqa_groups_stay_valid(shape, tokens):
    model = tiny_llama(shape)
    for unit in ("query", "kv-group"):
        for ratio in (0.2, 0.5, 0.7):
            for allocation in ("global", "flap-widths", "blend", "compensated-error"):
                _, shrunk, plans = stages(model, tokens, ratio=ratio, gqa_unit=unit, allocation=allocation)
                assert_valid_groups(adapter_for(model), plans, unit)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_achieved_ratio_is_close_to_the_target(allocation, tokens):
    model = tiny_llama("mha", hidden_size=64, intermediate_size=128)
    for ratio in (0.1, 0.3, 0.5):
        _, report = prune(model, tokens, ratio=ratio, allocation=allocation, progress=False)
        p = report["parameters"]
        adapter = adapter_for(model)
        head_cost = adapter.unit_costs(0).query_head + adapter.unit_costs(0).kv_head
        assert abs(p["achieved_ratio"] - ratio) * p["attention_mlp_before"] <= head_cost * adapter.num_layers()
        assert p["attention_mlp_before"] - p["attention_mlp_after"] == (
            p["total_before"] - p["total_after"])


def test_uniform_allocation_keeps_every_layer_the_same(tokens):
    _, report = prune(tiny_llama("gqa"), tokens, ratio=0.4, allocation="uniform", progress=False)
    assert len({(l["heads"], l["kv_heads"], l["channels"]) for l in report["layers"]}) == 1


def test_global_allocation_prefers_low_scores():
    """With hand-made scores, global allocation removes exactly the lowest-scoring units."""
    model = tiny_llama("mha", layers=2)
    adapter = adapter_for(model)
    scores = [LayerScores(torch.tensor([0.9, 0.1, 0.8, 0.7], dtype=torch.float64), torch.ones(48, dtype=torch.float64)),
              LayerScores(torch.tensor([0.95, 0.92, 0.93, 0.94], dtype=torch.float64), torch.ones(48, dtype=torch.float64))]
    costs = adapter.unit_costs(0)
    ratio = 2 * (costs.query_head + costs.kv_head) / sum(adapter.prunable_parameters(i) for i in range(2))
    plans = allocate(adapter, scores, ratio)
    assert plans[0].heads == (0, 2)  # heads 1 (0.1) and 3 (0.7) go; layer 1's heads all score higher
    assert plans[1].heads == (0, 1, 2, 3)


def test_same_inputs_give_the_same_result(tokens):
    model = tiny_llama("gqa9")
    a, report_a = prune(model, tokens, ratio=0.35, progress=False)
    b, report_b = prune(model, tokens, ratio=0.35, progress=False)
    assert report_a["layers"] == report_b["layers"]
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_prune_leaves_the_input_model_untouched(tokens):
    model = tiny_llama("gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, tokens, ratio=0.3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compensation_lowers_the_model_error():
    model = tiny_llama("gqa")
    probe = tiny_tokens(4, 16, seed=9)
    calibration = tiny_tokens(32, 32)  # enough tokens for inputs 48 wide that the refit does not overfit them
    with torch.no_grad():
        dense = model(probe).logits
    errors = {}
    for name, options in {"none": dict(compensation="none"), "dense": {}}.items():
        pruned, _ = prune(model, calibration, ratio=0.3, progress=False, **options)
        with torch.no_grad():
            errors[name] = (pruned(probe).logits - dense).pow(2).mean().item()
    assert errors["dense"] < errors["none"]


def test_sequential_statistics_fit_the_inputs_the_pruned_model_really_sees(tokens):
    """Layer 1's attention output projection, given the inputs it receives once layer 0 is pruned: the
    sequential refit is the least-squares optimum for exactly those inputs, the dense one is not."""
    model = tiny_llama("gqa", layers=2)
    adapter = adapter_for(model)
    runs = {stats: prune(model, tokens, ratio=0.4, allocation="uniform", compensation_damp=0.0, progress=False,
                         compensation_stats=stats) for stats in ("dense", "sequential")}
    kept = {stats: report["layers"][1]["kept_heads"] for stats, (_, report) in runs.items()}
    assert kept["dense"] == kept["sequential"]  # the same selection; only the refit differs
    hybrid = copy.deepcopy(model)  # the dense model behind the pruned layer 0 (identical in both runs)
    hybrid.model.layers[0] = runs["dense"][0].model.layers[0]
    seen = []
    hook = adapter.attention_output(adapter_for(hybrid).layers()[1]).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        hybrid(tokens)
    hook.remove()
    x = torch.cat(seen).double()
    dense_weight = adapter.attention_output(adapter.layers()[1]).weight.double()
    columns = head_channels(tuple(kept["dense"]), adapter.attention_layout(1).head_dim)
    errors = {}
    for stats, (pruned, _) in runs.items():
        refit = torch.zeros_like(dense_weight)
        refit[:, columns] = adapter_for(pruned).attention_output(adapter_for(pruned).layers()[1]).weight.double()
        errors[stats] = (x @ (refit - dense_weight).T).pow(2).sum().item()
    assert errors["sequential"] < errors["dense"]


def test_bad_ratios_and_options_are_clear_errors(tokens):
    model = tiny_llama("gqa")
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(NumpruneError, match="ratio must be between"):
            prune(model, tokens, ratio=ratio, progress=False)
    with pytest.raises(NumpruneError, match="leave"):
        prune(model, tokens, ratio=0.97, progress=False)
    with pytest.raises(NumpruneError, match="leave"):
        prune(model, tokens, ratio=0.9, allocation="uniform", progress=False)
    with pytest.raises(NumpruneError, match="unknown method"):
        prune(model, tokens, ratio=0.3, method="nope", progress=False)
    with pytest.raises(NumpruneError, match="unknown allocation"):
        prune(model, tokens, ratio=0.3, allocation="nope", progress=False)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_round_to_keeps_widths_at_multiples(allocation, tokens):
    model = tiny_llama("gqa", intermediate_size=64)
    masked, shrunk, plans = stages(model, tokens, ratio=0.3, allocation=allocation, round_to=8)
    assert all(len(p.channels) % 8 == 0 and p.channels for p in plans)
    probe = tiny_tokens(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(probe).logits, masked(probe).logits, rtol=1e-4, atol=1e-4)
    _, report = prune(model, tokens, ratio=0.3, allocation=allocation, round_to=8, progress=False)
    assert abs(report["parameters"]["achieved_ratio"] - 0.3) < 0.1


def test_statistics_wait_on_disk_and_come_back_exactly(tokens):
    model = tiny_llama("gqa")
    adapter = adapter_for(model)
    stats = collect_statistics(model, adapter, tokens, batch_size=4, progress=False)
    assert len(stats) == adapter.num_layers()
    assert not any(torch.is_tensor(v) for v in vars(stats).values())  # nothing held in memory
    stream = LayerStream(model, adapter, tokens, 4)
    for i, layer in enumerate(adapter.layers()):
        fresh = stream.run(layer, collect=True, advance=True)
        for part in ("attention", "mlp"):
            a, b = getattr(stats[i], part), getattr(fresh, part)
            assert torch.equal(a.gram, b.gram) and torch.equal(a.total, b.total) and a.count == b.count
    with pytest.raises(IndexError):
        stats[len(stats)]


def test_gram_matrix_formed_in_row_blocks_equals_the_whole_product(monkeypatch):
    monkeypatch.setitem(InputStats.add.__globals__, "GRAM_BLOCK", 3)  # 7 channels: blocks of 3, 3 and 1 rows
    x = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    stats = InputStats.empty(7)
    stats.add(x)
    flat = x.reshape(-1, 7).double()
    torch.testing.assert_close(stats.gram, flat.T @ flat, rtol=1e-6, atol=1e-6)
    assert stats.count == 10


def test_the_report_is_typed_reads_like_its_json_and_is_saved_as_it(tokens, tmp_path):
    model = tiny_llama("gqa")
    pruned, report = prune(model, tokens, ratio=0.3, heal=False, progress=False)
    saved = json.loads((save_pruned(pruned, None, report, tmp_path / "out") / "pruning_report.json").read_text())
    assert saved == report.to_json() and list(saved) == list(report) and report["layers"] == saved["layers"]
    assert report.parameters.total_before == sum(p.numel() for p in model.parameters())
    assert report.parameters.total_after == sum(p.numel() for p in pruned.parameters())
    pruned_adapter = adapter_for(pruned)
    assert [(len(p.heads), len(p.channels)) for p in report.layers] == [
        (pruned_adapter.attention_layout(i).num_heads, pruned_adapter.mlp_width(i)) for i in range(3)]
    assert not {"model", "perplexity", "image_measures", "peak_gpu_bytes"} & set(saved)  # only what was set
    report.model = "tiny"
    record = {"text": {"dense": 2.0, "pruned": 3.0, "protocol": {"windows": 1}}}
    report.measured = {"perplexity": record}  # an evaluation's record, under its report key, after the model
    assert list(report)[-2:] == ["model", "perplexity"] and report["perplexity"] == record


def test_scoring_has_a_progress_bar_that_quiet_silences(tokens, capsys):
    """Scoring shares calibration's visit of each layer and takes most of it: the bar names it, with and without
    a calibration pass; ``progress=False`` (the command line's --quiet) shows no bar."""
    model = tiny_llama("gqa")
    prune(model, tokens, ratio=0.3, progress=True)
    bars = capsys.readouterr().err
    assert "calibrating and scoring" in bars and f"{adapter_for(model).num_layers()}/" in bars
    prune(model, tokens, ratio=0.3, progress=True, stats=collect_statistics(model, adapter_for(model), tokens, 2, False))
    assert "scoring" in capsys.readouterr().err
    prune(model, tokens, ratio=0.3, progress=False)
    assert capsys.readouterr().err == ""
