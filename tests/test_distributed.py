"""Calibration split over two processes (gloo, CPU) gives the single-process result."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama, tiny_tokens
from safetensors.torch import load_file, save_file

from numprune import NumpruneError, prune, prune_streaming
from numprune.distributed import shard

# healing (the default method's) is not what is split: each run stops at the refit
RUNS = {"dense": dict(allocation="global", heal=False),
        "sequential": dict(compensation_stats="sequential", allocation="global", heal=False)}


def tokens():
    return tiny_tokens(7, 16)  # 7 samples: an uneven split (4 + 3), batches of 2 differ from the single run's


def worker(rank: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_llama("gqa", layers=3)
        for name, options in RUNS.items():
            pruned, report = prune(model, tokens(), ratio=0.3, batch_size=2, progress=False, **options)
            if rank == 0:
                save_file({k: v.clone() for k, v in pruned.state_dict().items()}, f"{out}/{name}.safetensors")
                with open(f"{out}/{name}.json", "w") as f:
                    json.dump(report.to_json(), f)
        prune_streaming(folder, tokens(), ratio=0.3, out=f"{out}/streamed", batch_size=2, progress=False,
                        **RUNS["dense"])
        with open(f"{out}/shard{rank}.json", "w") as f:
            json.dump(shard(tokens()).tolist(), f)
        try:  # each process given different calibration data
            prune(model, tiny_tokens(7, 16, seed=10 + rank), ratio=0.3, progress=False)
        except NumpruneError as error:
            with open(f"{out}/error{rank}.txt", "w") as f:
                f.write(str(error))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    model = tiny_llama("gqa", layers=3)
    model.save_pretrained(tmp_path / "dense")
    mp.spawn(worker, args=(free_port(), str(tmp_path / "dense"), str(tmp_path)), nprocs=2, join=True)

    shards = [json.loads((tmp_path / f"shard{r}.json").read_text()) for r in range(2)]
    assert shards[0] + shards[1] == tokens().tolist() and len(shards[0]) == 4  # a contiguous, complete split
    for name, options in RUNS.items():
        single, report = prune(model, tokens(), ratio=0.3, batch_size=4, progress=False, **options)
        split = json.loads((tmp_path / f"{name}.json").read_text())
        assert split["layers"] == report["layers"] and split["parameters"] == report["parameters"]
        assert split["compute"]["world_size"] == 2 and split["calibration"]["tokens"] == 7 * 16
        state = load_file(tmp_path / f"{name}.safetensors")
        for key, tensor in single.state_dict().items():
            torch.testing.assert_close(state[key], tensor, rtol=1e-4, atol=1e-5)
    streamed = {k: t for f in (tmp_path / "streamed").glob("*.safetensors") for k, t in load_file(f).items()}
    dense = load_file(tmp_path / "dense.safetensors")
    assert streamed.keys() == dense.keys() - {"lm_head.weight"}  # tied to the embeddings, saved once
    for key, tensor in streamed.items():
        torch.testing.assert_close(tensor, dense[key], rtol=1e-4, atol=1e-5)
    streamed_report = json.loads((tmp_path / "streamed" / "pruning_report.json").read_text())
    assert streamed_report["layers"] == json.loads((tmp_path / "dense.json").read_text())["layers"]
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "disagree on the calibration tokens" in errors[0]
