"""How fast SmolLM2 samples its own calibration text on the CPU, and which generation loop to use.

    python benchmarks/self_generation_speed.py --samples 128 --seqlen 512 --threads 2            # numprune's loop
    python benchmarks/self_generation_speed.py --samples 64 --seqlen 64 --mode generate           # transformers' generate
    python benchmarks/self_generation_speed.py --samples 64 --seqlen 64 --mode generate-static    # ... with a static cache

``loop`` is ``numprune.data.self_generated.sample_tokens`` (DynamicCache, seeded inverse-CDF draw);
the ``generate`` modes time ``model.generate`` with the same temperature and top-p (its own random
draw, so not the same tokens). The load average is printed before and after: the figures mean
little when other work shares the cores.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from numprune.data.self_generated import Sampling, prompt_token, sample_tokens
from numprune.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=Sampling.batch_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--mode", default="loop", choices=("loop", "generate", "generate-static"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, source = load_model("smollm2", dtype=getattr(torch, args.dtype))
    sampling = Sampling(batch_size=args.batch_size)
    print(f"{source}; {args.mode}, {args.samples} x {args.seqlen} tokens, batch {args.batch_size}, {args.dtype}, "
          f"{args.threads} threads; load average before {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    if args.mode == "loop":
        tokens = sample_tokens(model, args.samples, args.seqlen, prompt=prompt_token(tokenizer), seed=0,
                               sampling=sampling, progress=True)
    else:
        tokens = _generate(model, prompt_token(tokenizer), args, sampling)
    seconds = time.perf_counter() - start
    print(f"{tokens.numel()} tokens in {seconds:.1f} s: {tokens.numel() / seconds:.0f} tokens/s; load average after "
          f"{os.getloadavg()[0]:.2f}")


@torch.inference_mode()
def _generate(model, prompt: int, args, sampling: Sampling) -> torch.Tensor:
    torch.manual_seed(0)
    rows = []
    for start in range(0, args.samples, args.batch_size):
        ids = torch.full((min(args.batch_size, args.samples - start), 1), prompt)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=sampling.temperature,
                             top_p=sampling.top_p, top_k=0, max_new_tokens=args.seqlen, min_new_tokens=args.seqlen,
                             pad_token_id=prompt,
                             **({"cache_implementation": "static"} if args.mode == "generate-static" else {}))
        rows.append(out[:, 1:])
    return torch.cat(rows)


if __name__ == "__main__":
    main()
