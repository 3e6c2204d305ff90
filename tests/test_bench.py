"""Speed and memory measurement on tiny models: the numbers are there, consistent, and compared to the reference."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokens
from numprune.adapters import adapter_for
from numprune.api import prune
from numprune.bench import bench, format_table, measure, plot, pruning_ratio
from numprune.cli import main, parser
from numprune.errors import NumpruneError
from numprune.save import save_pruned
from numprune.shrink import shrink

QUICK = dict(prompt_len=8, new_tokens=4, warmup=1, repeats=2)


@pytest.fixture(scope="module")
def pair():
    """A dense tiny GQA model and its half, pruned by whole KV groups so that the KV cache shrinks too."""
    dense = tiny_llama("gqa")
    pruned, report = prune(dense, tiny_tokens(), ratio=0.5, allocation="uniform", gqa_unit="kv-group", progress=False)
    return dense, pruned, report


@pytest.fixture(scope="module")
def results(pair):
    dense, pruned, report = pair
    return bench([("dense", dense), ("pruned", pruned)], batch_sizes=(1, 2),
                 ratios=[0.0, report["parameters"]["achieved_ratio"]], **QUICK)


def test_measure_reports_positive_numbers():
    result = measure(tiny_llama("gqa"), batch_size=2, **QUICK)
    numbers = {**result["prefill"], **result["decode"],
               **{k: v for k, v in result.items() if isinstance(v, (int, float))}}
    assert numbers and all(v > 0 for v in numbers.values()), numbers
    prefill = result["prefill"]
    assert prefill["tokens_per_s_min"] <= prefill["tokens_per_s"] <= prefill["tokens_per_s_max"]
    assert result["memory_peak_bytes"] >= result["memory_before_bytes"]
    assert result["protocol"] == {"batch_size": 2, **QUICK, "seed": 0, "device": "cpu", "dtype": "float32",
                                  "torch_threads": torch.get_num_threads()}
    # The real cache: 3 layers x K and V x 2 KV heads x head_dim 8 x (prompt + new tokens) x batch 2 x float32.
    assert result["kv_cache_bytes"] == 3 * 2 * 2 * 8 * (8 + 4) * 2 * 4


def test_pruned_model_needs_less_memory(results):
    dense, pruned = (r for r in results["runs"] if r["protocol"]["batch_size"] == 1)
    assert pruned["weight_bytes"] < dense["weight_bytes"]
    assert pruned["kv_cache_bytes"] < dense["kv_cache_bytes"]


def test_bench_compares_with_the_first_model(results):
    runs = {(r["model"], r["protocol"]["batch_size"]): r for r in results["runs"]}
    assert results["reference"] == "dense"
    assert sorted(runs) == [("dense", 1), ("dense", 2), ("pruned", 1), ("pruned", 2)]
    for batch_size in (1, 2):
        dense, pruned = runs["dense", batch_size], runs["pruned", batch_size]
        assert all(v == 1.0 for v in dense["vs_reference"].values())
        vs = pruned["vs_reference"]
        assert vs["decode_speedup"] == pytest.approx(pruned["decode"]["tokens_per_s"] / dense["decode"]["tokens_per_s"])
        assert vs["weight_ratio"] == pytest.approx(pruned["weight_bytes"] / dense["weight_bytes"])
        assert vs["peak_ratio"] == pytest.approx(pruned["model_peak_bytes"] / dense["model_peak_bytes"])
        assert pruned["parameters"] < dense["parameters"] and 0.4 < pruned["ratio"] < 0.6


def test_table_has_a_row_per_model_and_batch(results):
    rows = format_table(results).splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["dense", "dense", "pruned", "pruned"]
    assert [int(r.split(" | ")[3]) for r in rows] == [1, 2, 1, 2]


def test_plot_writes_a_png(results, tmp_path):
    plot(results, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").read_bytes().startswith(b"\x89PNG")


def bench_args(*argv):
    return parser().parse_args(["bench", *argv])


def test_run_bench_on_saved_folders(pair, tmp_path, capsys):
    dense, pruned, report = pair
    dense.save_pretrained(tmp_path / "dense")
    save_pruned(pruned, None, report, tmp_path / "pruned")
    assert pruning_ratio(str(tmp_path / "dense")) == 0.0
    args = bench_args("--model", str(tmp_path / "dense"), "--model", str(tmp_path / "pruned"), "--batch", "1",
                      "--prompt-len", "4", "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu",
                      "--json", str(tmp_path / "bench.json"))
    assert args.run(args) == 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["ratio"] for r in saved["runs"]] == [0.0, report["parameters"]["achieved_ratio"]]
    assert saved["runs"][1]["vs_reference"]["weight_ratio"] < 1
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[3].startswith(f"| {tmp_path / 'pruned'} | 50.0% |")


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1,x"], "--batch"), (["--batch", "0"], "--batch"), (["--batch", ""], "--batch"),
    (["--prompt-len", "0"], "--prompt-len"), (["--new-tokens", "-1"], "--new-tokens"),
    (["--repeats", "0"], "--repeats"), (["--warmup", "-1"], "--warmup"), (["--threads", "0"], "--threads"),
    (["--json", "/dev/null/x.json"], "/dev/null"),
])
def test_run_bench_rejects_bad_options(argv, message, capsys):
    """Refused in one line with exit status 2, by the parser or before any model is loaded."""
    try:
        status = main(["bench", *argv])
    except SystemExit as exit_:
        status = exit_.code
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("numprune: error:") and message in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_run_bench_without_a_gpu():
    args = bench_args("--device", "cuda")
    with pytest.raises(NumpruneError, match="CUDA"):
        args.run(args)


def load_gpu_script():
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_llama7b.py"
    spec = importlib.util.spec_from_file_location("gpu_llama7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", ["LLAMA_7B", "SMALL"])
def test_gpu_script_plans_remove_the_target_fraction(shape):
    script = load_gpu_script()
    dense = script.build_model(getattr(script, shape), "meta", torch.float16)  # shapes only: no memory, no time
    adapter = adapter_for(dense)
    for ratio in script.RATIOS[1:]:
        with torch.device("meta"):
            pruned = shrink(adapter, script.uniform_plans(adapter, ratio))
        assert script.removed_fraction(dense, pruned) == pytest.approx(ratio, abs=0.02)
        assert adapter_for(pruned).mlp_width(0) % script.CHANNEL_MULTIPLE == 0
