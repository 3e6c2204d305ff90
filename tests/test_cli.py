"""The command line: a full prune on a tiny model, and every bad input as one line with exit status 2."""

import csv
import json
import re

import pytest
from hostile import numprune
from safetensors.torch import load_file

from numprune.cli import main
from numprune.errors import NumpruneError


def test_prune_writes_a_loadable_folder_with_a_report(tiny_model_folder, tmp_path):
    out = tmp_path / "pruned"
    done = numprune("prune", "--model", tiny_model_folder, "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
                    "--out", out, "--eval", "moby-dick", "--eval-seqlen", "32", "--eval-windows", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert re.search(r"removed \d+\.\d%, target 30%", done.stdout)
    assert "perplexity on moby-dick" in done.stdout and str(out) in done.stdout
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["tokens"] == 4 * 32
    assert report["calibration"]["nsamples"] == 4
    assert set(report["time_s"]) >= {"calibration", "scoring", "compensation", "surgery", "total"}
    assert report["perplexity"]["moby-dick"]["protocol"]["windows"] == 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    info = numprune("info", "--model", out)
    assert info.returncode == 0, info.stderr
    # info's counts against the saved tensors' shapes (the tied LM head is saved once, as the embedding)
    tensors = load_file(out / "model.safetensors")
    head_dim = json.loads((out / "config.json").read_text())["head_dim"]
    prunable = sum(t.numel() for n, t in tensors.items() if ".self_attn." in n or ".mlp." in n)
    assert prunable == report["parameters"]["attention_mlp_after"]
    lines = info.stdout.splitlines()
    assert f"{sum(t.numel() for t in tensors.values()):,} parameters, {prunable:,} in attention+MLP" in lines[1]
    header = lines.index("layer  heads  kv_heads  head_dim  mlp_channels")
    rows = [tuple(map(int, line.split())) for line in lines[header + 1:]]
    assert rows == [(i, tensors[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] // head_dim,
                     tensors[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] // head_dim, head_dim,
                     tensors[f"model.layers.{i}.mlp.up_proj.weight"].shape[0]) for i in range(2)]
    assert [(r[1], r[2], r[4]) for r in rows] == [(x["heads"], x["kv_heads"], x["channels"]) for x in report["layers"]]
    ppl = numprune("ppl", "--model", out, "--data", "moby-dick", "--seqlen", "32", "--max-windows", "2", "--quiet")
    assert ppl.returncode == 0, ppl.stderr
    assert f"{report['perplexity']['moby-dick']['pruned']:.3f}" in ppl.stdout


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "1.2"], "--ratio: must be between 0 and 1"),
    (["--ratio", "0"], "--ratio: must be between 0 and 1"),
    (["--ratio", "0.99"], "would leave"),
    (["--ratio", "0.3", "--calib", "missing.txt"], "missing.txt"),
    (["--ratio", "0.3", "--calib", "TOO_SHORT"], "tokens"),
    (["--ratio", "0.3", "--method", "nope"], "--method: invalid choice: 'nope'"),
    (["--ratio", "0.3", "--eval", "nosuchcorpus"], "nosuchcorpus"),
    (["--ratio", "0.3", "--nsamples", "0"], "--nsamples: must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_folder, tmp_path, capsys, extra, message):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    extra = [str(short) if e == "TOO_SHORT" else e for e in extra]
    out = tmp_path / "out"
    status = main(["prune", "--model", str(tiny_model_folder), "--nsamples", "2", "--seqlen", "32", "--out", str(out),
                   "--quiet", *extra])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numprune: error:") and message in lines[0], lines
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] in ([], ["short.txt"])


def test_existing_output_and_unsupported_models_are_refused(tiny_model_folder, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    done = numprune("prune", "--model", tiny_model_folder, "--ratio", "0.3", "--out", out)
    assert done.returncode == 2 and "already exists" in done.stderr
    assert list(out.iterdir()) == []

    from transformers import BloomConfig, BloomForCausalLM

    bloom = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(bloom)
    done = numprune("prune", "--model", bloom, "--ratio", "0.3", "--out", tmp_path / "o")
    assert done.returncode == 2 and "model type 'bloom' is not supported" in done.stderr
    assert not (tmp_path / "o").exists()

    done = numprune("info", "--model", tmp_path / "nowhere")
    assert done.returncode == 2 and "no model folder" in done.stderr


def test_invalid_gqa_layout_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=6))
    model.model.layers[0].self_attn.k_proj = __import__("torch").nn.Linear(24, 18, bias=False)  # 3 KV heads for 4
    from numprune.adapters import adapter_for

    with pytest.raises(NumpruneError, match="grouped-query layout"):
        adapter_for(model)


@pytest.mark.parametrize("point", ["numprune.calibrate LayerStream.run",  # calibrating the first layer
                                   "transformers.modeling_utils PreTrainedModel.save_pretrained"])  # writing
def test_interrupted_run_leaves_no_output(point, tiny_model_folder, tmp_path):
    """SIGTERM in the middle of a run (the process sends it itself at ``point``: no race with the run) unwinds:
    no output folder, no temporary folder."""
    out = tmp_path / "out"
    done = numprune("prune", "--model", tiny_model_folder, "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
                    "--out", out, signal_at=f"SIGTERM {point}")
    assert done.returncode == 143 and "Traceback" not in done.stderr, (done.returncode, done.stderr)
    assert list(tmp_path.iterdir()) == []


def test_compare_writes_tables_and_a_plot_and_repeats_exactly(tiny_model_folder, tmp_path, capsys, saved_figures):
    args = ["compare", "--model", str(tiny_model_folder), "--methods", "numerical,flap,numerical:compensation=none",
            "--ratios", "0.2,0.4", "--nsamples", "4", "--seqlen", "32", "--data", "moby-dick,sotu",
            "--eval-seqlen", "32", "--eval-windows", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["ppl"] for r in a["rows"]] == [r["ppl"] for r in b["rows"]]
    assert [r["method"] for r in a["rows"]] == ["dense"] + ["numerical"] * 2 + ["flap"] * 2 + [
        "numerical:compensation=none"] * 2
    assert a["rows"][-1]["options"]["compensation"] == "none"
    assert a["calibration"]["tokens"] == 4 * 32 and a["evaluation"]["sotu"]["windows"] == 2
    # results.csv and results.md hold exactly the rows of results.json
    with open(tmp_path / "a" / "results.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["method", "ratio", "achieved_ratio", "params", "ppl_moby-dick", "ppl_sotu", "error"]
    assert table[1:] == [[r["method"], str(r["ratio"]), str(r["achieved_ratio"]), str(r["params"]),
                          str(r["ppl"]["moby-dick"]), str(r["ppl"]["sotu"]), ""] for r in a["rows"]]
    assert (tmp_path / "a" / "results.md").read_text() == "\n".join(
        ["| method | ratio | achieved | moby-dick | sotu |", "|---|---|---|---|---|",
         *(f"| {r['method']} | {round(100 * r['ratio'])}% | {100 * r['achieved_ratio']:.1f}% | "
           f"{r['ppl']['moby-dick']:.2f} | {r['ppl']['sotu']:.2f} |" for r in a["rows"])]) + "\n"
    # perplexity.png: a log-scale panel per evaluation set, each method's perplexity against its achieved ratio
    figure = saved_figures[0][0]
    assert [ax.get_title() for ax in figure.axes] == ["moby-dick", "sotu"]
    for ax, spec in zip(figure.axes, ("moby-dick", "sotu")):
        assert ax.get_yscale() == "log"
        lines = {line.get_label(): line for line in ax.get_lines()}
        for method in ("numerical", "flap", "numerical:compensation=none"):
            rows = [r for r in a["rows"] if r["method"] == method]
            assert lines[method].get_xydata().tolist() == [[r["achieved_ratio"], r["ppl"][spec]] for r in rows]
        assert set(lines["dense"].get_ydata()) == {a["rows"][0]["ppl"][spec]}


def test_compare_rejects_bad_method_options(tiny_model_folder, tmp_path, capsys):
    status = main(["compare", "--model", str(tiny_model_folder), "--methods", "numerical:colour=red", "--out",
                   str(tmp_path / "x")])
    assert status == 2 and "bad method option" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_self_and_mixture_calibration_are_recorded(tiny_model_folder, tmp_path, one_thread):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--calib", "self+moby-dick:3",
                 "--nsamples", "4", "--seqlen", "16", "--calib-top-p", "0.9", "--eval", "self", "--eval-seqlen", "16",
                 "--eval-windows", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["source"] == "self+moby-dick:3" and calibration["tokens"] == 4 * 16
    own, text = calibration["mixture"]
    assert (own["source"], own["nsamples"], own["share"], own["seed"]) == ("self", 1, 0.25, 0)
    assert (own["temperature"], own["top_p"]) == (1.0, 0.9) and own["sampling_s"] >= 0
    assert (text["source"], text["nsamples"], text["weight"]) == ("moby-dick", 3, 3.0)
    assert report["perplexity"]["self"]["protocol"]["seed"] == 1

    streamed = tmp_path / "streamed"
    assert main(["prune", "--stream", "--model", str(tiny_model_folder), "--ratio", "0.3", "--calib", "self",
                 "--nsamples", "2", "--seqlen", "16", "--out", str(streamed), "--quiet"]) == 0
    assert json.loads((streamed / "pruning_report.json").read_text())["calibration"]["source"] == "self"

    compared = tmp_path / "compared"
    assert main(["compare", "--model", str(tiny_model_folder), "--methods", "numerical", "--ratios", "0.2", "--calib",
                 "self", "--nsamples", "2", "--seqlen", "16", "--data", "self", "--eval-seqlen", "16",
                 "--eval-windows", "1", "--out", str(compared), "--quiet"]) == 0
    results = json.loads((compared / "results.json").read_text())
    assert results["calibration"]["seed"] == 0 and results["evaluation"]["self"]["seed"] == 1


@pytest.mark.parametrize("command,extra,message", [
    ("prune", ["--calib", "sotu+nosuch"], "unknown text source 'nosuch'"),
    ("prune", ["--calib", "sotu:0+emails"], "bad weight '0' for 'sotu'"),
    ("prune", ["--calib", "sotu+sotu"], "names a source twice"),
    ("prune", ["--calib", "self", "--eval", "self", "--eval-seed", "0"], "--eval-seed 0 is the calibration seed"),
    ("prune", ["--eval", "sotu+emails"], "a mixture is for calibration"),
    ("prune", ["--stream", "--calib", "emails:x+sotu"], "bad weight 'x'"),
    ("prune", ["--calib-top-p", "0"], "--calib-top-p: must be in (0, 1]"),
    ("compare", ["--calib", "self+nosuch"], "unknown text source 'nosuch'"),
    ("ppl", ["--data", "self"], "--data self is text a dense model samples"),
])
def test_bad_calibration_specs_are_one_line(tiny_model_folder, tmp_path, capsys, command, extra, message):
    out = tmp_path / "out"
    status = main([command, "--model", str(tiny_model_folder), *(["--ratio", "0.3"] if command == "prune" else []),
                   *(["--out", str(out)] if command != "ppl" else []), "--quiet", *extra])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numprune: error:") and message in lines[0], lines
    assert not out.exists()
