"""Every supported transformers family on a tiny random model: surgery, GQA, saved folders, costs, errors."""

import pytest
import torch
from conftest import COMMON, FAMILIES, GEMMA, assert_valid_groups, break_symmetry, reload_all, stages, tiny, tiny_tokens
from transformers import BloomConfig, BloomForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from numprune.adapters import adapter_for, supported_model_types
from numprune.adapters.base import LayerPlan
from numprune.api import prune
from numprune.errors import NumpruneError
from numprune.save import save_pruned
from numprune.shrink import shrink

# Stock configs cannot express fewer heads where head_dim = hidden / heads.
DERIVED_HEAD_DIM = {"opt", "gpt2"}
PROBE = tiny_tokens(3, 20, seed=7)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_shrunk_model_equals_masked_model(family, allocation, tokens):
    model = tiny(family)
    masked, shrunk, plans = stages(model, tokens, allocation=allocation)
    assert shrunk.config.model_type == family or shrunk.config.model_type == f"numprune_{family}"
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(shrunk(PROBE).logits, masked(PROBE).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(shrunk(PROBE).logits, model(PROBE).logits, atol=1e-3)
    uniform = len({(len(p.heads), len(p.kv_heads), len(p.channels)) for p in plans}) == 1
    stock = uniform and (family not in DERIVED_HEAD_DIM or len(plans[0].heads) == FAMILIES[family][1].num_attention_heads)
    assert (shrunk.config.model_type == family) == stock


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma3_text", "phi3"])
def test_gqa_stays_valid(family, tokens):
    model = tiny(family)
    for unit in ("query", "kv-group"):
        _, shrunk, plans = stages(model, tokens, ratio=0.5, gqa_unit=unit)
        assert_valid_groups(adapter_for(model), plans, unit)
        after = adapter_for(shrunk)
        for i, plan in enumerate(plans):
            assert (after.attention_layout(i).num_heads, after.attention_layout(i).num_kv_heads) == (
                len(plan.heads), len(plan.kv_heads))


def test_gemma3_one_kv_head_uniform_heads_not_dividing_hidden(tokens):
    """Gemma 3 270M's layout (4 query heads on 1 KV head): 3 heads do not divide hidden 40, which the stock
    config refuses even though head_dim is explicit, so even a uniform result takes numprune's config."""
    torch.manual_seed(0)
    model = break_symmetry(Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, **{**GEMMA, "num_key_value_heads": 1})).eval())
    masked, shrunk, plans = stages(model, tokens, ratio=0.25, allocation="uniform")
    assert {(len(p.heads), len(p.kv_heads)) for p in plans} == {(3, 1)}
    assert type(shrunk.config).__name__ == "NumpruneGemma3TextConfig"
    with torch.no_grad():
        torch.testing.assert_close(shrunk(PROBE).logits, masked(PROBE).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unit_costs_count_the_parameters_that_leave(family, tokens):
    """The parameter accounting (unit costs) agrees with the parameters the shrunk model really lost."""
    _, report = prune(tiny(family), tokens, ratio=0.3, progress=False)
    p = report["parameters"]
    assert p["attention_mlp_before"] - p["attention_mlp_after"] == p["total_before"] - p["total_after"] > 0
    assert abs(p["achieved_ratio"] - 0.3) < 0.1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_unit_cost_is_what_its_removal_takes(family):
    """Brute force per unit kind: shrink away exactly one MLP channel, then one KV group, and count."""
    model = tiny(family)
    adapter = adapter_for(model)
    full = [adapter.full_plan(i) for i in range(adapter.num_layers())]
    costs, layout = adapter.unit_costs(1), adapter.attention_layout(1)
    group = tuple(range(layout.group_size))
    fewer = {
        "channel": LayerPlan(full[1].heads, full[1].kv_heads, full[1].channels[1:]),
        "group": LayerPlan(full[1].heads[len(group):], full[1].kv_heads[1:], full[1].channels),
    }
    expected = {"channel": costs.channel, "group": len(group) * costs.query_head + costs.kv_head}
    dense = sum(p.numel() for p in model.parameters())
    for kind, plan in fewer.items():
        shrunk = shrink(adapter, [full[0], plan, full[2]])
        assert dense - sum(p.numel() for p in shrunk.parameters()) == expected[kind], kind


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "gpt2"])
def test_bias_compensation_fits_every_family(family, tokens):
    """FLAP's bias on the output projections: numprune's config carries it where the stock one cannot."""
    model = tiny(family)
    masked, shrunk, _ = stages(model, tokens, method="flap", allocation="uniform")
    assert adapter_for(shrunk).mlp_output(adapter_for(shrunk).layers()[0]).bias is not None
    with torch.no_grad():
        torch.testing.assert_close(shrunk(PROBE).logits, masked(PROBE).logits, rtol=1e-4, atol=1e-4)


def test_saved_folders_reload_in_a_fresh_process(tmp_path, tokens):
    """Uniform results load in plain transformers where the stock config can say them, the rest after
    ``import numprune``; each reloads into the same logits. One fresh process for all of them."""
    stock, numprune_side = {}, {}
    for family in FAMILIES:
        model = tiny(family)
        for allocation in ("uniform", "global"):
            _, shrunk, _ = stages(model, tokens, ratio=0.35, allocation=allocation)
            side = stock if shrunk.config.model_type == family else numprune_side
            side[f"{family}-{allocation}"] = shrunk
        if family in DERIVED_HEAD_DIM:  # all heads kept, narrower MLP: the stock config can say it
            adapter = adapter_for(model)
            plans = [LayerPlan(*map(tuple, map(range, (l.num_heads, l.num_kv_heads, 30))))
                     for l in map(adapter.attention_layout, range(adapter.num_layers()))]
            stock[f"{family}-mlp-only"] = shrink(adapter, plans)
    assert {name.split("-")[0] for name in stock} == set(FAMILIES)
    assert {name.split("-")[0] for name in numprune_side} == set(FAMILIES)
    folders = {name: save_pruned(m, None, {}, tmp_path / name) for name, m in {**stock, **numprune_side}.items()}
    reloaded = reload_all([folders[n] for n in stock], [folders[n] for n in numprune_side], PROBE, tmp_path)
    for (name, model), (logits, (cls, had_numprune)) in zip({**stock, **numprune_side}.items(), reloaded):
        plain = name in stock
        with torch.no_grad():
            torch.testing.assert_close(logits, model(PROBE).logits, rtol=1e-5, atol=1e-5, msg=name)
        assert cls == type(model).__name__ and had_numprune == str(not plain)
        assert cls.startswith("Numprune") != plain


def test_unsupported_model_type_is_a_one_line_error():
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(NumpruneError) as error:
        adapter_for(model)
    message = str(error.value)
    assert "\n" not in message and message.startswith("model type 'bloom' is not supported; supported: ")
    assert all(t in message for t in supported_model_types())
    assert {*FAMILIES, *(f"numprune_{f}" for f in FAMILIES), "llama", "numprune_llama"} <= set(supported_model_types())
