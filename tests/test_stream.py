"""Streaming from disk gives exactly the in-memory result; compute precision; report fields; bad input."""

import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FakeClock, saved_tensors, tiny_llama, tiny_tokens
from safetensors.torch import load_file, save_file

from numprune import NumpruneError, prune, prune_streaming, save_pruned
from numprune.adapters import adapter_for
from numprune.calibrate import collect_statistics
from numprune.cli import main
from numprune.stream import Checkpoint, StreamedModel


def save_input(model, folder: Path, sharded: bool) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
    assert (folder / "model.safetensors.index.json").exists() == sharded
    return folder


# pruning alone (healing streamed against in memory: tests/test_heal_stream.py, tests/test_heal_default.py)
@pytest.mark.parametrize("shape,sharded,options", [
    ("gqa", True, dict(allocation="global", heal=False)),
    ("gqa9", False, dict(allocation="global", gqa_unit="kv-group", heal=False)),
    ("mha", True, dict(method="flap")),  # bias compensation: new o_proj/down_proj biases, zero q/k/v biases
    ("gqa", False, dict(compensation_stats="sequential", allocation="uniform", heal=False)),
])
def test_streaming_equals_in_memory(shape, sharded, options, tmp_path):
    model = tiny_llama(shape, layers=3)
    tokens = tiny_tokens(6, 16)
    folder = save_input(model, tmp_path / "dense", sharded)
    dense = saved_tensors(folder)
    pruned, report = prune(model, tokens, ratio=0.3, batch_size=4, progress=False, **options)
    save_pruned(pruned, None, report, tmp_path / "memory")
    streamed = prune_streaming(folder, tokens, ratio=0.3, out=tmp_path / "streamed", batch_size=4, progress=False,
                               **options)

    assert streamed["layers"] == report["layers"] and streamed["parameters"] == report["parameters"]
    assert streamed["config_class"] == report["config_class"]
    expected, got = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("memory", "streamed")]
    assert config[0] == config[1]
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert json.loads((tmp_path / "streamed" / "pruning_report.json").read_text())["layers"] == report["layers"]
    assert all(torch.equal(t, dense[n]) for n, t in saved_tensors(folder).items())  # the input is left as it was


def test_streamed_folder_loads_in_a_fresh_process(tmp_path):
    model = tiny_llama("gqa", layers=3)
    tokens = tiny_tokens(6, 16)
    folder = save_input(model, tmp_path / "dense", sharded=True)
    # streamed, the default method heals block-local, as it does in memory when asked to
    pruned, _ = prune(model, tokens, ratio=0.4, batch_size=4, heal_mode="local", progress=False)
    prune_streaming(folder, tokens, ratio=0.4, out=tmp_path / "out", batch_size=4, progress=False)
    probe = tiny_tokens(2, 10, seed=3)
    save_file({"probe": probe}, tmp_path / "probe.safetensors")
    script = ("import sys, numprune, torch; from safetensors.torch import load_file, save_file; "
              "from transformers import AutoModelForCausalLM; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
              "p = load_file(sys.argv[2])['probe']; "
              "save_file({'logits': m(p).logits.detach().contiguous()}, sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", script, tmp_path / "out", tmp_path / "probe.safetensors",
                           tmp_path / "logits.safetensors"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], pruned(probe).logits,
                                   rtol=1e-5, atol=1e-5)


def high_water_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def assert_timed_by(clock: FakeClock, report: dict) -> None:
    """Every stage lasts a whole number of the clock's ticks, the stages fit in the total, and the
    calibration rate is the calibration tokens over the calibration stage's time."""
    laps = report["time_s"]
    assert clock.readings and all(v > 0 and (v / clock.steps[0]).is_integer() for v in laps.values()), laps
    assert sum(v for k, v in laps.items() if k != "total") <= laps["total"]
    calibration = report["calibration"]
    assert calibration["tokens_per_s"] == round(calibration["tokens"] / laps["calibration"], 1)


def test_report_states_compute_time_and_memory(tmp_path, monkeypatch):
    model = tiny_llama("gqa", layers=2)
    tokens = tiny_tokens(6, 16)
    clock = FakeClock(0.25)  # every reading a quarter second on: laps are exact multiples
    monkeypatch.setattr(time, "perf_counter", clock)
    rss_before = high_water_rss()
    _, report = prune(model, tokens, ratio=0.3, batch_size=4, progress=False, dtype=torch.bfloat16)
    assert report["compute"] == {"device": "cpu", "dtype": "bfloat16", "world_size": 1}
    assert set(report["time_s"]) >= {"calibration", "scoring", "compensation", "surgery", "total"}
    assert report["calibration"]["tokens"] == 96
    assert_timed_by(clock, report)
    # the process's high-water resident set size when the report was written
    assert rss_before <= report["peak_rss_bytes"] <= high_water_rss() and "peak_gpu_bytes" not in report
    streamed = prune_streaming(save_input(model, tmp_path / "dense", False), tokens, ratio=0.3, out=tmp_path / "out",
                               batch_size=4, progress=False)
    assert streamed["compute"]["dtype"] == "float32" and streamed["compute"]["streaming"] is True
    assert "loading" in streamed["time_s"] and streamed["model"] == str((tmp_path / "dense").resolve())
    assert_timed_by(clock, streamed)


def test_bfloat16_pass_keeps_float64_statistics_of_bfloat16_activations(tokens):
    model = tiny_llama("gqa", layers=2)
    adapter = adapter_for(model)
    full = collect_statistics(model, adapter, tokens, 4, progress=False)
    half = collect_statistics(model, adapter, tokens, 4, progress=False, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is left as it was
    # Independently: the whole model cast to bfloat16 (the rotary frequencies kept in float32, as the stream's
    # positions are computed before its cast), run on the same batches, its MLP output projections' inputs caught
    cast = copy.deepcopy(model).to(torch.bfloat16)
    cast.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    seen = {i: [] for i in range(2)}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0]))
             for i, layer in enumerate(cast.model.layers)]
    with torch.no_grad():
        for batch in tokens.split(4):
            cast(batch)
    for h in hooks:
        h.remove()
    for i in range(2):
        a, b = full[i].mlp, half[i].mlp
        x = [t.reshape(-1, t.shape[-1]).float() for t in seen[i]]
        assert b.gram.dtype == torch.float64 and b.count == a.count == sum(len(t) for t in x)
        torch.testing.assert_close(b.gram, sum((t.T @ t).double() for t in x), rtol=1e-6, atol=0)
        torch.testing.assert_close(b.total, sum(t.sum(0).double() for t in x), rtol=1e-6, atol=1e-9)
        assert (b.gram - a.gram).abs().max() > 1e-3 * a.gram.abs().max()  # bfloat16 rounding shows in float64


def test_bad_streaming_input_is_one_clear_error(tmp_path, capsys):
    model = tiny_llama("gqa", layers=2)
    tokens = tiny_tokens(6, 16)
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    with pytest.raises(NumpruneError, match="safetensors weights"):
        prune_streaming(tmp_path / "bin", tokens, ratio=0.3, out=tmp_path / "o1", progress=False)
    folder = save_input(model, tmp_path / "dense", False)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NumpruneError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        prune_streaming(folder, tokens, ratio=0.3, out=tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists()
    with pytest.raises(NumpruneError, match="scattered depth selection"):
        prune_streaming(save_input(model, tmp_path / "two", False), tokens, depth=1, depth_selection="scattered",
                        out=tmp_path / "o4", progress=False)
    assert not (tmp_path / "o4").exists()
    capsys.readouterr()

    for args, message in ((["--model", tmp_path / "nowhere", "--stream"], "is not one"),
                          (["--model", tmp_path / "bin", "--stream"], "safetensors weights"),
                          (["--model", folder, "--stream", "--eval", "sotu"], "--eval needs the whole model"),
                          (["--model", folder, "--device", "cuda:0"], "no CUDA device"),
                          (["--model", folder, "--device", "tpu"], "argument --device: must be")):
        assert main(["prune", "--ratio", "0.3", "--out", str(tmp_path / "o3"), *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("numprune: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("options", [dict(depth=2), dict(depth=2, ratio=0.3, allocation="uniform"),
                                     dict(depth=1, ratio=0.4, depth_selection="shortgpt", compensation_stats="sequential")],
                         ids=["depth alone", "depth and width", "shortgpt and sequential width"])
def test_streamed_depth_equals_in_memory_with_one_layer_loaded_at_a_time(options, tmp_path, monkeypatch):
    model = tiny_llama("gqa", layers=5)
    tokens = tiny_tokens(6, 16)
    folder = save_input(model, tmp_path / "dense", sharded=True)
    dense = saved_tensors(folder)
    pruned, report = prune(model, tokens, batch_size=4, progress=False, **options)
    save_pruned(pruned, None, report, tmp_path / "memory")
    loaded, read = [], []  # decoder layers already holding tensors whenever one is loaded; layers each read touches
    load, read_tensors = StreamedModel._load, Checkpoint.read
    monkeypatch.setattr(StreamedModel, "_load", lambda self, module, prefix, names: (
        loaded.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in self.adapter.layers())),
        load(self, module, prefix, names))[-1])
    monkeypatch.setattr(Checkpoint, "read", lambda self, names: (
        read.append({n.split(".")[2] for n in names if n.startswith("model.layers.")}), read_tensors(self, names))[-1])
    streamed = prune_streaming(folder, tokens, out=tmp_path / "streamed", batch_size=4, progress=False, **options)

    assert loaded and max(loaded) == 0 and max(len(layers) for layers in read) == 1
    for key in ("depth", "options", "method", "layers", "parameters", "config_class", "loads_without_numprune"):
        assert streamed[key] == report[key], key
    assert streamed["time_s"]["depth"] > 0 and streamed["compute"]["streaming"] is True
    expected, got = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("memory", "streamed")]
    assert config[0] == config[1] and config[1]["num_hidden_layers"] == 5 - options["depth"]
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir() if p.is_dir()) == []  # the shallow folder is gone
    assert all(torch.equal(t, dense[n]) for n, t in saved_tensors(folder).items())  # the input is left as it was


def test_prune_command_streams_depth(tiny_model_folder, tmp_path, capsys):
    flags = ["prune", "--model", str(tiny_model_folder), "--depth-ratio", "0.5", "--ratio", "0.3", "--nsamples", "2",
             "--seqlen", "16", "--quiet"]
    assert main([*flags, "--out", str(tmp_path / "memory")]) == 0
    assert main([*flags, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    assert "depth:  removed layers [1] of 2" in capsys.readouterr().out
    reports = [json.loads((tmp_path / f / "pruning_report.json").read_text()) for f in ("memory", "streamed")]
    assert reports[0]["depth"] == reports[1]["depth"] and reports[0]["options"] == reports[1]["options"]
    expected, got = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
