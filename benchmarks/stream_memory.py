"""Peak memory of streamed pruning (``--stream``) against the model's size and against one layer's work.

Writes a random LLaMA-shaped model as sharded safetensors, one layer at a time (so writing it needs
no more memory than pruning it), then prunes it with ``numprune.prune_streaming`` in a child process
started by ``/usr/bin/time -v``, whose "Maximum resident set size" is the figure (a child's own
ru_maxrss would also count its parent's peak before exec). It is set against the fp32
model size and against one layer's working set: its weights, the calibration activations (the
hidden states in and out, plus one batch's MLP intermediates) and its statistics (the two float64
Gram matrices). Every file it writes is removed at the end.

    python benchmarks/stream_memory.py            # 24 LLaMA-shaped layers of hidden 2048 (about 5 GB)
    python benchmarks/stream_memory.py --layers 3 --hidden 4096 --intermediate 11008 --heads 32   # LLaMA-7B layers
    python benchmarks/stream_memory.py --layers 12 --depth 3 --ratio 0   # 3 layers removed, no width step

With ``--heal`` the pruned model is then healed block-local, streamed (``prune_streaming(heal=True)``: one layer of
the dense and of the pruned model at a time, float32 working copies with gradients and Adam's moments), and the
figure is the peak of both steps.

With ``--depth`` the figure also counts the depth step's statistics, which one pass accumulates for every
candidate span at once (numprune.depth: a float64 G, MLP width squared, and C, MLP width x hidden, per span).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig


def write_random_model(folder: Path, config: LlamaConfig, seed: int = 0) -> int:
    """A random model saved shard by shard (one per decoder layer + one for the rest); returns its bytes."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n: t for n, t in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(group, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, (_group, members) in enumerate(sorted(groups.items()), start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(names[n].shape, generator=generator) * 0.02 if names[n].dim() == 2
                       else torch.ones(names[n].shape)) for n in members}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(members, shard)
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    return total


def one_layer_bytes(config: LlamaConfig, nsamples: int, seqlen: int, batch_size: int) -> dict:
    """fp32 weights, activations and float64 statistics of one decoder layer's pass."""
    h, i = config.hidden_size, config.intermediate_size
    hd = h // config.num_attention_heads
    weights = 4 * (h * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * h * i + 2 * h)
    activations = 4 * (2 * nsamples * seqlen * h + 3 * batch_size * seqlen * i)
    statistics = 8 * (h * h + h + i * i + i)
    return {"weights": weights, "activations": activations, "statistics": statistics,
            "total": weights + activations + statistics}


def depth_statistics_bytes(config: LlamaConfig, depth: int) -> int:
    """The depth step's float64 G and C of every candidate span (spans start at layer 1 or later)."""
    h, i = config.hidden_size, config.intermediate_size
    return 8 * (config.num_hidden_layers - depth) * (i * i + i * h) if depth else 0


def child(folder: str, out: str, nsamples: int, seqlen: int, batch_size: int, ratio: float, method: str,
          depth: int, heal: bool) -> None:
    """Runs in its own process: prune streaming, print the report's time as JSON."""
    import psutil

    import numprune

    baseline = psutil.Process().memory_info().rss  # after imports, before any weight
    config = LlamaConfig.from_pretrained(folder)
    tokens = torch.randint(0, config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))
    options = dict(ratio=ratio, method=method, **({"heal": True} if heal else {})) if ratio else {}
    report = numprune.prune_streaming(folder, tokens, out=out, batch_size=batch_size, progress=False,
                                      **options, **({"depth": depth} if depth else {}))
    healing = [layer["seconds"] for layer in report["healing"]["layers"]] if heal else None
    print(json.dumps({"baseline_rss_bytes": baseline, "time_s": report["time_s"], "parameters": report["parameters"],
                      "healing_layer_seconds": healing}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--method", default="numerical")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.3, help="the width step's (0: none, with --depth)")
    parser.add_argument("--depth", type=int, default=0, help="decoder layers removed first (default 0)")
    parser.add_argument("--heal", action="store_true", help="heal the pruned model block-local, streamed")
    parser.add_argument("--workdir", default=None, help="where the model and the result are written (default: /tmp)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child, args.nsamples, args.seqlen, args.batch_size, args.ratio, args.method,
                     args.depth, args.heal)

    config = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         tie_word_embeddings=False)
    with tempfile.TemporaryDirectory(prefix="numprune-stream-bench-", dir=args.workdir) as work:
        folder = Path(work) / "dense"
        folder.mkdir()
        start = time.perf_counter()
        model_bytes = write_random_model(folder, config)
        print(f"wrote a {model_bytes / 2**30:.2f} GiB fp32 model ({args.layers} layers of hidden {args.hidden}, "
              f"MLP {args.intermediate}) in {time.perf_counter() - start:.0f}s", flush=True)
        done = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--child", str(folder),
                               str(Path(work) / "pruned"), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                               "--batch-size", str(args.batch_size), "--ratio", str(args.ratio), "--method", args.method,
                               "--depth", str(args.depth), *(["--heal"] if args.heal else [])],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the pruning process failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["peak_rss_bytes"] = 1024 * int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    layer = one_layer_bytes(config, args.nsamples, args.seqlen, args.batch_size)
    peak, baseline = run["peak_rss_bytes"], run["baseline_rss_bytes"]
    depth_bytes = depth_statistics_bytes(config, args.depth)
    figures = {"model_bytes": model_bytes, "method": args.method, "ratio": args.ratio, "depth": args.depth,
               "heal": args.heal,
               "one_layer": layer, "depth_statistics_bytes": depth_bytes, **run,
               "peak_over_model": peak / model_bytes, "peak_over_one_layer": peak / layer["total"],
               "peak_above_baseline_over_one_layer": (peak - baseline) / layer["total"]}
    gib = 2**30
    print(f"one layer: weights {layer['weights'] / gib:.2f} + activations {layer['activations'] / gib:.2f} "
          f"+ statistics {layer['statistics'] / gib:.2f} = {layer['total'] / gib:.2f} GiB"
          + (f"; depth statistics, all spans: {depth_bytes / gib:.2f} GiB" if args.depth else ""))
    print(f"peak RSS {peak / gib:.2f} GiB (process after imports: {baseline / gib:.2f} GiB) = "
          f"{figures['peak_over_model']:.2f} x the model, {figures['peak_over_one_layer']:.2f} x one layer's work "
          f"({figures['peak_above_baseline_over_one_layer']:.2f} x above the import baseline); target < 1.5 x one layer")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in run["time_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
