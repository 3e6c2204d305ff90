"""Speed and memory measurement on tiny models: the numbers are there, consistent, and compared to the reference."""

import importlib.util
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FakeClock, tiny_llama, tiny_tokens
from PIL import Image

import numprune.bench
from numprune.adapters import adapter_for
from numprune.api import prune
from numprune.bench import MiB, bench, format_table, measure, plot, pruning_ratio
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


class GrowingProcess:
    """A stand-in for ``psutil.Process()``: 100 MiB resident at the first reading, 150 MiB at every later one."""

    def __init__(self):
        self.readings = 0

    def memory_info(self):
        self.readings += 1
        return SimpleNamespace(rss=(100 if self.readings == 1 else 150) * MiB)


def test_measure_times_prefill_and_decode_with_the_clock_and_counts_memory(monkeypatch):
    """A controlled clock and process: each rate is the run's tokens over the time the clock says it took, and the
    memory figures are what the process's readings say."""
    clock = FakeClock(1, 0.5, 4, 1, 0.25, 2, 1, 1, 8)  # per run: start, prefill done, decode done
    monkeypatch.setattr(numprune.bench, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(numprune.bench, "psutil", SimpleNamespace(Process=GrowingProcess))
    model = tiny_llama("gqa")
    result = measure(model, batch_size=2, **QUICK)
    runs = QUICK["warmup"] + QUICK["repeats"]
    assert len(clock.readings) == 3 * runs
    timed = [clock.readings[3 * k:3 * k + 3] for k in range(QUICK["warmup"], runs)]  # the warm-up is not counted
    prefill = [2 * QUICK["prompt_len"] / (done - start) for start, done, _ in timed]
    decode = [2 * QUICK["new_tokens"] / (done - start) for _, start, done in timed]
    assert result["prefill"] == {"tokens_per_s": statistics.median(prefill), "tokens_per_s_min": min(prefill),
                                 "tokens_per_s_max": max(prefill),
                                 "latency_s": statistics.median(b - a for a, b, _ in timed)}
    assert result["decode"] == {"tokens_per_s": statistics.median(decode), "tokens_per_s_min": min(decode),
                                "tokens_per_s_max": max(decode),
                                "ms_per_token": 1000 * statistics.median(c - b for _, b, c in timed) / QUICK["new_tokens"]}
    assert result["protocol"] == {"batch_size": 2, **QUICK, "seed": 0, "device": "cpu", "dtype": "float32",
                                  "torch_threads": torch.get_num_threads()}
    # The real cache: 3 layers x K and V x 2 KV heads x head_dim 8 x (prompt + new tokens) x batch 2 x float32.
    assert result["kv_cache_bytes"] == 3 * 2 * 2 * 8 * (8 + 4) * 2 * 4
    # float32 weights, the tied embedding once; memory: the resident set size read first, and the largest read
    assert result["weight_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert (result["memory_kind"], result["memory_before_bytes"], result["memory_peak_bytes"]) == ("rss", 100 * MiB,
                                                                                                   150 * MiB)
    assert result["model_peak_bytes"] == result["weight_bytes"] + 50 * MiB


def test_pruned_model_weights_and_cache_are_what_its_widths_say(pair, results):
    _, pruned_model, report = pair
    dense, pruned = (r for r in results["runs"] if r["protocol"]["batch_size"] == 1)
    assert pruned["weight_bytes"] == 4 * sum(p.numel() for p in pruned_model.parameters()) < dense["weight_bytes"]
    tokens = QUICK["prompt_len"] + QUICK["new_tokens"]
    assert pruned["kv_cache_bytes"] == sum(2 * layer["kv_heads"] * 8 * tokens * 4 for layer in report["layers"])
    assert dense["kv_cache_bytes"] == 3 * 2 * 2 * 8 * tokens * 4


def test_bench_compares_with_the_first_model(pair, results):
    runs = {(r["model"], r["protocol"]["batch_size"]): r for r in results["runs"]}
    assert results["reference"] == "dense"
    assert sorted(runs) == [("dense", 1), ("dense", 2), ("pruned", 1), ("pruned", 2)]
    for batch_size in (1, 2):
        dense, pruned = runs["dense", batch_size], runs["pruned", batch_size]
        assert all(v == 1.0 for v in dense["vs_reference"].values())
        vs = pruned["vs_reference"]
        assert vs["prefill_speedup"] == pytest.approx(pruned["prefill"]["tokens_per_s"] / dense["prefill"]["tokens_per_s"])
        assert vs["decode_speedup"] == pytest.approx(pruned["decode"]["tokens_per_s"] / dense["decode"]["tokens_per_s"])
        assert vs["weight_ratio"] == pytest.approx(pruned["weight_bytes"] / dense["weight_bytes"])
        assert vs["kv_cache_ratio"] == pytest.approx(pruned["kv_cache_bytes"] / dense["kv_cache_bytes"])
        assert vs["peak_ratio"] == pytest.approx(pruned["model_peak_bytes"] / dense["model_peak_bytes"])
        assert pruned["parameters"] == sum(p.numel() for p in pair[1].parameters()) < dense["parameters"]
        assert (dense["ratio"], pruned["ratio"]) == (0.0, pair[2]["parameters"]["achieved_ratio"])


def test_table_has_a_row_per_model_and_batch(results):
    lines = format_table(results).splitlines()
    assert lines[:2] == ["| model | ratio | params | batch | prefill tok/s | decode tok/s (median [min-max]) | "
                         "decode ms/token | weight MiB | KV MiB | peak MiB | decode speed-up | weight ratio |",
                         "|" + "---|" * 12]
    expected = []
    for r in results["runs"]:
        d = r["decode"]
        expected.append(f"| {r['model']} | {100 * r['ratio']:.1f}% | {r['parameters'] / 1e6:.2f}M | "
                        f"{r['protocol']['batch_size']} | {r['prefill']['tokens_per_s']:.1f} | "
                        f"{d['tokens_per_s']:.1f} [{d['tokens_per_s_min']:.1f}-{d['tokens_per_s_max']:.1f}] | "
                        f"{d['ms_per_token']:.2f} | {r['weight_bytes'] / 2**20:.1f} | {r['kv_cache_bytes'] / 2**20:.2f} | "
                        f"{r['model_peak_bytes'] / 2**20:.1f} | {r['vs_reference']['decode_speedup']:.2f}x | "
                        f"{r['vs_reference']['weight_ratio']:.2f} |")
    assert lines[2:] == expected
    unknown = {"runs": [{**results["runs"][0], "ratio": None}]}
    assert format_table(unknown).splitlines()[2].startswith("| dense | ? | ")


def test_plot_draws_decode_speed_and_memory_against_the_ratio(results, tmp_path, saved_figures):
    plot(results, tmp_path / "speed.png")
    (figure, path), = saved_figures
    speed, memory = figure.axes
    for batch_size, line in zip((1, 2), speed.get_lines()):
        runs = sorted((r for r in results["runs"] if r["protocol"]["batch_size"] == batch_size), key=lambda r: r["ratio"])
        assert line.get_label() == f"batch {batch_size}"
        assert list(line.get_xdata()) == [100 * r["ratio"] for r in runs]
        assert list(line.get_ydata()) == [r["decode"]["tokens_per_s"] for r in runs]
        peak = memory.get_lines()[batch_size - 1]
        assert list(peak.get_ydata()) == [r["model_peak_bytes"] / MiB for r in runs]
    weights = memory.get_lines()[-1]
    points = sorted({(100 * r["ratio"], r["weight_bytes"] / MiB) for r in results["runs"]})
    assert weights.get_label() == "weights" and list(zip(weights.get_xdata(), weights.get_ydata())) == points
    assert path == tmp_path / "speed.png"
    with Image.open(path) as png:  # 10 x 4 inches at 120 dpi
        assert png.size == (1200, 480)


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
