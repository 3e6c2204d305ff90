"""Calibration split over 2 processes (one thread each) against 1 process with one thread.

Both prune the same random LLaMA-shaped model with the same calibration tokens; the figure is the
statistics pass (the report's ``calibration`` time, which includes the all_reduce of each layer's
statistics), and the two pruned models are compared tensor by tensor. Processes talk over gloo on
this machine (what ``torchrun --nproc-per-node 2 -m numprune prune ...`` sets up).

    python benchmarks/distributed_speed.py              # target: >= 1.6x on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1000)


def build(seed: int = 0) -> tuple[LlamaForCausalLM, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (ARGS["nsamples"], ARGS["seqlen"]),
                           generator=torch.Generator().manual_seed(seed + 1))
    return model, tokens


ARGS: dict = {}


def run(rank: int, world: int, port: int, out: str, args: dict) -> None:
    """One process: prune (calibrating on its share when in a group of several) and save rank 0's result."""
    import numprune

    ARGS.update(args)
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tokens = build()
        pruned, report = numprune.prune(model, tokens, ratio=0.3, batch_size=args["batch_size"], heal=False,
                                        progress=False)
        if rank == 0:
            save_file({k: v.clone() for k, v in pruned.state_dict().items()}, f"{out}/pruned{world}.safetensors")
            Path(f"{out}/report{world}.json").write_text(json.dumps(report.to_json()))
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = vars(parser.parse_args())
    with tempfile.TemporaryDirectory(prefix="numprune-dist-bench-") as out:
        mp.spawn(run, args=(1, 0, out, args), nprocs=1)  # the single process, in a fresh process too
        mp.spawn(run, args=(2, free_port(), out, args), nprocs=2)
        reports = {w: json.loads(Path(f"{out}/report{w}.json").read_text()) for w in (1, 2)}
        models = {w: load_file(f"{out}/pruned{w}.safetensors") for w in (1, 2)}
    single, split = (reports[w]["time_s"]["calibration"] for w in (1, 2))
    difference = max((models[1][k] - models[2][k]).abs().max().item() for k in models[1])
    same_plans = reports[1]["layers"] == reports[2]["layers"]
    figures = {"shape": SHAPE, **args, "calibration_s": {"1 process": single, "2 processes": split},
               "speedup": single / split, "same_plans": same_plans, "max_abs_weight_difference": difference}
    print(f"statistics pass, {args['nsamples']} x {args['seqlen']} tokens, {SHAPE['num_hidden_layers']} layers of "
          f"hidden {SHAPE['hidden_size']}: 1 process x 1 thread {single:.2f}s, 2 processes x 1 thread {split:.2f}s "
          f"-> {single / split:.2f}x (target >= 1.6x)")
    print(f"same plans: {same_plans}; largest weight difference between the two pruned models: {difference:.2e}")
    if args["json"]:
        Path(args["json"]).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
