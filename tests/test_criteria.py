"""Baseline criteria against hand computations, method defaults, and FLAP's bias round trip."""

import pytest
import torch
from conftest import tiny_llama, tiny_tokens

from numprune.adapters import AttentionLayout
from numprune.api import prune
from numprune.calibrate import InputStats, LayerStats
from numprune.criteria import CriterionInputs, flap, get_method, magnitude, methods, random, wanda_sp


def inputs_from(x_attn, w_attn, x_mlp, w_mlp, heads=2):
    stats = []
    for x in (x_attn, x_mlp):
        s = InputStats.empty(x.shape[1])
        s.add(x)
        stats.append(s)
    layout = AttentionLayout(heads, heads, x_attn.shape[1] // heads)
    return CriterionInputs(0, LayerStats(*stats), w_attn, w_mlp, layout, 0.5)


def four_channel_layer():
    x = torch.tensor([[1.0, 0.0, 2.0, -1.0], [3.0, 0.0, 2.0, 1.0], [2.0, 1.0, 2.0, 0.0]])
    w = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -2.0, 0.5, 1.0]])  # [out=2, D=4]
    return x, w


def test_flap_wifv_by_hand():
    x, w = four_channel_layer()
    # Per-channel population variance over the 3 tokens, times the squared column norm.
    variance = torch.tensor([2 / 3, 2 / 9, 0.0, 2 / 3], dtype=torch.float64)
    column_sq = torch.tensor([1.0, 8.0, 0.5, 2.0], dtype=torch.float64)
    expected = variance * column_sq
    s = InputStats.empty(4)
    s.add(x)
    torch.testing.assert_close(flap.wifv(s.variance, w), expected)
    scores = flap.score(inputs_from(x, w, x, w))
    mlp = (expected - expected.mean()) / expected.std()
    torch.testing.assert_close(scores.channels, mlp)
    attn = expected**2
    attn = (attn - attn.mean()) / attn.std()
    torch.testing.assert_close(scores.heads, attn.reshape(2, 2).mean(1))


def test_wanda_sp_by_hand():
    x, w = four_channel_layer()
    norms = torch.tensor([14 / 3, 1 / 3, 4.0, 2 / 3], dtype=torch.float64).sqrt()  # sqrt(mean x_j^2)
    expected = (w.double().abs() * norms).mean(0)
    scores = wanda_sp.score(inputs_from(x, w, x, w))
    torch.testing.assert_close(scores.channels, expected)
    torch.testing.assert_close(scores.heads, expected.reshape(2, 2).sum(1))


def test_magnitude_by_hand():
    x, w = four_channel_layer()
    expected = torch.tensor([1.0, 8.0, 0.5, 2.0], dtype=torch.float64).sqrt()
    scores = magnitude.score(inputs_from(x, w, x, w))
    torch.testing.assert_close(scores.channels, expected)
    torch.testing.assert_close(scores.heads, torch.stack([expected[:2].sum(), expected[2:].sum()]))


def test_random_is_seeded():
    x, w = four_channel_layer()
    a, b, c = (random.score(inputs_from(x, w, x, w), seed=s) for s in (1, 1, 2))
    assert torch.equal(a.channels, b.channels) and not torch.equal(a.channels, c.channels)


@pytest.mark.parametrize("name", list(methods()))
def test_every_method_prunes_with_its_defaults(name):
    model = tiny_llama("gqa")
    pruned, report = prune(model, tiny_tokens(), ratio=0.3, method=name, progress=False)
    method = get_method(name)
    assert report["options"]["allocation"] == method.allocation
    assert report["options"]["compensation"] == method.compensation
    assert report["parameters"]["total_after"] < report["parameters"]["total_before"]


def test_flap_bias_compensation_matches_the_mean_shift_and_survives_saving(tmp_path):
    from transformers import AutoModelForCausalLM

    from numprune.save import save_pruned

    model = tiny_llama("gqa")
    tokens = tiny_tokens()
    pruned, report = prune(model, tokens, ratio=0.3, method="flap", allocation="uniform", progress=False)
    assert report["loads_without_numprune"]
    layer = pruned.model.layers[0]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
    assert torch.count_nonzero(layer.self_attn.o_proj.bias) > 0
    assert torch.count_nonzero(layer.self_attn.q_proj.bias) == 0

    # The bias equals the removed MLP channels' mean contribution, computed here from a dense pass.
    captured = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    with torch.no_grad():
        model(tokens)
    hook.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    channels = report["layers"][0]["channels"]
    dense_w = model.model.layers[0].mlp.down_proj.weight.double()
    kept_w = layer.mlp.down_proj.weight.double()
    removed = [j for j in range(dense_w.shape[1]) if not any(torch.equal(dense_w[:, j], kept_w[:, k])
                                                                for k in range(channels))]
    assert len(removed) == dense_w.shape[1] - channels
    expected = dense_w[:, removed] @ x[:, removed].mean(0)
    torch.testing.assert_close(layer.mlp.down_proj.bias.double(), expected, rtol=1e-4, atol=1e-5)

    out = save_pruned(pruned, None, report, tmp_path / "flap")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    probe = tiny_tokens(2, 8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, pruned(probe).logits)
