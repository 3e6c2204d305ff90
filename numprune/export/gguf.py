"""GGUF export: LLaMA-layout models, pruned or dense, as single files that llama.cpp runs.

Uniform widths are written as llama.cpp's ``llama`` architecture. Different widths per layer use
its ``deci`` architecture (written for NVIDIA's Nemotron-NAS models), which reads the head counts,
KV-head counts and MLP widths as per-layer arrays and sizes every layer's tensors from them. Both
read optional biases on every projection, so FLAP's bias compensation is kept. llama.cpp rotates
adjacent channel pairs of a head where transformers rotates its two halves against each other, so
the q and k rows of every head are reordered (the reordering llama.cpp's own converter applies).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

import numprune
from numprune.adapters import adapter_for
from numprune.data.assets import installed_sources, smollm2_gguf
from numprune.errors import NumpruneError
from numprune.io.output import check_target as check_output_target
from numprune.io.output import output_file
from numprune.models import load_model, source_folder
from numprune.recipe import FLAG
from numprune.report import check_report
from numprune.save import read_report

# Output types: GGUF tensor type of the matrices (norms, biases and rotary factors stay float32) and file type.
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
EXPORTABLE = ("llama", "mistral")  # and their per-layer forms, numprune_llama / numprune_mistral
# Families numprune prunes whose blocks llama.cpp's llama/deci graphs cannot compute, and why.
_NOT_EXPORTABLE = {
    "qwen2": "its q/k/v biases and tokenizer are not handled by numprune's exporter yet",
    "qwen3": "its per-head q/k RMSNorm is not in llama.cpp's llama and deci graphs",
    "gemma2": "its embedding scaling, extra norms, soft-capping and sliding-window layers are not in llama.cpp's "
              "llama and deci graphs",
    "gemma3_text": "its embedding scaling, q/k and extra norms and sliding-window layers are not in llama.cpp's "
                   "llama and deci graphs",
    "phi3": "its fused qkv_proj/gate_up_proj are not split by numprune's exporter yet",
    "opt": "LayerNorm, learned positions and a ReLU MLP are not the LLaMA layout of llama.cpp's llama and deci graphs",
    "gpt2": "LayerNorm, learned positions and a GELU MLP are not the LLaMA layout of llama.cpp's llama and deci graphs",
    "numprune_llamagen": "it is an image generator (class and image tokens, 2D rotary), not a language model",
}
# Rotary types whose frequencies transformers fixes at load time (llama.cpp takes them as per-pair factors).
_STATIC_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class GgufExport:
    """What ``export_gguf`` wrote."""

    path: Path
    architecture: str  # llama or deci
    outtype: str
    tokenizer: str  # where the tokenizer metadata came from
    bytes: int
    # Matrices kept at f16 because their rows do not divide the quantisation block (e.g. a pruned MLP width).
    f16_fallback: list[str] = field(default_factory=list)


def export_gguf(model_or_folder, out: str | os.PathLike, outtype: str = "f16", *, tokenizer=None,
                report: dict | None = None, overwrite: bool = False) -> GgufExport:
    """Write a LLaMA-layout model (a saved folder, or a model with its tokenizer and report) as one GGUF file.

    A folder brings its own tokenizer and ``pruning_report.json``. Written to a temporary file beside
    ``out`` and renamed when complete; an existing ``out`` is refused unless ``overwrite``, and the
    input is never written over.
    """
    if not isinstance(outtype, str) or outtype not in OUTTYPES:
        raise NumpruneError(f"unknown GGUF output type {outtype!r}; choose from {', '.join(OUTTYPES)}")
    FLAG.check("overwrite", overwrite)
    if not isinstance(model_or_folder, (str, os.PathLike, nn.Module)):
        raise NumpruneError(f"expected a model folder or a loaded transformers model, got "
                            f"{type(model_or_folder).__name__}")
    # "~/m.gguf" is the file written, and the one measured after; an empty path stays empty for the check
    out = os.path.expanduser(out) if isinstance(out, (str, os.PathLike)) else out
    folder = Path(model_or_folder).expanduser() if isinstance(model_or_folder, (str, os.PathLike)) else None
    # A model object protects the folder it was loaded from, as a folder does itself. Checked before Path(out),
    # which reads an empty path as the current folder.
    check_target(out, overwrite, [folder or source_folder(model_or_folder), source_folder(tokenizer)])
    out = Path(out)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise NumpruneError(f"no model folder at {folder} (config.json missing)")
        report = read_report(folder)
        model, tokenizer, _ = load_model(str(folder))
    else:
        model = model_or_folder
        report = check_report(report, "the report") if report is not None else None
    check_exportable(model.config)
    name = folder.resolve().name if folder is not None else str(getattr(model.config, "_name_or_path", "") or "model")

    qtype, file_type = OUTTYPES[outtype]
    layers = _layer_shapes(model)
    architecture = "llama" if len(set(layers)) == 1 else "deci"
    with output_file(out, overwrite=overwrite, inputs=[folder or source_folder(model)]) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        _add_hyperparameters(writer, model, layers, name, file_type)
        _add_pruning_metadata(writer, report)
        tokenizer_source = _add_tokenizer(writer, tokenizer, model.config.vocab_size)
        fallback = []
        for tensor_name, tensor in _tensors(model, layers):
            data, dtype = _encode(tensor, qtype)
            if dtype != qtype and tensor.dim() > 1:
                fallback.append(tensor_name)
            writer.add_tensor(tensor_name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufExport(out, architecture, outtype, tokenizer_source, out.stat().st_size, fallback)


def check_exportable(config) -> None:
    """Fail with one line naming the family and the reason when llama.cpp cannot run it as llama/deci."""
    model_type = config.model_type
    stock = model_type.removeprefix("numprune_")
    if stock not in EXPORTABLE:
        reason = _NOT_EXPORTABLE.get(model_type) or _NOT_EXPORTABLE.get(stock) or "it is not a LLaMA-layout model"
        raise NumpruneError(f"cannot export model type {model_type!r} to GGUF: {reason}; exportable: "
                            f"{', '.join(EXPORTABLE)} (uniform or per-layer widths)")
    if config.hidden_act != "silu":
        raise NumpruneError(f"cannot export to GGUF: activation {config.hidden_act!r}, llama.cpp's llama and deci "
                            "graphs use SiLU")


def check_target(out: str | os.PathLike, overwrite: bool, inputs=(), outputs=()) -> Path:
    """Fail early if ``out`` cannot take the GGUF: the output writer's rules, with the run's ``inputs`` (the model
    folder, ...) and the embedded model's source GGUF (its tokenizer's source) as inputs it may never replace,
    and the run's other ``outputs``."""
    return check_output_target(out, overwrite=overwrite, folder=False, inputs=[*installed_sources(), *inputs],
                               outputs=outputs)


def _layer_shapes(model) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) of every layer, from the tensors themselves."""
    adapter = adapter_for(model)
    return [(layout.num_heads, layout.num_kv_heads, adapter.mlp_width(i))
            for i, layout in ((i, adapter.attention_layout(i)) for i in range(adapter.num_layers()))]


def _add_hyperparameters(writer: gguf.GGUFWriter, model, layers: list[tuple[int, int, int]], name: str,
                         file_type: gguf.LlamaFileType) -> None:
    config = model.config
    heads, kv_heads, widths = (list(x) for x in zip(*layers))
    per_layer = writer.arch == "deci"
    head_dim = model.model.layers[0].self_attn.head_dim
    context = config.max_position_embeddings
    if getattr(config, "sliding_window", None):  # llama.cpp's llama graph attends to everything: stay within the window
        context = min(context, config.sliding_window)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
    writer.add_feed_forward_length(widths if per_layer else widths[0])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _add_pruning_metadata(writer: gguf.GGUFWriter, report: dict | None) -> None:
    """``general.description`` and ``numprune.*`` keys: which method pruned the model, and by how much."""
    writer.add_string("numprune.version", numprune.__version__)
    if report is None:
        writer.add_description(f"exported by numprune {numprune.__version__} (not pruned)")
        return
    options, parameters = report["options"], report["parameters"]
    writer.add_description(
        f"pruned by numprune {numprune.__version__}: method {report['method']}, {options['allocation']} allocation, "
        f"target ratio {parameters['target_ratio']:.3f}, achieved {parameters['achieved_ratio']:.3f} of the "
        f"attention+MLP parameters, compensation {options['compensation']}")
    writer.add_string("numprune.method", report["method"])
    writer.add_string("numprune.allocation", options["allocation"])
    writer.add_string("numprune.compensation", options["compensation"])
    writer.add_float32("numprune.target_ratio", float(parameters["target_ratio"]))
    writer.add_float32("numprune.achieved_ratio", float(parameters["achieved_ratio"]))
    writer.add_uint64("numprune.parameters_before", int(parameters["total_before"]))
    writer.add_uint64("numprune.parameters_after", int(parameters["total_after"]))


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> str:
    """Tokenizer metadata: the source GGUF's where the vocabulary is the embedded SmolLM2's, else built from
    the tokenizer's files with gguf's vocab helpers; ``none`` (ids only) without a tokenizer."""
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return "none"
    if len(tokenizer) > vocab_size:
        raise NumpruneError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    source = _source_gguf_tokenizer(tokenizer)
    if source is not None:
        tokens, scores, types = _padding(len(tokenizer), vocab_size)
        for key, extra in (("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.scores", scores),
                           ("tokenizer.ggml.token_type", types)):
            if key in source:
                value, kind, item_kind = source[key]
                source = {**source, key: ([*value, *extra], kind, item_kind)}
        for key, value in source.items():
            writer.add_key_value(key, *value)
        return f"copied from {smollm2_gguf().name}"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        _add_vocab_from_files(writer, Path(tmp), vocab_size)
    return "built from the tokenizer files"


def _smollm2_installed() -> bool:
    try:
        smollm2_gguf()
    except NumpruneError:
        return False
    return True


def _source_gguf_tokenizer(tokenizer) -> dict | None:
    """The embedded SmolLM2 GGUF's ``tokenizer.*`` fields (value, type, array item type) if ``tokenizer``
    has exactly its vocabulary, else None."""
    if not _smollm2_installed():
        return None
    fields = _tokenizer_fields(smollm2_gguf())
    tokens = fields["tokenizer.ggml.tokens"][0]
    if len(tokenizer) != len(tokens) or tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) != tokens:
        return None
    return fields


@functools.lru_cache(maxsize=2)
def _tokenizer_fields(path: Path) -> dict:
    """A GGUF's ``tokenizer.*`` fields, read once per process (gguf's reader takes seconds over 100k strings)."""
    return {key: (f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
            for key, f in gguf.GGUFReader(path).fields.items() if key.startswith("tokenizer.")}


def _add_vocab_from_files(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    tokenizer_json = json.loads((path / "tokenizer.json").read_text()) if (path / "tokenizer.json").is_file() else {}
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise NumpruneError("cannot describe this tokenizer to llama.cpp: only byte-level BPE tokenizers "
                            f"(tokenizer.json) are converted, this one is {model.get('type', 'not a tokenizer.json')}")
    vocab = gguf.BpeVocab(path)
    tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
    if len(tokens) > vocab_size:
        raise NumpruneError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
    for added in tokenizer_json.get("added_tokens", []):  # special tokens of the main vocabulary, too
        if added.get("special"):
            types[added["id"]] = gguf.TokenType.CONTROL
    padding = _padding(len(tokens), vocab_size)
    tokens, scores, types = tokens + [t.encode() for t in padding[0]], scores + padding[1], types + padding[2]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_bpe_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(path, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _padding(count: int, vocab_size: int) -> tuple[list[str], list[float], list[gguf.TokenType]]:
    """Tokens, scores and types for the embeddings past the tokenizer's ``count`` tokens (vocabularies padded for
    speed): unused ``[PAD{i}]`` tokens, as llama.cpp's converter writes them (llama.cpp refuses a GGUF whose token
    list is shorter than its embedding)."""
    extra = range(count, vocab_size)
    return [f"[PAD{i}]" for i in extra], [-1000.0] * len(extra), [gguf.TokenType.UNUSED] * len(extra)


def _bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the split a byte-level BPE tokenizer makes before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level_regex = kinds[-1:] == ["ByteLevel"] and steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
        return "smollm"  # single digits, then GPT-2's split
    raise NumpruneError(f"cannot describe this tokenizer to llama.cpp: its pre-tokenizer ({' + '.join(map(str, kinds))}) "
                        "is neither GPT-2's byte-level split nor SmolLM2's digits + byte-level split")


def _tensors(model, layers: list[tuple[int, int, int]]):
    """(GGUF name, tensor) of every weight, q/k rows reordered for llama.cpp's rotary pairs."""
    inner = model.model
    yield "token_embd.weight", inner.embed_tokens.weight
    yield "output_norm.weight", inner.norm.weight
    if model.lm_head.weight.data_ptr() != inner.embed_tokens.weight.data_ptr():  # untied output
        yield "output.weight", model.lm_head.weight
    factors = _rope_factors(model)
    if factors is not None:
        yield "rope_freqs.weight", factors
    for i, (layer, (heads, kv_heads, _)) in enumerate(zip(inner.layers, layers)):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        projections = (("attn_q", attn.q_proj, heads), ("attn_k", attn.k_proj, kv_heads), ("attn_v", attn.v_proj, 0),
                       ("attn_output", attn.o_proj, 0), ("ffn_gate", mlp.gate_proj, 0), ("ffn_up", mlp.up_proj, 0),
                       ("ffn_down", mlp.down_proj, 0))
        for gguf_name, linear, rotary_heads in projections:
            for kind in ("weight", "bias"):
                tensor = getattr(linear, kind)
                if tensor is not None:
                    yield f"blk.{i}.{gguf_name}.{kind}", _pair_rotary_rows(tensor, rotary_heads) if rotary_heads else tensor


def _pair_rotary_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from transformers' rotary halves (i, i + d/2) to llama.cpp's pairs (2i, 2i + 1)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _rope_factors(model: nn.Module) -> torch.Tensor | None:
    """llama.cpp's per-pair frequency divisors for a scaled rotary embedding (linear, llama3); None when unscaled.

    Taken from the model's own rotary module, so the frequencies are transformers' exactly.
    """
    rotary = model.model.rotary_emb
    if rotary.rope_type not in _STATIC_ROPE or rotary.attention_scaling != 1.0:
        raise NumpruneError(f"cannot export to GGUF: rotary scaling {rotary.rope_type!r} is not one llama.cpp's llama "
                            f"and deci graphs reproduce ({', '.join(_STATIC_ROPE)} are)")
    default, _ = type(rotary).compute_default_rope_parameters(model.config)
    factors = (default / rotary.inv_freq.cpu()).float()
    return None if torch.allclose(factors, torch.ones_like(factors)) else factors


def _encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor in the output type; vectors in float32, matrices whose rows miss the block size in f16."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1:
        return data, gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
