"""Inference speed and memory of dense and pruned models: the measurements behind "pruning makes it faster".

Generation is a hand-written greedy loop rather than ``generate`` so that prefill (the whole prompt
in one forward pass) and decode (one token per step, reading the KV cache) are timed apart: removing
heads and channels helps them differently, and decode is what a user waits on.
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil
import torch

from numprune.adapters import check_window
from numprune.errors import NumpruneError
from numprune.extras import need
from numprune.io.table import markdown_table
from numprune.save import read_report

MiB = 2**20


def measure(model, *, batch_size: int = 1, prompt_len: int = 64, new_tokens: int = 128, warmup: int = 1,
            repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode throughput, latency and memory of greedy generation from a random prompt.

    ``warmup`` untimed runs first (kernel selection, allocator growth), then ``repeats`` timed
    ones; throughput is reported as median, min and max so that noise is visible. Memory is what
    the process holds, before and at its peak over all runs: CUDA allocated bytes on a GPU,
    resident set size on the CPU (sampled every ~2 ms by a thread; approximate, as the allocator
    may keep memory freed earlier). ``model_peak_bytes``, this model's weights plus the growth
    during generation, leaves out other models the process holds, so it is the one to compare.
    """
    check_window(model, prompt_len + new_tokens)
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch_size, prompt_len),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    with PeakMemory(device) as memory:  # from before the warm-up: its allocations are the run's too
        for _ in range(warmup):
            _generate(model, prompt, new_tokens)
        runs = [_generate(model, prompt, new_tokens) for _ in range(repeats)]
    prefill_s = [r[0] for r in runs]
    decode_s = [r[1] for r in runs]
    return {
        "protocol": {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup": warmup,
                     "repeats": repeats, "seed": seed, **_runtime(model)},
        "prefill": {**throughput(batch_size * prompt_len, prefill_s), "latency_s": statistics.median(prefill_s)},
        "decode": {**throughput(batch_size * new_tokens, decode_s),
                   "ms_per_token": 1000 * statistics.median(decode_s) / new_tokens},
        "kv_cache_bytes": runs[-1][2],
        **_memory_report(model, memory),
    }


def measure_images(model, *, batch_size: int = 8, warmup: int = 1, repeats: int = 3, seed: int = 0,
                   **sampling) -> dict:
    """Images/s (and image tokens/s) of class-conditional generation, and memory, as ``measure`` does for text.

    Each run samples ``batch_size`` whole images (labels cycling through the classes) with
    ``numprune.image.sampling.generate`` and ``sampling`` options (guidance doubles the batch inside).
    """
    from numprune.image.sampling import generate

    device = next(model.parameters()).device
    labels = torch.arange(batch_size) % model.config.num_classes
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> float:
        sync()
        start = time.perf_counter()
        generate(model, labels, seed=seed, batch_size=batch_size, progress=False, **sampling)
        sync()
        return time.perf_counter() - start

    with PeakMemory(device) as memory:
        for _ in range(warmup):
            run()
        seconds = [run() for _ in range(repeats)]
    rates = [batch_size / s for s in seconds]
    return {
        "protocol": {"batch_size": batch_size, "image_tokens": model.config.image_tokens, "warmup": warmup,
                     "repeats": repeats, "seed": seed, "sampling": sampling, **_runtime(model)},
        "generation": {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
                       "images_per_s_max": max(rates),
                       "tokens_per_s": statistics.median(rates) * model.config.image_tokens},
        **_memory_report(model, memory),
    }


@torch.inference_mode()
def _generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """Seconds for prefill and for ``new_tokens`` decode steps, and the bytes of the final KV cache.

    Only the cache's size is returned: holding the cache itself would add to the next run's peak.
    """
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)  # like generate: only the last position's logits
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    decoded = time.perf_counter()
    cache_bytes = sum(t.numel() * t.element_size() for layer in out.cache.layers for t in (layer.keys, layer.values))
    return prefilled - start, decoded - prefilled, cache_bytes


def throughput(tokens: int, seconds: list[float]) -> dict:
    rates = [tokens / s for s in seconds]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates)}


def _runtime(model) -> dict:
    """Where and how a measurement ran, for its protocol."""
    weight = next(model.parameters())
    return {"device": _device_name(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads()}


def _memory_report(model, memory: PeakMemory) -> dict:
    """The weights' bytes and the memory before and at the peak; ``model_peak_bytes`` is the one to compare."""
    weight_bytes = _weight_bytes(model)
    return {"weight_bytes": weight_bytes, "memory_kind": memory.kind, "memory_before_bytes": memory.before,
            "memory_peak_bytes": memory.peak, "model_peak_bytes": weight_bytes + memory.peak - memory.before}


def _weight_bytes(model) -> int:
    """Parameters and persistent buffers, each tied tensor once (the state dict repeats tied weights)."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


class PeakMemory:
    """Memory before and at its peak within the block: CUDA allocator statistics, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self._process = psutil.Process()
        self._done = threading.Event()

    def __enter__(self):
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = self.peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *_):
        if self.kind == "cuda_allocated":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)


def pruning_ratio(spec: str | None) -> float:
    """The achieved ratio recorded in a pruned folder's report; 0.0 for anything without one (a dense model)."""
    report = read_report(spec) if spec else None
    return float(report["parameters"]["achieved_ratio"]) if report else 0.0


def bench(models, batch_sizes=(1, 8), ratios=None, **measure_options) -> dict:
    """Measure each ``(name, model)`` at each batch size, with ratios relative to the first (the dense reference).

    ``models`` is iterated once, so it may be a generator that loads each model when its turn
    comes: with ``del`` below, only one model is held at a time. ``ratios`` are the models'
    pruning ratios where known (``pruning_ratio`` reads a saved folder's).
    """
    from numprune.evaluate.image import is_image_generator

    runs, reference = [], {}
    for index, (name, model) in enumerate(models):
        parameters = sum(p.numel() for p in model.parameters())
        for batch_size in batch_sizes:
            run = {"model": name, "ratio": ratios[index] if ratios else None, "parameters": parameters}
            ref = reference.setdefault(batch_size, run)
            if is_image_generator(model):  # prompt length and new tokens do not apply: a whole image is sampled
                image_options = {k: v for k, v in measure_options.items() if k not in ("prompt_len", "new_tokens")}
                run.update(measure_images(model, batch_size=batch_size, **image_options))
                run["vs_reference"] = {
                    "images_speedup": run["generation"]["images_per_s"] / ref["generation"]["images_per_s"],
                    "weight_ratio": run["weight_bytes"] / ref["weight_bytes"],
                    "peak_ratio": run["model_peak_bytes"] / ref["model_peak_bytes"]}
                runs.append(run)
                continue
            run.update(measure(model, batch_size=batch_size, **measure_options))
            run["vs_reference"] = {
                "prefill_speedup": run["prefill"]["tokens_per_s"] / ref["prefill"]["tokens_per_s"],
                "decode_speedup": run["decode"]["tokens_per_s"] / ref["decode"]["tokens_per_s"],
                "weight_ratio": run["weight_bytes"] / ref["weight_bytes"],
                "kv_cache_ratio": run["kv_cache_bytes"] / ref["kv_cache_bytes"],
                "peak_ratio": run["model_peak_bytes"] / ref["model_peak_bytes"],
            }
            runs.append(run)
        del model  # free it before a lazily loaded next model arrives
    return {"reference": runs[0]["model"] if runs else None, "runs": runs}


def format_table(results: dict) -> str:
    """A markdown table, one row per model and batch size."""
    if results["runs"] and "generation" in results["runs"][0]:
        return format_image_table(results)
    columns = ("model", "ratio", "params", "batch", "prefill tok/s", "decode tok/s (median [min-max])",
               "decode ms/token", "weight MiB", "KV MiB", "peak MiB", "decode speed-up", "weight ratio")
    rows = []
    for r in results["runs"]:
        decode, vs = r["decode"], r["vs_reference"]
        rows.append((*_model_cells(r), f"{r['prefill']['tokens_per_s']:.1f}",
                     f"{decode['tokens_per_s']:.1f} [{decode['tokens_per_s_min']:.1f}-{decode['tokens_per_s_max']:.1f}]",
                     f"{decode['ms_per_token']:.2f}", f"{r['weight_bytes'] / MiB:.1f}",
                     f"{r['kv_cache_bytes'] / MiB:.2f}", f"{r['model_peak_bytes'] / MiB:.1f}",
                     f"{vs['decode_speedup']:.2f}x", f"{vs['weight_ratio']:.2f}"))
    return markdown_table(columns, rows)


def format_image_table(results: dict) -> str:
    """The image generators' table: images/s and memory, one row per model and batch size."""
    columns = ("model", "ratio", "params", "batch", "images/s (median [min-max])", "image tokens/s", "weight MiB",
               "peak MiB", "speed-up", "weight ratio")
    rows = []
    for r in results["runs"]:
        gen, vs = r["generation"], r["vs_reference"]
        rows.append((*_model_cells(r),
                     f"{gen['images_per_s']:.2f} [{gen['images_per_s_min']:.2f}-{gen['images_per_s_max']:.2f}]",
                     f"{gen['tokens_per_s']:.1f}", f"{r['weight_bytes'] / MiB:.2f}",
                     f"{r['model_peak_bytes'] / MiB:.1f}", f"{vs['images_speedup']:.2f}x", f"{vs['weight_ratio']:.2f}"))
    return markdown_table(columns, rows)


def _model_cells(run: dict) -> tuple:
    """The cells both bench tables open with: model, pruning ratio (``?`` where unknown), parameters, batch size."""
    ratio = "?" if run["ratio"] is None else f"{run['ratio']:.1%}"
    return run["model"], ratio, f"{run['parameters'] / 1e6:.2f}M", run["protocol"]["batch_size"]


def plot(results: dict, path) -> None:
    """Decode throughput and memory against pruning ratio, one line per batch size (the paper's figure 5)."""
    matplotlib = need("matplotlib", "the plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    if any(r["ratio"] is None for r in runs):
        raise NumpruneError("plotting needs every model's pruning ratio")
    images = "generation" in runs[0]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for batch_size in sorted({r["protocol"]["batch_size"] for r in runs}):
        points = sorted((r for r in runs if r["protocol"]["batch_size"] == batch_size), key=lambda r: r["ratio"])
        ratios = [100 * r["ratio"] for r in points]
        speed.plot(ratios, [r["generation"]["images_per_s"] if images else r["decode"]["tokens_per_s"] for r in points],
                   "o-", label=f"batch {batch_size}")
        memory.plot(ratios, [r["model_peak_bytes"] / MiB for r in points], "o-", label=f"peak, batch {batch_size}")
    points = sorted({(r["ratio"], r["weight_bytes"]) for r in runs})
    memory.plot([100 * p[0] for p in points], [p[1] / MiB for p in points], "k--", label="weights")
    protocol = runs[0]["protocol"]
    for ax, ylabel in ((speed, "images/s" if images else "decode tokens/s"), (memory, "memory (MiB)")):
        ax.set_xlabel("pruning ratio (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{protocol['device']}, {protocol['dtype']}: " + (f"{protocol['image_tokens']} tokens an image"
                 if images else f"{protocol['prompt_len']}-token prompt, {protocol['new_tokens']} new tokens"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
