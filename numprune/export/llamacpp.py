"""Running GGUF files in llama.cpp itself, through its Python bindings (llama-cpp-python, an optional extra).

What the exporter is judged by: llama.cpp's next-token log-probabilities, perplexity and greedy
tokens on our files, its own quantiser (q8_0, Q4_K_M, ...), and its speed and memory.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch

from numprune.bench import MiB, PeakMemory, throughput
from numprune.errors import NumpruneError
from numprune.export.gguf import export_gguf
from numprune.extras import install_line
from numprune.io.output import output_file
from numprune.io.table import markdown_table

try:
    import llama_cpp
except ImportError:  # an optional extra: `bash scripts/setup.sh --llama-cpp` builds it
    llama_cpp = None

INSTALL_HINT = install_line("llama_cpp", "measuring in llama.cpp")
# llama.cpp's quantiser targets by name (its llama_ftype values).
QUANTS = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def available() -> bool:
    return llama_cpp is not None


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


def load(path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None, all_logits: bool = True,
         exact: bool = False):
    """A ``llama_cpp.Llama`` on ``path``; ``exact`` keeps the KV cache in float32 (llama.cpp's default
    f16 cache rounds K and V, which is most of its difference from transformers on an f32 file)."""
    if llama_cpp is None:
        raise NumpruneError(INSTALL_HINT)
    cache_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads or default_threads(),
                               logits_all=all_logits, verbose=False, **cache_type)
    except ValueError as e:  # llama-cpp-python's message when llama.cpp refuses the file
        raise NumpruneError(f"llama.cpp could not load {path}: {e}") from None


@contextmanager
def native_log(verbose: bool = False) -> Iterator[None]:
    """While the block runs, llama.cpp writes its own log from C: to stderr if ``verbose``, else nowhere.

    llama-cpp-python passes llama.cpp's log lines to a Python callback, called from C. A signal handler
    (SIGTERM, Ctrl-C) that runs inside it raises where ctypes can only print the exception and go on,
    so the signal is lost. With no Python callback, the handler runs when llama.cpp returns to Python.
    """
    if llama_cpp is None:
        raise NumpruneError(INSTALL_HINT)
    from llama_cpp import _logger  # the bindings' own callback, put back after the block

    llama_cpp.llama_log_set(llama_cpp.llama_log_callback(0), None)  # NULL: llama.cpp logs from C to descriptor 2
    saved = None
    if not verbose:
        sys.stderr.flush()
        saved = os.dup(2)
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 2)
        os.close(quiet)
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def log_probs(llm, ids) -> np.ndarray:
    """llama.cpp's next-token log-probabilities (float64, ``[len(ids), vocab]``) for one window from position 0."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def perplexity(llm, windows: torch.Tensor) -> dict:
    """Perplexity as ``numprune.evaluate.perplexity`` computes it (each window on its own), from llama.cpp."""
    total = 0.0
    for window in windows.tolist():
        lp = log_probs(llm, window)
        total -= lp[np.arange(len(window) - 1), window[1:]].sum()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return dict(ppl=math.exp(total / tokens), nll=total / tokens, tokens=tokens, windows=windows.shape[0],
                seqlen=windows.shape[1])


def greedy(llm, prompt, new_tokens: int) -> list[int]:
    """``new_tokens`` greedy continuations of ``prompt`` by llama.cpp's own sampler (top-1)."""
    llm.reset()
    out = []
    for token in llm.generate(list(map(int, prompt)), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


def quantize(source: str | os.PathLike, out: str | os.PathLike, quant: str, n_threads: int | None = None, *,
             overwrite: bool = False) -> Path:
    """llama.cpp's quantiser (``llama_model_quantize``) from an f32/f16/bf16 GGUF to ``quant``, written atomically
    (never over ``source``).

    Matrices whose rows do not divide a k-quant's 256-wide blocks get llama.cpp's own fallback type.
    """
    if llama_cpp is None:
        raise NumpruneError(INSTALL_HINT)
    if quant not in QUANTS:
        raise NumpruneError(f"unknown llama.cpp quantisation {quant!r}; choose from {', '.join(QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = n_threads or default_threads()
    source = Path(source).expanduser()
    with output_file(out, overwrite=overwrite, inputs=[source]) as tmp:  # the paths' own bytes: any name opens
        if llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(tmp), ctypes.byref(params)) != 0:
            raise NumpruneError(f"llama.cpp could not quantise {source} to {quant}")
    return Path(out)


def measure(path: str | os.PathLike, *, prompt_len: int = 64, new_tokens: int = 128, warmup: int = 1,
            repeats: int = 3, n_threads: int | None = None, seed: int = 0) -> dict:
    """Prefill and decode tokens/s (batch 1, greedy, llama.cpp's sampler), latency, file size and memory.

    As ``numprune.bench.measure`` does for transformers: a random prompt, ``warmup`` untimed runs,
    then the median, min and max of ``repeats``. Prefill is the time to the first new token (the
    prompt's forward pass), decode the time of the ``new_tokens`` steps after it. Memory is the
    process's resident set, sampled, from before loading to its peak (the mapped weights count once read).
    """
    n_threads = n_threads or default_threads()
    with PeakMemory(torch.device("cpu")) as memory:
        started = time.perf_counter()
        llm = load(path, n_ctx=prompt_len + new_tokens + 8, n_threads=n_threads, all_logits=False)
        load_s = time.perf_counter() - started
        prompt = np.random.default_rng(seed).integers(0, llm.n_vocab(), prompt_len).tolist()
        runs = [_timed_generation(llm, prompt, new_tokens) for _ in range(warmup + repeats)][warmup:]
        llm.close()
    return {
        "protocol": {"backend": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "batch_size": 1,
                     "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
                     "seed": seed, "threads": n_threads},
        "file_bytes": Path(path).stat().st_size,
        "load_s": load_s,
        **_speeds(prompt_len, new_tokens, [r[0] for r in runs], [r[1] for r in runs]),
        "memory_kind": memory.kind, "memory_before_bytes": memory.before, "memory_peak_bytes": memory.peak,
        "model_peak_bytes": memory.peak - memory.before,
    }


def _speeds(prompt_len: int, new_tokens: int, prefill_s: list[float], decode_s: list[float]) -> dict:
    """Median, min and max rates and latencies of timed runs (their seconds kept, so rounds can be merged)."""
    return {"prefill": {**throughput(prompt_len, prefill_s), "latency_s": statistics.median(prefill_s),
                        "seconds": prefill_s},
            "decode": {**throughput(new_tokens, decode_s), "ms_per_token": 1000 * statistics.median(decode_s) / new_tokens,
                       "seconds": decode_s}}


def _merged(rounds: list[dict]) -> dict:
    """One measurement from rounds of ``measure`` on the same file (each its own load, warm-up and timed run)."""
    protocol = rounds[0]["protocol"]
    peak = max(rounds, key=lambda r: r["model_peak_bytes"])
    return {**rounds[0], "protocol": {**protocol, "repeats": len(rounds), "interleaved": True},
            "load_s": statistics.median(r["load_s"] for r in rounds),
            **_speeds(protocol["prompt_len"], protocol["new_tokens"], [s for r in rounds for s in r["prefill"]["seconds"]],
                      [s for r in rounds for s in r["decode"]["seconds"]]),
            **{key: peak[key] for key in ("memory_before_bytes", "memory_peak_bytes", "model_peak_bytes")}}


def _timed_generation(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    first = None
    for count, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), 1):
        if first is None:
            first = time.perf_counter()  # the prompt's forward pass and the first token
        if count == new_tokens + 1:
            break
    return first - start, time.perf_counter() - first


def parameter_count(path: str | os.PathLike) -> int:
    """Elements of every tensor in a GGUF file (what llama.cpp holds, whatever their type)."""
    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


def bench(models, quants=("f16", "q8_0", "q4_k_m"), *, workdir: str | os.PathLike, windows: torch.Tensor | None = None,
          n_threads: int | None = None, repeats: int = 3, **measure_options) -> dict:
    """Measure ``(name, folder)`` models in llama.cpp at each of ``quants``; ratios against the first model.

    Each folder is exported once to an f16 GGUF in ``workdir``; the other types come from it through
    llama.cpp's own quantiser. Timing runs in ``repeats`` rounds, each visiting every file once (load,
    warm-up, one timed run), so that a machine whose speed drifts (shared or throttled cores) slows
    every model alike instead of whichever ran during the slow minute. With ``windows`` (token ids),
    llama.cpp's perplexity on them too.
    """
    workdir = Path(workdir)
    files = []
    for index, (name, folder) in enumerate(models):
        f16 = export_gguf(folder, workdir / f"{index}-f16.gguf", "f16", overwrite=True).path
        files += [(name, quant, f16 if quant == "f16" else quantize(f16, workdir / f"{index}-{quant}.gguf", quant,
                                                                    n_threads)) for quant in quants]
    rounds = [[measure(path, repeats=1, n_threads=n_threads, **measure_options) for _, _, path in files]
              for _ in range(repeats)]
    runs, reference = [], {}
    for (name, quant, path), measured in zip(files, zip(*rounds)):
        run = {"model": name, "quant": quant, "parameters": parameter_count(path), **_merged(list(measured))}
        if windows is not None:
            llm = load(path, n_ctx=windows.shape[1], n_threads=n_threads)
            run["perplexity"] = perplexity(llm, windows)
            llm.close()
        ref = reference.setdefault(quant, run)
        run["vs_reference"] = {"decode_speedup": run["decode"]["tokens_per_s"] / ref["decode"]["tokens_per_s"],
                               "prefill_speedup": run["prefill"]["tokens_per_s"] / ref["prefill"]["tokens_per_s"],
                               "parameter_ratio": ref["parameters"] / run["parameters"],
                               "file_ratio": run["file_bytes"] / ref["file_bytes"]}
        runs.append(run)
    return {"reference": runs[0]["model"] if runs else None, "runs": runs}


def format_table(results: dict) -> str:
    """A markdown table, one row per model and quantisation."""
    with_ppl = any("perplexity" in r for r in results["runs"])
    columns = ("model", "type", "params", "file MiB", "prefill tok/s", "decode tok/s (median [min-max])",
               "decode ms/token", "peak MiB", "decode speed-up", "params dense/pruned", "file ratio",
               *(("perplexity",) if with_ppl else ()))
    rows = []
    for r in results["runs"]:
        decode, vs = r["decode"], r["vs_reference"]
        cells = [r["model"], r["quant"], f"{r['parameters'] / 1e6:.1f}M", f"{r['file_bytes'] / MiB:.1f}",
                 f"{r['prefill']['tokens_per_s']:.1f}",
                 f"{decode['tokens_per_s']:.1f} [{decode['tokens_per_s_min']:.1f}-{decode['tokens_per_s_max']:.1f}]",
                 f"{decode['ms_per_token']:.2f}", f"{r['model_peak_bytes'] / MiB:.1f}",
                 f"{vs['decode_speedup']:.2f}x", f"{vs['parameter_ratio']:.2f}", f"{vs['file_ratio']:.2f}"]
        if with_ppl:
            cells.append(f"{r['perplexity']['ppl']:.2f}" if "perplexity" in r else "-")
        rows.append(cells)
    protocol = results["runs"][0]["protocol"] if results["runs"] else {}
    timing = (f"{protocol.get('repeats')} rounds over every file (each: load, {protocol.get('warmup')} warm-up, 1 timed run)"
              if protocol.get("interleaved") else f"{protocol.get('warmup')} warm-up + {protocol.get('repeats')} timed runs")
    return (markdown_table(columns, rows) + f"\n\nllama.cpp (llama-cpp-python {protocol.get('llama_cpp_python')}), "
            f"{protocol.get('threads')} threads, batch 1, {protocol.get('prompt_len')}-token prompt, "
            f"{protocol.get('new_tokens')} greedy new tokens, {timing}")
