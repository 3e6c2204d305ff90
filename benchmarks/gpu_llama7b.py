"""Pruning cost on the GPU, and speed and memory of a LLaMA-7B-shaped model pruned 0-50% beside the paper's figure 5.

First, numprune prunes the random model by 30% with ``device="cuda"`` (the ``--device cuda`` of
the command line): the fp32 weights wait in CPU memory, each decoder layer's pass runs on the GPU in
``--prune-dtype`` (statistics in float64), and the report's stage times, calibration tokens per
second and peak GPU and CPU memory are printed.

Speed depends only on shapes, so the weights are random and the plans uniform (numprune's uniform
allocation with equal scores). Protocol as in the paper: fp16, batch 1, a 64-token prompt and
128 generated tokens. ``--small`` runs a small LLaMA shape on the CPU in well under a minute, to
check the script without a GPU.

    python benchmarks/gpu_llama7b.py --json llama7b.json
    python benchmarks/gpu_llama7b.py --small
    python benchmarks/gpu_llama7b.py --prune-only --prune-layers 32   # the pruning stage alone, all 32 layers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.initialization import no_init_weights

import numprune
from numprune.adapters import LayerPlan, adapter_for
from numprune.allocate import allocate
from numprune.bench import measure
from numprune.cli.args import dtype as dtype_arg
from numprune.criteria import LayerScores
from numprune.io.table import markdown_table
from numprune.report import parameter_counts
from numprune.shrink import shrink

LLAMA_7B = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                intermediate_size=11008, vocab_size=32000)
SMALL = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, hidden_size=512,
             intermediate_size=1376, vocab_size=32000)
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
# Figure 5 of the paper (LLaMA-7B, fp16, batch 1), read off the plot at the ratios above.
PAPER_MEMORY_GB = (12.6, 11.0, 9.5, 8.7, 7.5, 6.1)
PAPER_TOKENS_PER_S = (26, 28, 33, 36, 40, 45)
CHANNEL_MULTIPLE = 64


def build_model(shape: dict, device: str, dtype: torch.dtype):
    """A random LLaMA model allocated directly on ``device``: no slow CPU init, no second copy."""
    config = LlamaConfig(**shape)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():  # no_init_weights leaves them uninitialised
            if p.dim() == 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)  # RMSNorm scales
    return model.eval()


def uniform_plans(adapter, ratio: float) -> list[LayerPlan]:
    """numprune's uniform allocation with equal scores: whole KV groups, then MLP channels in multiples of 64
    (as fast kernels like), about ``ratio`` of every layer removed."""
    scores = [LayerScores(torch.zeros(adapter.attention_layout(i).num_heads, device="cpu"),
                          torch.zeros(adapter.mlp_width(i), device="cpu"))
              for i in range(adapter.num_layers())]
    return allocate(adapter, scores, ratio, "uniform", gqa_unit="kv-group", round_to=CHANNEL_MULTIPLE)


def removed_fraction(dense, pruned) -> float:
    """Fraction of attention+MLP parameters removed (the ratio's definition)."""
    before, after = (parameter_counts(adapter_for(m))["attention_mlp"] for m in (dense, pruned))
    return 1 - after / before


def run(shape: dict, device: str, dtype: torch.dtype, **measure_options) -> list[dict]:
    dense = build_model(shape, device, dtype)
    adapter = adapter_for(dense)
    rows = []
    for ratio, paper_gb, paper_speed in zip(RATIOS, PAPER_MEMORY_GB, PAPER_TOKENS_PER_S):
        with torch.device(device):  # the narrower copy is built on the device too
            model = shrink(adapter, uniform_plans(adapter, ratio)) if ratio else dense
        result = measure(model, **measure_options)
        rows.append({"target_ratio": ratio, "achieved_ratio": removed_fraction(dense, model),
                     "parameters": sum(p.numel() for p in model.parameters()), **result,
                     "paper": {"memory_gb": paper_gb, "tokens_per_s": paper_speed}})
        print(f"ratio {ratio:.0%}: {result['decode']['tokens_per_s']:.1f} tokens/s", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def prune_on_device(shape: dict, device: str, dtype: torch.dtype, nsamples: int, seqlen: int) -> dict:
    """Prune the random model by 30% with its layer passes on ``device``; the report's cost figures."""
    model = build_model(shape, "cpu", torch.float32)  # the weights wait on the CPU
    tokens = torch.randint(0, shape["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    _, report = numprune.prune(model, tokens, ratio=0.3, device=device, dtype=dtype, inplace=True, heal=False)
    gib = 2**30
    print(f"pruned {shape['num_hidden_layers']} layers by 30% on {device} in {dtype}: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in report["time_s"].items())
          + f"; calibration {report['calibration']['tokens_per_s']:.0f} tokens/s; peak GPU "
          f"{report.get('peak_gpu_bytes', 0) / gib:.2f} GiB, peak RSS {report['peak_rss_bytes'] / gib:.2f} GiB", flush=True)
    return {key: report[key] for key in ("time_s", "calibration", "compute", "parameters", "peak_rss_bytes")} | {
        "peak_gpu_bytes": report.get("peak_gpu_bytes"), "nsamples": nsamples, "seqlen": seqlen}


def table(rows: list[dict]) -> str:
    """Markdown: measured speed and memory and their ratios to dense, beside the paper's."""
    dense, paper_dense = rows[0], rows[0]["paper"]
    header = ("ratio", "achieved", "params", "tokens/s (median [min-max])", "speed-up", "paper tokens/s",
              "paper speed-up", "peak GiB", "memory ratio", "paper GB", "paper memory ratio")
    cells = []
    for r in rows:
        d, paper = r["decode"], r["paper"]
        cells.append((f"{r['target_ratio']:.0%}", f"{r['achieved_ratio']:.1%}", f"{r['parameters'] / 1e9:.2f}B",
                      f"{d['tokens_per_s']:.1f} [{d['tokens_per_s_min']:.1f}-{d['tokens_per_s_max']:.1f}]",
                      f"{d['tokens_per_s'] / dense['decode']['tokens_per_s']:.2f}x", paper["tokens_per_s"],
                      f"{paper['tokens_per_s'] / paper_dense['tokens_per_s']:.2f}x",
                      f"{r['model_peak_bytes'] / 2**30:.2f}", f"{r['model_peak_bytes'] / dense['model_peak_bytes']:.2f}",
                      paper["memory_gb"], f"{paper['memory_gb'] / paper_dense['memory_gb']:.2f}"))
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small LLaMA shape in float32 on the CPU")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--prune-layers", type=int, default=8, help="decoder layers of the model the pruning stage "
                        "prunes (default 8 of 32, so the one-shot run fits its time: the scores and least-squares "
                        "solves run on the CPU in float64; times grow in proportion; the speed stage uses all 32)")
    parser.add_argument("--prune-samples", type=int, default=128, help="calibration windows of the pruning stage")
    parser.add_argument("--prune-seqlen", type=int, default=512, help="their length in tokens")
    parser.add_argument("--prune-dtype", default="bfloat16", type=dtype_arg,
                        help="precision of the pruning stage's layer passes (default bfloat16)")
    parser.add_argument("--prune-only", action="store_true", help="skip the speed and memory table")
    args = parser.parse_args(argv)
    if args.small:
        shape, device, dtype = SMALL, "cpu", torch.float32
    elif torch.cuda.is_available():
        shape, device, dtype = LLAMA_7B, "cuda", torch.float16
    else:
        parser.error("the LLaMA-7B run needs a CUDA GPU; use --small on the CPU")
    prune_shape = {**shape, "num_hidden_layers": min(args.prune_layers, shape["num_hidden_layers"])}
    pruning = prune_on_device(prune_shape, device, args.prune_dtype,
                              *((8, 64) if args.small else (args.prune_samples, args.prune_seqlen)))
    if args.prune_only:
        if args.json:
            Path(args.json).write_text(json.dumps({"shape": prune_shape, "pruning": pruning}, indent=2) + "\n")
        return
    rows = run(shape, device, dtype, batch_size=1, prompt_len=64, new_tokens=128)
    p = rows[0]["protocol"]
    print(f"\n{p['device']}, {p['dtype']}, batch {p['batch_size']}, {p['prompt_len']}-token prompt, "
          f"{p['new_tokens']} new tokens, {p['warmup']} warm-up + {p['repeats']} timed runs; "
          "peak = weights + growth during generation; paper: LLaMA-7B, fp16, batch 1\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "pruning": pruning, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
