"""Each decoder layer is calibrated on exactly what the full model's forward gives it (its own attention mask and
rotary table): every family, sliding and full layers side by side, windows longer than the sliding window."""

import copy
from types import SimpleNamespace

import psutil
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from conftest import COMMON, FAMILIES, GEMMA, GQA, break_symmetry, tiny, tiny_llama, tiny_tokens
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from numprune.adapters import adapter_for
from numprune.calibrate import LayerStream, collect_statistics
from numprune.errors import NumpruneError
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM
from numprune.pipeline import Compute, select
from numprune.recipe import PruneOptions
from numprune.report import Clock
from numprune.sources import InMemory
from numprune.stream import StreamedModel

WINDOW = 4  # the sliding window of the configs below; the calibration windows are longer
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# Configs whose layers differ by type beyond FAMILIES' Gemma 2/3 (sliding, full, sliding over a window of 8).
VARIANTS = {
    # max_window_layers=1: layer 0 full, layers 1 and 2 sliding
    "qwen2-sliding": (Qwen2ForCausalLM, Qwen2Config(**COMMON, **GQA, use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=1)),
    "qwen3-sliding": (Qwen3ForCausalLM, Qwen3Config(**COMMON, **{**GQA, "head_dim": 10}, use_sliding_window=True,
                                                    sliding_window=WINDOW, layer_types=SLIDING)),
    "mistral-sliding": (MistralForCausalLM, MistralConfig(**COMMON, **GQA, sliding_window=WINDOW)),  # one mask for all
    # full attention first; the local rotary base far from the global one
    "gemma3-full-first": (Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, **{
        **GEMMA, "sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention", "full_attention"]})),
    "llamagen": (LlamaGenForCausalLM, LlamaGenConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                                     num_key_value_heads=2, head_dim=8, intermediate_size=40,
                                                     vocab_size=23, num_classes=5, image_tokens=16)),
}
MODELS = ["llama", *FAMILIES, *VARIANTS]


def model_of(name: str, attention: str = "sdpa"):
    if name == "llama":
        model = tiny_llama("gqa")
    elif name in FAMILIES:
        model = tiny(name)
    else:
        torch.manual_seed(0)
        model_class, config = VARIANTS[name]
        model = break_symmetry(model_class(copy.deepcopy(config)).eval())  # attention set on a copy
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    return model


def tokens_for(model) -> torch.Tensor:
    """Windows of 24 tokens (17 for a LlamaGen: a label and 16 image tokens), 3 of them left for a last batch."""
    if isinstance(model, LlamaGenForCausalLM):
        return torch.cat([torch.arange(7)[:, None] % 6, tiny_tokens(7, 16) % 23], dim=1)
    return tiny_tokens(7, 24)


def full_model_inputs(model, tokens: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Per layer, the inputs of its attention and MLP output projections in the whole model's own forward,
    on the same batches as the calibration, as float64 rows."""
    adapter = adapter_for(model)
    seen = [{"attention": [], "mlp": []} for _ in adapter.layers()]
    hooks = [module.register_forward_pre_hook(lambda _m, args, rows=seen[i][part]: rows.append(args[0]))
             for i, layer in enumerate(adapter.layers())
             for part, module in (("attention", adapter.attention_output(layer)), ("mlp", adapter.mlp_output(layer)))]
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            model(batch)
    for hook in hooks:
        hook.remove()
    return [{part: torch.cat([x.reshape(-1, x.shape[-1]) for x in rows]).double() for part, rows in layer.items()}
            for layer in seen]


def assert_statistics_equal_inputs(stats, inputs, first: int = 0) -> None:
    """``stats`` of layers ``first``, ``first + 1``, ... are the Gram matrices, sums and counts of ``inputs``."""
    assert len(stats) == len(inputs)
    for i, layer in enumerate(inputs, first):
        for part, x in layer.items():
            got, gram = getattr(stats[i - first], part), x.T @ x
            assert got.count == x.shape[0]
            # float32 products summed in float64 against float64 products: rounding only
            torch.testing.assert_close(got.gram, gram, rtol=1e-5, atol=1e-6 * gram.abs().max().item(),
                                       msg=lambda m, i=i, part=part: f"layer {i} {part}: {m}")
            torch.testing.assert_close(got.total, x.sum(0), rtol=1e-5, atol=1e-6 * x.abs().sum(0).max().item(),
                                       msg=lambda m, i=i, part=part: f"layer {i} {part}: {m}")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: every mask is a tensor, never left to is_causal
@pytest.mark.parametrize("name", MODELS)
def test_every_layer_sees_what_the_full_model_gives_it(name, attention):
    model = model_of(name, attention)
    tokens = tokens_for(model)
    stats = collect_statistics(model, adapter_for(model), tokens, batch_size=4, progress=False)
    assert not any("forward" in vars(layer) for layer in adapter_for(model).layers())  # the recorders are gone
    assert_statistics_equal_inputs(stats, full_model_inputs(model, tokens, 4))


def test_layers_of_one_type_share_their_mask_and_rotary_table_once_moved():
    model = model_of("gemma3_text", "eager")  # sliding, full, sliding; masks as tensors
    stream = LayerStream(model, adapter_for(model), tiny_tokens(6, 24), batch_size=4, dtype=torch.float64)
    for batch in range(2):
        (_, sliding), (_, full), (_, again) = (stream.arguments[i][batch] for i in range(3))
        cos = [kwargs["position_embeddings"][0] for kwargs in (sliding, full, again)]
        assert cos[0].dtype == torch.float64 and cos[0] is cos[2] and cos[0] is not cos[1]
        assert not torch.equal(cos[0], cos[1])  # local and global rotary bases
        assert sliding["attention_mask"] is again["attention_mask"]
        assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
        assert sliding["position_ids"] is full["position_ids"]


def _distinct_bytes(value) -> int:
    """Bytes of the distinct storages under ``value`` (nested tuples, lists, dicts of tensors)."""
    storages = {}

    def walk(v):
        if torch.is_tensor(v):
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, (tuple, list)):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
    walk(value)
    return sum(storages.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_calibration_that_would_not_fit_in_memory_is_refused_masks_counted(attention, monkeypatch):
    """The memory check counts what a stream really keeps (eager masks outweigh these hidden states 3x): it refuses
    when free memory is below what a full stream holds, and lets a run through with a little more."""
    model = model_of("gemma3_text", attention)
    tokens = tiny_tokens(8, 96)
    stream = LayerStream(model, adapter_for(model), tokens, batch_size=4, dtype=torch.float64)
    kept = _distinct_bytes((stream.hidden, stream.arguments)) + _distinct_bytes(stream.hidden)  # and the outputs
    hidden_only = 2 * _distinct_bytes(stream.hidden)
    assert kept > 3 * hidden_only if attention == "eager" else kept < 1.5 * hidden_only
    for free, refused in ((kept - 1, True), (int(kept * 1.02), False)):
        monkeypatch.setattr(psutil, "virtual_memory", lambda free=free: SimpleNamespace(available=free))
        if refused:
            with pytest.raises(NumpruneError, match=r"keeps about .* GiB of activations, attention masks"):
                LayerStream(model, adapter_for(model), tokens, batch_size=4, dtype=torch.float64)
        else:
            LayerStream(model, adapter_for(model), tokens, batch_size=4, dtype=torch.float64)


def test_a_stream_stays_at_its_layer_until_it_advances():
    """Sequential compensation runs layer i twice (statistics, then onwards with the refit layer): the second
    run is still layer i's, and layer i + 1 then sees what the model with the refit layers before it gives it."""
    model = model_of("gemma3-full-first")
    refit = copy.deepcopy(model)  # stands in for the compensated layers
    with torch.no_grad():
        for layer in refit.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.5)
            layer.mlp.down_proj.weight.mul_(-1.5)
    tokens = tokens_for(model)
    hook = ModelHook()  # as a model dispatched by accelerate has: a forward set on the layer itself
    add_hook_to_module(model.model.layers[1], hook)
    stream = LayerStream(model, adapter_for(model), tokens, batch_size=4)
    dispatched = model.model.layers[1]  # its own forward is back
    assert dispatched._hf_hook is hook and vars(dispatched)["forward"].func.__name__ == "new_forward"
    for i in range(3):
        stats = stream.run(model.model.layers[i], collect=True, advance=False)
        hybrid = copy.deepcopy(model)
        for j in range(i):
            hybrid.model.layers[j] = refit.model.layers[j]
        assert_statistics_equal_inputs([stats], full_model_inputs(hybrid, tokens, 4)[i:i + 1], first=i)
        stream.run(refit.model.layers[i], collect=False, advance=True)


@pytest.mark.parametrize("name", ["gemma3_text", "qwen2-sliding"])
def test_streamed_statistics_are_the_full_models_and_the_in_memory_ones(name, tmp_path):
    """Streaming from disk: the first layer's inputs and every layer's arguments are captured with the layers
    still on the meta device, and each layer's statistics come out as in memory, bit for bit."""
    model = model_of(name)
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokens = tokens_for(model)
    opts, compute = PruneOptions.checked(0.3), Compute(batch_size=4, progress=False)
    _, streamed = select(StreamedModel(tmp_path / "dense", Clock()), tokens, None, opts, compute, Clock())
    _, in_memory = select(InMemory(model), tokens, None, opts, compute, Clock())
    assert_statistics_equal_inputs(streamed, full_model_inputs(model, tokens, 4))
    for a, b in zip(streamed, in_memory):
        for part in ("attention", "mlp"):
            x, y = getattr(a, part), getattr(b, part)
            assert torch.equal(x.gram, y.gram) and torch.equal(x.total, y.total) and x.count == y.count
