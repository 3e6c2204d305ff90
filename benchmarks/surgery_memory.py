"""Peak memory of an in-memory pruning run (``numprune.prune``) against the model's own weights.

Each measurement is a child process started by ``/usr/bin/time -v``, whose "Maximum resident set
size" is the figure: the child loads SmolLM2-135M (``--model smollm2``) or builds a random
LLaMA-1B-shaped model (``--model llama-1b``: hidden 2048, 16 layers, MLP 8192, 32 query and 8 KV
heads, a tied 32,000-token vocabulary; about 1.0 B parameters, 3.9 GiB in fp32), notes its resident
memory once the model is built, then prunes it by ``--ratio`` with ``--method`` on random calibration
tokens. It prints the weights' size, the resident memory before pruning, the peak, and the peak as a
multiple of the weights (the part above the loaded model, too). Timings are incidental.

    python benchmarks/surgery_memory.py --model smollm2
    python benchmarks/surgery_memory.py --model llama-1b
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
import numprune
from numprune.models import load_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

spec, ratio, method, nsamples, seqlen = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
if spec == "llama-1b":
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    with no_init_weights():
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() == 2 else p.fill_(1.0)
else:
    model = load_model(spec)[0]
weights = sum(p.numel() * p.element_size() for p in model.parameters())
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tokens = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))
start = time.perf_counter()
name, *options = method.split(":")
pruned, report = numprune.prune(model, tokens, ratio=ratio, method=name, progress=False, heal=False,
                                **dict(o.split("=") for o in options))
print(json.dumps({"weights_bytes": weights, "rss_loaded_bytes": loaded, "prune_s": round(time.perf_counter() - start, 1),
                  "achieved_ratio": report["parameters"]["achieved_ratio"]}))
"""


def measure(args) -> dict:
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", CHILD, args.model, str(args.ratio), args.method,
                           str(args.nsamples), str(args.seqlen)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["peak_rss_bytes"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) * 1024
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, llama-1b, or what numprune's load_model takes")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--method", default="wanda-sp:compensation=least-squares",
                        help="a method with key=value options (default: Wanda-SP's scores, least-squares refit)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    f = measure(args)
    gib, weights = 2**30, f["weights_bytes"]
    print(json.dumps({**vars(args), **f}))
    print(f"{args.model}: weights {weights / gib:.2f} GiB, resident once loaded {f['rss_loaded_bytes'] / gib:.2f} GiB, "
          f"peak {f['peak_rss_bytes'] / gib:.2f} GiB = {f['peak_rss_bytes'] / weights:.2f} x the weights "
          f"({(f['peak_rss_bytes'] - f['rss_loaded_bytes']) / weights:.2f} x above the loaded model); "
          f"prune {f['prune_s']:.0f}s, removed {f['achieved_ratio']:.1%}")


if __name__ == "__main__":
    main()
