"""LlamaGen-layout image generators: layout and checkpoints, pruning with the fused wqkv, sampling, the digits model."""

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import stages
from safetensors.torch import load_file, save_file

from numprune.errors import NumpruneError
from numprune.evaluate.image import heldout_nll
from numprune.image.calibration import self_generated_tokens
from numprune.image.digits import digits_split, tokens_to_images, unigram_nll
from numprune.image.sampling import generate, pick_tokens
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM, llamagen_config, load_llamagen_checkpoint

TINY = {"mha": dict(num_attention_heads=4, num_key_value_heads=4),
        "gqa": dict(num_attention_heads=6, num_key_value_heads=2)}


def tiny_llamagen(shape: str = "gqa", seed: int = 0, **overrides) -> LlamaGenForCausalLM:
    """A random 3-layer LlamaGen on a 4x4 grid, weights large enough that heads and classes differ."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=48, num_hidden_layers=3, head_dim=8, intermediate_size=40, vocab_size=23,
                  num_classes=5, image_tokens=16)
    model = LlamaGenForCausalLM(LlamaGenConfig(**{**fields, **TINY[shape], **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def random_sequences(model, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    labels = torch.randint(0, c.num_classes + 1, (n, 1), generator=g)
    return torch.cat([labels, torch.randint(0, c.vocab_size, (n, c.image_tokens), generator=g)], dim=1)


# An independent forward pass written from LlamaGen's description, reading the raw state dict.

def reference_logits(state: dict, config: LlamaGenConfig, ids: torch.Tensor) -> torch.Tensor:
    hd = config.head_dim
    grid = int(config.image_tokens ** 0.5)
    quarter = hd // 4
    inv = 1.0 / config.rope_base ** (torch.arange(quarter, dtype=torch.float32) * 2 / (hd // 2))
    angle = torch.zeros(1 + config.image_tokens, hd // 2)  # class position: cos = sin = 0
    for pos in range(config.image_tokens):
        row, col = divmod(pos, grid)
        angle[1 + pos] = torch.cat([row * inv, col * inv])
    cos, sin = angle.cos(), angle.sin()
    cos[0], sin[0] = 0.0, 0.0

    def rope(x):  # x [B, S, H, hd]; pairs (2i, 2i+1)
        s = x.shape[1]
        a, b = x[..., 0::2], x[..., 1::2]
        c, n = cos[:s, None, :], sin[:s, None, :]
        return torch.stack([a * c - b * n, b * c + a * n], dim=-1).flatten(-2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    bsz, seq = ids.shape
    h = torch.cat([state["cls_embedding.embedding_table.weight"][ids[:, :1]], state["tok_embeddings.weight"][ids[:, 1:]]], 1)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        nh, nkv = config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i]
        x = rms(h, state[p + "attention_norm.weight"])
        qkv = x @ state[p + "attention.wqkv.weight"].T
        q, k, v = qkv[..., :nh * hd], qkv[..., nh * hd:(nh + nkv) * hd], qkv[..., (nh + nkv) * hd:]
        q, k = rope(q.view(bsz, seq, nh, hd)), rope(k.view(bsz, seq, nkv, hd))
        v = v.view(bsz, seq, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, seq, nh * hd)
        h = h + out @ state[p + "attention.wo.weight"].T
        x = rms(h, state[p + "ffn_norm.weight"])
        f = F.silu(x @ state[p + "feed_forward.w1.weight"].T) * (x @ state[p + "feed_forward.w3.weight"].T)
        h = h + f @ state[p + "feed_forward.w2.weight"].T
    return rms(h, state["norm.weight"]) @ state["output.weight"].T


def llamagen_keys(n_layer: int) -> set[str]:
    per_layer = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                 "attention_norm", "ffn_norm"]
    return ({"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight"}
            | {f"layers.{i}.{m}.weight" for i in range(n_layer) for m in per_layer})


@pytest.mark.parametrize("size,published", [("B", 111e6), ("L", 343e6), ("XL", 775e6), ("XXL", 1.4e9), ("3B", 3.1e9)])
def test_named_sizes_have_the_published_parameter_counts(size, published):
    with torch.device("meta"):
        model = LlamaGenForCausalLM(llamagen_config(size))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - published) / published < 0.01  # the published figures are rounded
    if size == "B":
        state = model.state_dict()
        assert set(state) == llamagen_keys(12)
        assert state["layers.0.attention.wqkv.weight"].shape == (3 * 768, 768)
        assert state["layers.0.feed_forward.w1.weight"].shape == (2048, 768)
        assert state["cls_embedding.embedding_table.weight"].shape == (1001, 768)
        assert state["output.weight"].shape == (16384, 768)


@pytest.mark.parametrize("shape", sorted(TINY))
def test_forward_equals_an_independent_llamagen_computation(shape):
    model = tiny_llamagen(shape)
    ids = random_sequences(model, 3)
    with torch.no_grad():
        expected = reference_logits(model.state_dict(), model.config, ids)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        # a prefix gives the same logits as the full sequence's first positions (causal), with and without cache
        torch.testing.assert_close(model(ids[:, :7]).logits, expected[:, :7], rtol=1e-4, atol=1e-4)
        step = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], cache=step.cache, use_cache=True)
        torch.testing.assert_close(rest.logits, expected[:, 5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(NumpruneError, match="longer than"):
        model(torch.cat([ids, ids[:, :1]], dim=1))


def test_released_checkpoint_layout_loads_by_key_name(tmp_path):
    overrides = dict(num_hidden_layers=1, vocab_size=64, num_classes=10)
    config = llamagen_config("B", **overrides)
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_embedding.embedding_table.weight": (11, 768), "tok_embeddings.weight": (64, 768),
              "norm.weight": (768,), "output.weight": (64, 768), "layers.0.attention.wqkv.weight": (3 * 768, 768),
              "layers.0.attention.wo.weight": (768, 768), "layers.0.feed_forward.w1.weight": (2048, 768),
              "layers.0.feed_forward.w3.weight": (2048, 768), "layers.0.feed_forward.w2.weight": (768, 2048),
              "layers.0.attention_norm.weight": (768,), "layers.0.ffn_norm.weight": (768,)}
    assert set(shapes) == llamagen_keys(1)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    path = tmp_path / "c2i_B_256.safetensors"
    save_file({f"model.{k}": v for k, v in state.items()}, path)  # a wrapper's prefix is taken off
    model = load_llamagen_checkpoint(path, "GPT-B", **overrides)
    assert model.config.hidden_size == 768 and model.config.num_attention_heads == 12
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = torch.tensor([[3, 1, 2, 3, 4], [10, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(state, config, ids), rtol=1e-4, atol=1e-4)

    renamed = dict(state)
    renamed["layers.0.attention.qkv.weight"] = renamed.pop("layers.0.attention.wqkv.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    message = r"missing layers\.0\.attention\.wqkv\.weight, unexpected layers\.0\.attention\.qkv"
    with pytest.raises(NumpruneError, match=message):
        load_llamagen_checkpoint(tmp_path / "renamed.safetensors", "B", **overrides)
    with pytest.raises(NumpruneError, match="wrong shapes"):
        load_llamagen_checkpoint(path, "B", num_hidden_layers=1, vocab_size=64, num_classes=20)
    with pytest.raises(NumpruneError, match="missing"):
        load_llamagen_checkpoint(path, "B", num_hidden_layers=2, vocab_size=64, num_classes=10)
    with pytest.raises(NumpruneError, match="unknown LlamaGen size"):
        load_llamagen_checkpoint(path, "XXXXL")
    torch.save({"model": state}, tmp_path / "c2i_B_256.pt")
    with pytest.raises(NumpruneError, match="opens no pickles"):
        load_llamagen_checkpoint(tmp_path / "c2i_B_256.pt", "B", **overrides)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(NumpruneError, match="not a readable safetensors file"):
        load_llamagen_checkpoint(tmp_path / "junk.safetensors", "B")


@pytest.mark.parametrize("shape", sorted(TINY))
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_shrunk_model_equals_masked_model_with_the_fused_wqkv(shape, allocation):
    model = tiny_llamagen(shape)
    tokens = self_generated_tokens(model, 3, cfg_scale=2.0, seed=0, progress=False)
    masked, shrunk, plans = stages(model, tokens, ratio=0.35, allocation=allocation)
    assert type(shrunk) is LlamaGenForCausalLM
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    assert any(len(p.heads) < model.config.num_attention_heads for p in plans)
    if allocation == "uniform":
        assert len({(len(p.heads), len(p.channels)) for p in plans}) == 1
    probe = random_sequences(model, 4, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(probe).logits, masked(probe).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(shrunk(probe).logits, model(probe).logits, atol=1e-3)
        # the shrunk model's KV-cached path agrees with its full pass, per-layer widths and all
        step = shrunk(probe[:, :6], use_cache=True)
        torch.testing.assert_close(shrunk(probe[:, 6:], cache=step.cache).logits, shrunk(probe).logits[:, 6:],
                                   rtol=1e-4, atol=1e-4)


def test_flap_bias_compensation_shrinks_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llamagen("gqa")
    tokens = self_generated_tokens(model, 3, cfg_scale=2.0, seed=0, progress=False)
    masked, shrunk, _ = stages(model, tokens, ratio=0.3, method="flap")
    assert shrunk.config.attention_output_bias and shrunk.layers[0].feed_forward.w2.bias is not None
    shrunk.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    probe = random_sequences(model, 3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(probe).logits, masked(probe).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(reloaded(probe).logits, shrunk(probe).logits)


def reference_generate(model, labels, cfg_scale, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    """Sampling without a cache: the whole sequence recomputed at every step, guidance formed here."""
    null = torch.full_like(labels, model.config.num_classes)
    seqs = torch.stack([labels, null], 0)[:, :, None]  # [2, N, 1]
    with torch.no_grad():
        for t in range(model.config.image_tokens):
            cond = model(seqs[0]).logits[:, -1]
            uncond = model(seqs[1]).logits[:, -1]
            logits = uncond + cfg_scale * (cond - uncond)
            token = pick_tokens(logits, uniforms[:, t], temperature, top_k, top_p)
            seqs = torch.cat([seqs, token.expand(2, -1)[:, :, None]], dim=2)
    return seqs[0, :, 1:]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_guided_sampling_equals_recomputation(cfg_scale):
    model = tiny_llamagen("gqa")
    labels = torch.tensor([0, 3, 4, 1])
    greedy = generate(model, labels, cfg_scale=cfg_scale, temperature=0.0, progress=False)
    torch.testing.assert_close(greedy, reference_generate(model, labels, cfg_scale, torch.zeros(4, 16), temperature=0))
    assert torch.equal(generate(model, labels, cfg_scale=cfg_scale, top_k=1, seed=5, progress=False), greedy)
    # sampled: the same uniforms as generate's (one per sample and position, from the seed)
    uniforms = torch.rand(4, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sampled = generate(model, labels, cfg_scale=cfg_scale, seed=7, top_k=10, top_p=0.9, progress=False)
    assert torch.equal(sampled, reference_generate(model, labels, cfg_scale, uniforms, top_k=10, top_p=0.9))


def test_guidance_changes_samples_and_scale_one_is_unguided():
    model = tiny_llamagen("mha")
    labels = torch.arange(5).repeat(4)
    plain = generate(model, labels, cfg_scale=1.0, seed=3, progress=False)
    guided = generate(model, labels, cfg_scale=4.0, seed=3, progress=False)
    assert not torch.equal(plain, guided)
    # scale 1 never runs the null class: a model whose null embedding is garbage samples the same
    with torch.no_grad():
        model.cls_embedding.embedding_table.weight[-1].fill_(1e3)
    assert torch.equal(generate(model, labels, cfg_scale=1.0, seed=3, progress=False), plain)


def test_sampling_is_seeded_and_independent_of_the_batch_size():
    model = tiny_llamagen("gqa")
    labels = torch.arange(5).repeat_interleave(3)
    a = generate(model, labels, seed=11, batch_size=4, progress=False)
    assert a.shape == (15, 16) and a.dtype == torch.long and 0 <= a.min() and a.max() < 23
    assert torch.equal(a, generate(model, labels, seed=11, batch_size=15, progress=False))
    assert not torch.equal(a, generate(model, labels, seed=12, batch_size=4, progress=False))
    tokens = self_generated_tokens(model, 2, cfg_scale=4.0, seed=11, classes=[4, 1], progress=False)
    assert tokens[:, 0].tolist() == [4, 4, 1, 1] and tokens.shape == (4, 17)
    with pytest.raises(NumpruneError, match="class labels"):
        generate(model, torch.tensor([5]), progress=False)
    with pytest.raises(NumpruneError, match="top-p"):
        generate(model, labels, top_p=0.0, progress=False)


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]]).log_softmax(-1)
    probs = logits.exp()[0]
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # evenly spread uniforms
    picks = torch.cat([pick_tokens(logits.expand(2000, -1), chunk, 1.0, 0, 1.0) for chunk in u.split(2000)])
    torch.testing.assert_close(torch.bincount(picks, minlength=5) / 20000, probs, atol=1e-3, rtol=0)
    top2 = torch.cat([pick_tokens(logits.expand(2000, -1), chunk, 1.0, 2, 1.0) for chunk in u.split(2000)])
    assert set(top2.tolist()) == {0, 2}
    assert abs((top2 == 0).double().mean() - probs[0] / (probs[0] + probs[2])) < 1e-3
    nucleus = pick_tokens(logits.expand(2000, -1), u[::10], 1.0, 0, 0.5)
    assert set(nucleus.tolist()) == {0}  # the likeliest token alone holds more than half the mass


def test_digits_split_is_fixed_stratified_and_decodes_to_images():
    split = digits_split()
    assert split["train_tokens"].shape == (1437, 64) and split["heldout_tokens"].shape == (360, 64)
    assert torch.equal(split["heldout_labels"], digits_split()["heldout_labels"])
    counts = torch.bincount(split["heldout_labels"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert split["train_tokens"].min() == 0 and split["train_tokens"].max() == 16
    images = tokens_to_images(split["heldout_tokens"][:3])
    assert images.shape == (3, 8, 8) and images.min() >= 0 and images.max() == 1
    # the baseline: held-out tokens under the training grey-level frequencies with add-one smoothing, counted here
    train = Counter(split["train_tokens"].flatten().tolist())
    heldout = split["heldout_tokens"].flatten().tolist()
    total = sum(train.values()) + 17
    assert unigram_nll() == pytest.approx(-math.fsum(math.log((train[v] + 1) / total) for v in heldout) / len(heldout),
                                          rel=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny-budget training runs of the train-digits command with the same seed."""
    from numprune.cli import main

    root = tmp_path_factory.mktemp("digits")
    for name in ("a", "b"):
        assert main(["train-digits", "--steps", "3", "--batch-size", "8", "--seed", "1", "--out",
                     str(root / name), "--quiet"]) == 0
    return root


def test_train_digits_is_deterministic_and_reloads_in_a_fresh_process(trained):
    a, b = load_file(trained / "a" / "model.safetensors"), load_file(trained / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((trained / "a" / "training_report.json").read_text())
    assert report["recipe"]["steps"] == 3 and report["unigram_nll"] == unigram_nll()
    code = ("import sys, torch, numprune; from safetensors.torch import save_file; "
            "from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
            "ids = torch.tensor([[3] + list(range(17)) * 3 + [5] * 13]); "
            "save_file({'logits': m(ids).logits.detach().contiguous()}, sys.argv[2])")
    logits_path = trained / "logits.safetensors"
    done = subprocess.run([sys.executable, "-c", code, str(trained / "a"), str(logits_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained / "a").eval()
    ids = torch.tensor([[3] + list(range(17)) * 3 + [5] * 13])
    with torch.no_grad():
        assert torch.equal(load_file(logits_path)["logits"], model(ids).logits)
    split = digits_split()  # the reported held-out NLL is the saved model's, teacher-forced on the held-out digits
    assert report["heldout_nll"] == pytest.approx(heldout_nll(model, split["heldout_tokens"],
                                                              split["heldout_labels"])["nll"], rel=1e-9)


def test_prune_an_image_generator_on_self_generated_calibration(trained, tmp_path, capsys):
    from numprune.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(trained / "a"), "--ratio", "0.2", "--calib-per-class", "2",
                 "--calib-cfg-scale", "3", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["source"] == "self-generated" and calibration["samples"] == 20
    assert calibration["cfg_scale"] == 3.0 and calibration["tokens"] == 20 * 65
    assert abs(report["parameters"]["achieved_ratio"] - 0.2) < 0.05
    assert main(["prune", "--model", str(trained / "a"), "--ratio", "0.2", "--calib-per-class", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--calib-per-class: must be a positive integer" in capsys.readouterr().err
