"""The allocations against hand computations and brute force: flap-widths, blend, compensated-error, the ratio
that global and blend reach, uniform's rounding and round_to's tolerance."""

import copy
import math
from fractions import Fraction

import pytest
import torch
from conftest import tiny_llama, tiny_tokens
from transformers import LlamaConfig, LlamaForCausalLM

from numprune import compensate
from numprune.adapters import adapter_for
from numprune.adapters.base import projection_weight
from numprune.allocate import BLEND_FROM, BLEND_MAX, BLEND_TO, allocate, blend_schedule, layer_guide
from numprune.api import prune
from numprune.calibrate import collect_statistics
from numprune.cli import parser
from numprune.cli.prune import prune_options
from numprune.criteria import LayerScores, numerical
from numprune.errors import NumpruneError
from numprune.pipeline import criterion_inputs
from numprune.recipe import PruneOptions
from numprune.stream import prune_streaming


def calibrated(shape="mha", layers=3, **overrides):
    model = tiny_llama(shape, layers=layers, **overrides)
    adapter = adapter_for(model)
    tokens = tiny_tokens(8, 24)
    return model, adapter, tokens, collect_statistics(model, adapter, tokens, batch_size=4, progress=False)


def test_flap_widths_by_hand():
    """FLAP's standardised metric ranked globally with exact costs gives the widths; the Newton score picks inside."""
    model, adapter, _, stats = calibrated()
    ratio = 0.35
    inputs = [criterion_inputs(adapter, i, adapter.layers()[i], s, ratio) for i, s in enumerate(stats)]
    candidates = []  # (standardised score, layer, kind, cost) of every unit but each layer's best of its kind
    for i, x in enumerate(inputs):
        layout, costs = x.layout, adapter.unit_costs(i)
        var_a, var_m = x.stats.attention.variance, x.stats.mlp.variance
        attn = (var_a * (x.attention_weight.double() ** 2).sum(0)) ** 2
        mlp = var_m * (x.mlp_weight.double() ** 2).sum(0)
        za = (attn - attn.mean()) / attn.std()
        zm = (mlp - mlp.mean()) / mlp.std()
        heads = sorted(za.reshape(layout.num_heads, layout.head_dim).mean(1).tolist())
        candidates += [(h, i, "attn", costs.query_head + costs.kv_head) for h in heads[:-1]]
        candidates += [(c, i, "mlp", costs.channel) for c in sorted(zm.tolist())[:-1]]
    target = ratio * sum(adapter.prunable_parameters(i) for i in range(len(inputs)))
    cheapest = min(c[-1] for c in candidates)
    removed, total = {}, 0
    for _score, i, kind, cost in sorted(candidates):
        if total >= target:
            break
        if total + cost >= target + cheapest:  # would overshoot by a channel or more: cheaper units close the gap
            continue
        removed[i, kind] = removed.get((i, kind), 0) + 1
        total += cost
    assert target <= total < target + cheapest

    scores = [numerical.score(x) for x in inputs]
    guides = [layer_guide("flap-widths", adapter, x, s, "least-squares", compensate.Damped())
              for x, s in zip(inputs, scores)]
    plans = allocate(adapter, scores, ratio, "flap-widths", guides=guides)
    for i, (plan, s) in enumerate(zip(plans, scores)):
        layout = adapter.attention_layout(i)
        assert layout.num_heads - len(plan.heads) == removed.get((i, "attn"), 0)
        assert adapter.mlp_width(i) - len(plan.channels) == removed.get((i, "mlp"), 0)
        # inside the layer, the Newton score's lowest go
        assert set(plan.heads) == set(s.heads.argsort(stable=True)[layout.num_heads - len(plan.heads):].tolist())
        assert set(plan.channels) == set(s.channels.argsort(stable=True)[-len(plan.channels):].tolist())


def test_compensated_error_guide_equals_compensating_and_measuring():
    """The guide's curve: remove the k lowest-ranked units, compensate the real projection, measure, divide."""
    model, adapter, _, stats = calibrated("gqa9")
    i = 1
    x = criterion_inputs(adapter, i, adapter.layers()[i], stats[i], 0.3)
    s = numerical.score(x)
    options = compensate.Damped(0.0)
    attn_curve, mlp_curve = layer_guide("compensated-error", adapter, x, s, "affine", options)
    layer = adapter.layers()[i]
    parts = ((adapter.attention_output(layer), stats[i].attention), (adapter.mlp_output(layer), stats[i].mlp))
    weights = [projection_weight(m).detach().double() for m, _ in parts]
    energy = sum(float(((w @ st.second_moment) * w).sum()) for w, (_, st) in zip(weights, parts))

    def measured(module, st, keep):
        probe = copy.deepcopy(module).double()
        w = projection_weight(module).detach().double()
        compensate.apply(probe, keep, compensate.REGISTRY["affine"].fit(w, st, keep, options))
        d = projection_weight(probe).detach() - w  # output change on inputs x: d x + bias
        b = probe.bias.detach() if probe.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        mu = st.mean
        return float(((d @ st.second_moment) * d).sum() + 2 * b @ (d @ mu) + b @ b) / energy

    order = sorted(range(adapter.mlp_width(i)), key=lambda c: (s.channels[c].item(), c))
    for k in (0, 1, 5, 20, 44):
        keep = torch.tensor(sorted(order[k:]))
        torch.testing.assert_close(mlp_curve[k].item(), measured(parts[1][0], parts[1][1], keep), rtol=1e-6, atol=1e-9)
    layout = x.layout
    slots = [sorted(range(g * 3, g * 3 + 3), key=lambda h: (s.heads[h].item(), h)) for g in range(layout.num_kv_heads)]
    slot_scores = [sum(s.heads[group[r]].item() for group in slots) / 3 for r in range(3)]
    removal = sorted(range(3), key=lambda r: (slot_scores[r], tuple(sorted(group[r] for group in slots))))
    for k in range(3):
        gone = {group[r] for r in removal[:k] for group in slots}
        keep = torch.tensor([h * layout.head_dim + c for h in range(layout.num_heads) if h not in gone
                             for c in range(layout.head_dim)])
        torch.testing.assert_close(attn_curve[k].item(), measured(parts[0][0], parts[0][1], keep), rtol=1e-6, atol=1e-9)


def test_compensated_error_removes_where_the_relative_error_per_parameter_is_lowest():
    """A layer whose MLP is made redundant (duplicated channels) loses the most channels."""
    model = tiny_llama("mha", layers=3)
    with torch.no_grad():
        layer = adapter_for(model).layers()[1]
        half = layer.mlp.up_proj.weight.shape[0] // 2
        for proj in (layer.mlp.up_proj, layer.mlp.gate_proj):
            proj.weight[half:2 * half] = proj.weight[:half]
    _, report = prune(model, tiny_tokens(8, 24), ratio=0.2, allocation="compensated-error", progress=False)
    widths = [l["channels"] for l in report["layers"]]
    assert widths[1] == min(widths) and widths[1] <= 48 - 20  # the duplicates went almost for free


def test_exact_cost_accounting_for_the_new_allocations():
    model, _, tokens, _ = calibrated("gqa", layers=4)
    for allocation in ("flap-widths", "blend", "compensated-error"):
        for ratio in (0.2, 0.5):
            pruned, report = prune(model, tokens, ratio=ratio, allocation=allocation, compensation="affine",
                                   progress=False)
            p = report["parameters"]
            removed = sum(q.numel() for q in model.parameters()) - sum(q.numel() for q in pruned.parameters())
            biases = sum(q.numel() for n, q in pruned.named_parameters() if n.endswith("o_proj.bias")
                         or n.endswith("down_proj.bias"))
            assert p["attention_mlp_before"] - p["attention_mlp_after"] == removed + biases
            assert p["achieved_ratio"] >= ratio


def _plans_and_scores(ratio, allocation, shape="gqa9", **options):
    model, adapter, _, stats = calibrated(shape, layers=4)
    inputs = [criterion_inputs(adapter, i, adapter.layers()[i], s, ratio) for i, s in enumerate(stats)]
    scores = [numerical.score(x) for x in inputs]
    guides = [layer_guide(allocation, adapter, x, s, "least-squares", compensate.Damped())
              for x, s in zip(inputs, scores)]
    return adapter, allocate(adapter, scores, ratio, allocation, guides=guides, **options)


def _removed_counts(adapter, plans):
    """(query heads, MLP channels) each layer loses."""
    return [(adapter.attention_layout(i).num_heads - len(p.heads), adapter.mlp_width(i) - len(p.channels))
            for i, p in enumerate(plans)]


@pytest.mark.parametrize("shape", ["mha", "gqa9"])
def test_blend_weights_zero_and_one_are_flap_widths_and_global(shape):
    for ratio in (0.2, 0.45):
        _, flap_widths = _plans_and_scores(ratio, "flap-widths", shape)
        _, global_ = _plans_and_scores(ratio, "global", shape)
        assert flap_widths != global_  # otherwise the test could not tell them apart
        assert _plans_and_scores(ratio, "blend", shape, blend_weight=0.0)[1] == flap_widths
        assert _plans_and_scores(ratio, "blend", shape, blend_weight=1.0)[1] == global_


def test_blend_counts_by_largest_remainders():
    """Each layer and kind loses the whole part of (1-w) flap + w global, then, by smallest overshoot of its own
    count (largest remainder first; lower layer, MLP before attention on ties), one more unit until the removed
    parameters reach the target, passing over a unit that would overshoot it by a channel's cost or more."""
    ratio, weight = 0.35, 0.5
    adapter, flap_widths = _plans_and_scores(ratio, "flap-widths")
    _, global_ = _plans_and_scores(ratio, "global")
    _, blend = _plans_and_scores(ratio, "blend", blend_weight=weight)
    per_unit = adapter.attention_layout(0).num_kv_heads  # a GQA unit is a query slot: one head of every group
    costs = [adapter.unit_costs(i) for i in range(adapter.num_layers())]
    unit_cost = {"attn": [c.query_head * per_unit for c in costs], "mlp": [c.channel for c in costs]}
    counts, fractions = {}, []
    for i, (f, g) in enumerate(zip(_removed_counts(adapter, flap_widths), _removed_counts(adapter, global_))):
        for kind, fk, gk in (("attn", f[0] // per_unit, g[0] // per_unit), ("mlp", f[1], g[1])):
            real = (1 - weight) * fk + weight * gk
            counts[i, kind] = math.floor(real + 1e-9)
            units = adapter.attention_layout(i).num_heads // per_unit if kind == "attn" else adapter.mlp_width(i)
            fractions += [(round(k - real, 9), i, kind != "mlp", k, kind) for k in range(counts[i, kind], units - 1)]
    target = ratio * sum(adapter.prunable_parameters(i) for i in range(adapter.num_layers()))
    total = sum(n * unit_cost[kind][i] for (i, kind), n in counts.items())
    cheapest = min(unit_cost["mlp"])
    for _, i, _, _, kind in sorted(fractions):
        if total >= target:
            break
        if total + unit_cost[kind][i] >= target + cheapest:
            continue
        counts[i, kind] += 1
        total += unit_cost[kind][i]
    assert target <= total < target + cheapest
    got = _removed_counts(adapter, blend)
    assert [(counts[i, "attn"] * per_unit, counts[i, "mlp"]) for i in range(adapter.num_layers())] == got
    assert got not in (_removed_counts(adapter, flap_widths), _removed_counts(adapter, global_))


def test_blend_schedule_and_its_options():
    assert blend_schedule(BLEND_FROM) == 0.0 and blend_schedule(0.01) == 0.0
    assert blend_schedule(BLEND_TO) == BLEND_MAX and blend_schedule(0.99) == BLEND_MAX
    middle = (BLEND_FROM + BLEND_TO) / 2
    assert blend_schedule(middle) == pytest.approx(BLEND_MAX / 2)
    assert PruneOptions.checked(middle, allocation="blend").blend_weight == pytest.approx(BLEND_MAX / 2)
    assert PruneOptions.checked(0.3, allocation="blend", blend_weight=0.8).blend_weight == 0.8
    assert PruneOptions.parse("numerical:allocation=blend:blend_weight=0.25", 0.3).blend_weight == 0.25
    with pytest.raises(NumpruneError, match="blend weight must be between 0 and 1"):
        PruneOptions.checked(0.3, allocation="blend", blend_weight=1.5)
    with pytest.raises(NumpruneError, match="applies to the blend allocation only"):
        PruneOptions.checked(0.3, allocation="global", blend_weight=0.5)


def test_the_default_method_is_numerical_robust_with_the_blend_schedule():
    args = parser().parse_args(["prune", "--ratio", "0.4", "--out", "unused"])
    opts = prune_options(args)
    assert (opts.method, opts.allocation, opts.compensation) == ("numerical-robust", "blend", "least-squares")
    assert opts.blend_weight == BLEND_MAX
    assert PruneOptions.checked(0.1, method="numerical-robust").blend_weight == 0.0
    assert PruneOptions.checked(0.1, method="numerical").allocation == "global"  # the paper's method is kept


# SmolLM2-135M's shapes: 30 layers, 3 query slots of 3 heads each (221,184 parameters), MLP channels of 1,728.
SMOLLM2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
               intermediate_size=1536, vocab_size=49152)


def shaped(shape: str):
    """The adapter of a tiny model, or of a SmolLM2-shaped one without weights (allocation reads shapes only)."""
    if shape == "smollm2":
        with torch.device("meta"):
            return adapter_for(LlamaForCausalLM(LlamaConfig(**SMOLLM2)))
    return adapter_for(tiny_llama(shape, layers=4))


def random_scores(adapter, seed: int) -> list[LayerScores]:
    generator = torch.Generator().manual_seed(seed)
    return [LayerScores(torch.rand(adapter.attention_layout(i).num_heads, generator=generator, dtype=torch.float64),
                        torch.rand(adapter.mlp_width(i), generator=generator, dtype=torch.float64))
            for i in range(adapter.num_layers())]


@pytest.mark.parametrize("allocation", ["global", "blend", "flap-widths"])
@pytest.mark.parametrize("shape", ["mha", "gqa", "gqa9", "smollm2"])
def test_the_removed_parameters_land_within_one_mlp_channel_above_the_target(shape, allocation):
    adapter = shaped(shape)
    layers = range(adapter.num_layers())
    total = sum(adapter.prunable_parameters(i) for i in layers)
    channel = max(adapter.unit_costs(i).channel for i in layers)
    for k, ratio in enumerate((0.1, 0.2, 0.25, 0.275, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)):
        plans = allocate(adapter, random_scores(adapter, k), ratio, allocation, guides=random_scores(adapter, 100 + k))
        removed = total - sum(adapter.prunable_parameters(i, plan) for i, plan in zip(layers, plans))
        assert 0 <= removed - ratio * total < channel, (ratio, removed / total)


def test_a_unit_that_would_overshoot_is_passed_over_for_the_next_channels():
    """Target 1.5 heads: the lowest head goes; the next head would overshoot by half a head, so the lowest-scoring
    MLP channels close the gap instead (as few as reach the target)."""
    adapter = adapter_for(tiny_llama("mha", layers=2))
    channels = torch.arange(48, dtype=torch.float64) + 1  # all above every head but layer 0's; channel 0 lowest
    scores = [LayerScores(torch.tensor([0.9, 0.1, 0.8, 0.7], dtype=torch.float64), channels),
              LayerScores(torch.tensor([0.95, 0.92, 0.93, 0.94], dtype=torch.float64), channels + 0.5)]
    costs = adapter.unit_costs(0)
    head = costs.query_head + costs.kv_head
    ratio = 1.5 * head / sum(adapter.prunable_parameters(i) for i in range(2))
    plans = allocate(adapter, scores, ratio)
    gone = math.ceil(0.5 * head / costs.channel)  # channels 0, 1, ... of layer 0, then of layer 1, alternately
    assert plans[0].heads == (0, 2, 3) and plans[1].heads == (0, 1, 2, 3)
    assert plans[0].channels == tuple(range((gone + 1) // 2, 48))
    assert plans[1].channels == tuple(range(gone // 2, 48))


@pytest.mark.parametrize("shape", ["odd", "gqa9"])
def test_uniform_rounds_halves_up(shape):
    """Each layer loses the nearest whole number of attention units, halves up, then of MLP channels for the rest of
    its share; computed here in exact fractions (50% of 5 heads is 2.5: 3 go, where round() would say 2)."""
    adapter = adapter_for(tiny_llama(shape, layers=2))
    for ratio in ("0.1", "0.3", "0.5", "0.7"):
        plans = allocate(adapter, random_scores(adapter, 0), float(ratio), "uniform")
        for i, plan in enumerate(plans):
            layout, costs = adapter.attention_layout(i), adapter.unit_costs(i)
            size = layout.group_size if layout.group_size > 1 else 1
            units = layout.num_heads // size
            n_attn = math.floor(Fraction(ratio) * units + Fraction(1, 2))
            need = Fraction(ratio) * adapter.prunable_parameters(i) - n_attn * size * costs.query_head - (
                n_attn * costs.kv_head if size == 1 else 0)
            n_mlp = max(0, math.floor(need / costs.channel + Fraction(1, 2)))
            assert (layout.num_heads - len(plan.heads), adapter.mlp_width(i) - len(plan.channels)) == (
                n_attn * size, n_mlp), (ratio, i)


def test_round_to_is_checked_on_the_real_plan_before_anything_is_written(tmp_path):
    """Equal scores (the dry run) spread the removal so that multiples of 32 stay near 10%; the real scores put
    channels in every layer, each then rounds to 16 removed channels: 21.6%, refused before any output."""
    model = tiny_llama("mha", layers=3)
    options = dict(ratio=0.1, method="random", allocation="global", round_to=32, progress=False)
    message = "round_to 32 would remove 21.6% of the attention\\+MLP parameters against a target of 10.0%"
    with pytest.raises(NumpruneError, match=message):
        prune(model, tiny_tokens(), **options)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(NumpruneError, match=message):
        prune_streaming(tmp_path / "dense", tiny_tokens(), out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
