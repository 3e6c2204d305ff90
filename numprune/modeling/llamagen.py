"""LlamaGen's class-conditional image generator (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``).

A LLaMA-style decoder over VQ image tokens in raster order, conditioned by one class-embedding
token in front. Module and parameter names are LlamaGen's own (``cls_embedding.embedding_table``,
``tok_embeddings``, ``layers.N.attention.wqkv`` / ``wo``, ``feed_forward.w1/w3/w2``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``), so a released ``c2i_*.pt``, converted to safetensors,
loads by key name.
Per-layer head counts and MLP widths live in the config, so a pruned model is the same class.

Sequence convention (what the rest of numprune relies on): ``input_ids[:, 0]`` is the class label
(``0..num_classes-1``, or ``num_classes`` for the null class of classifier-free guidance) and
``input_ids[:, 1:]`` are image tokens. ``logits`` has one position per input position and follows
the causal-LM shift: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, i.e. image token ``t``.
A full sequence is ``1 + image_tokens`` long; its last position predicts nothing.

Positions: 2D rotary embeddings over the image grid, half of each head's rotary pairs turning
with the row and half with the column. The class position gets LlamaGen's all-zero table, which
zeroes its query and key (LlamaGen's released models were trained that way).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from numprune.errors import NumpruneError
from numprune.io.inputs import check_safetensors
from numprune.modeling.per_layer import PER_LAYER_FIELDS

# LlamaGen's class-conditional sizes (n_layer, n_head, dim) and their published parameter counts.
LLAMAGEN_SIZES = {
    "B": dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768),  # 111M
    "L": dict(num_hidden_layers=24, num_attention_heads=16, hidden_size=1024),  # 343M
    "XL": dict(num_hidden_layers=36, num_attention_heads=20, hidden_size=1280),  # 775M
    "XXL": dict(num_hidden_layers=48, num_attention_heads=24, hidden_size=1536),  # 1.4B
    "3B": dict(num_hidden_layers=24, num_attention_heads=32, hidden_size=3200),  # 3.1B
}


def llamagen_ffn_width(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of ``multiple_of``."""
    width = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        width = int(ffn_dim_multiplier * width)
    return math.ceil(width / multiple_of) * multiple_of


class LlamaGenConfig(PretrainedConfig):
    """LlamaGen's ``ModelArgs`` for class-conditional models, in transformers' names, plus per-layer widths.

    ``image_tokens`` is LlamaGen's ``block_size`` (a square grid: 256 for 256px, 576 for 384px
    images with a 16x downsampling tokenizer). ``intermediate_size`` None means LlamaGen's rule
    (``llamagen_ffn_width``). ``attention_output_bias`` / ``mlp_output_bias`` give ``wo`` / ``w2`` a bias
    (FLAP's bias compensation adds one). The per-layer lists default to the uniform values.
    """

    model_type = "numprune_llamagen"

    vocab_size: int = 16384
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    num_classes: int = 1000
    cls_token_num: int = 1
    class_dropout_prob: float = 0.1
    image_tokens: int = 256
    attention_output_bias: bool = False
    mlp_output_bias: bool = False
    tie_word_embeddings: bool = False
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = llamagen_ffn_width(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)
        n = self.num_hidden_layers
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.cls_token_num != 1:
            raise ValueError("LlamaGen's class-conditional models use exactly one class token (cls_token_num=1)")
        grid = math.isqrt(self.image_tokens)
        if grid * grid != self.image_tokens:
            raise ValueError(f"image_tokens must be a square grid, got {self.image_tokens}")
        if self.head_dim % 4:
            raise ValueError(f"2D rotary embeddings need head_dim divisible by 4, got {self.head_dim}")
        lists = [getattr(self, name) for name in PER_LAYER_FIELDS]
        if any(len(x) != self.num_hidden_layers for x in lists):
            raise ValueError("per-layer counts must have one entry per decoder layer")
        for i, (heads, kv, width) in enumerate(zip(*lists)):
            if heads < 1 or kv < 1 or width < 1 or heads % kv:
                raise ValueError(f"layer {i}: {heads} heads over {kv} KV heads, {width} MLP channels is not a valid layer")

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.image_tokens)


def llamagen_config(size: str, **overrides) -> LlamaGenConfig:
    """The config of a published class-conditional size: B, L, XL, XXL or 3B (``GPT-`` prefix optional)."""
    key = size.upper().removeprefix("GPT-")
    if key not in LLAMAGEN_SIZES:
        raise NumpruneError(f"unknown LlamaGen size {size!r}; choose from {', '.join(LLAMAGEN_SIZES)}")
    return LlamaGenConfig(**{**LLAMAGEN_SIZES[key], **overrides})


def rotary_table_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int = 1) -> torch.Tensor:
    """LlamaGen's 2D rotary table ``[cls_token_num + grid_size**2, head_dim // 2, 2]`` of (cos, sin).

    The first ``head_dim // 4`` rotary pairs turn with the row index, the rest with the column
    index; the class positions are all zero.
    """
    quarter = head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (2 * quarter)))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # [grid, quarter]
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),
                      angles[None, :, :].expand(grid_size, -1, -1)], dim=-1).flatten(0, 1)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, 2 * quarter, 2), table])


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` [batch, seq, heads, head_dim] by complex ``freqs_cis`` [seq, head_dim//2]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(-2).type_as(x)


class KVCacheLayer:
    """One layer's keys and values, ``[batch, kv_heads, max_length, head_dim]`` each, filled up to ``length``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.length = keys, values, 0


class KVCache:
    """Keys and values preallocated for a whole image: each decoding step writes in place.

    (transformers' DynamicCache concatenates at every step, copying the whole cache; over the
    hundreds of steps of an image that is quadratic.) Layers are allocated at their first update,
    so per-layer head counts of a pruned model need nothing special.
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.layers: list[KVCacheLayer] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's ``[batch, kv_heads, new, head_dim]`` keys and values; return all so far."""
        if layer_idx == len(self.layers):
            shape = (*keys.shape[:2], self.max_length, keys.shape[3])
            self.layers.append(KVCacheLayer(keys.new_empty(shape), values.new_empty(shape)))
        layer = self.layers[layer_idx]
        end = layer.length + keys.shape[2]
        layer.keys[:, :, layer.length:end] = keys
        layer.values[:, :, layer.length:end] = values
        layer.length = end
        return layer.keys[:, :, :end], layer.values[:, :, :end]


class Attention(nn.Module):
    """Fused ``wqkv`` (rows: queries, then keys, then values) and ``wo``; query head h uses KV head h // group."""

    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_head = config.layer_num_attention_heads[layer_idx]
        self.n_kv_head = config.layer_num_key_value_heads[layer_idx]
        self.wqkv = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.attention_output_bias)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis).transpose(1, 2)
        k = apply_rotary(k.view(bsz, seqlen, self.n_kv_head, self.head_dim), freqs_cis).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_head, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        mask = None
        if past and seqlen > 1:  # new positions see the whole cache and each other causally
            mask = torch.ones(seqlen, past + seqlen, dtype=torch.bool, device=x.device).tril(past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past and seqlen > 1,
                                             enable_gqa=self.n_head != self.n_kv_head)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        width = config.layer_intermediate_sizes[layer_idx]
        self.w1 = nn.Linear(config.hidden_size, width, bias=False)
        self.w3 = nn.Linear(config.hidden_size, width, bias=False)
        self.w2 = nn.Linear(width, config.hidden_size, bias=config.mlp_output_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer. Called as ``layer(hidden, freqs_cis=..., cache=...)``: everything it needs
    beyond the hidden states travels as keyword arguments, so calibration can replay it alone."""

    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.feed_forward = FeedForward(config, layer_idx)
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """One embedding per class plus the null class (index ``num_classes``) for classifier-free guidance."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(config.num_classes + 1, config.hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class LlamaGenForCausalLM(PreTrainedModel):
    """LlamaGen's c2i ``Transformer`` as a transformers model (see the module docstring for the convention)."""

    config_class = LlamaGenConfig
    config: LlamaGenConfig
    base_model_prefix = "llamagen"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.cls_embedding = LabelEmbedder(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rotary: dict = {}  # device -> table; computed, never saved (not in LlamaGen's checkpoints)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """LlamaGen's initialisation: normal(0, initializer_range) everywhere, the output head zero."""
        super()._init_weights(module)
        if module is getattr(self, "output", None):
            init.zeros_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def rotary_table(self, device: torch.device) -> torch.Tensor:
        """The 2D rotary table as complex numbers ``cos + i sin`` [1 + image_tokens, head_dim // 2]."""
        key = str(device)
        if key not in self._rotary:
            c = self.config
            table = rotary_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num)
            self._rotary[key] = torch.view_as_complex(table.contiguous()).to(device)
        return self._rotary[key]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int = 0, labels: torch.Tensor | None = None, **_) -> CausalLMOutputWithPast:
        """Logits for ``input_ids`` (label first, then image tokens; see the module docstring).

        With a ``cache`` that already holds ``P`` positions, ``input_ids`` are the image tokens that
        follow (no label). ``use_cache`` starts a cache when none is given and returns it.
        ``labels`` (the same layout as ``input_ids``) give the mean next-token cross-entropy over
        the image tokens.
        """
        if use_cache and cache is None:
            cache = KVCache(1 + self.config.image_tokens)
        past = cache.get_seq_length() if cache is not None else 0
        seqlen = input_ids.shape[1]
        if past + seqlen > 1 + self.config.image_tokens:
            raise NumpruneError(f"sequence of {past + seqlen} positions is longer than 1 label + "
                                f"{self.config.image_tokens} image tokens")
        if past == 0:
            h = torch.cat([self.cls_embedding(input_ids[:, :1]), self.tok_embeddings(input_ids[:, 1:])], dim=1)
        else:
            h = self.tok_embeddings(input_ids)
        freqs_cis = self.rotary_table(h.device)[past:past + seqlen]
        for layer in self.layers:
            h = layer(h, freqs_cis=freqs_cis, cache=cache)
        h = self.norm(h[:, -logits_to_keep:] if logits_to_keep else h)
        logits = self.output(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache or cache is not None else None)


def checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a LlamaGen checkpoint converted to safetensors (numprune opens no pickle).

    A released ``c2i_*.pt`` is a pickle; convert it once yourself, e.g.
    ``save_file(torch.load(pt, weights_only=True)["model"], "c2i.safetensors")``. Keys under one
    ``model.`` or ``module.`` prefix (a wrapper's) are accepted too.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise NumpruneError(f"{path} is not a .safetensors file; numprune opens no pickles. Convert it: "
                            "safetensors.torch.save_file(torch.load(path, weights_only=True)['model'], 'c2i.safetensors')")
    check_safetensors(path)
    state = load_file(path)
    for prefix in ("model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_llamagen_checkpoint(path: str | os.PathLike, size: str, dtype: torch.dtype = torch.float32,
                             **config_overrides) -> LlamaGenForCausalLM:
    """A released LlamaGen c2i checkpoint (``c2i_XXL_384.pt`` converted to safetensors) as a LlamaGenForCausalLM,
    by key name.

    ``size`` is B, L, XL, XXL or 3B; ``config_overrides`` set what the checkpoint cannot tell, above
    all ``image_tokens`` (256 for the 256px models, 576 for 384px). Missing, unexpected or
    wrongly shaped tensors are a NumpruneError naming them.
    """
    config = llamagen_config(size, **config_overrides)
    state = checkpoint_state_dict(path)
    with torch.device("meta"):
        model = LlamaGenForCausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise NumpruneError(f"{path} does not match LlamaGen-{size}: missing {_first(missing)}, "
                            f"unexpected {_first(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise NumpruneError(f"{path} does not match LlamaGen-{size}: wrong shapes {_first(wrong)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def _first(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")

