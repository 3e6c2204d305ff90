"""Streamed block-local healing (numprune.stream.heal_streaming, prune_streaming with heal, ``--stream``) gives
bitwise the weights of healing in memory, with one decoder layer of each model holding tensors at a time; its
report records the healing as the in-memory path does; it is deterministic for a seed, frees each layer's copies at once;
distillation is refused."""

import gc
import json

import pytest
import torch
from conftest import reload_all, saved_tensors, tiny_llama, tiny_tokens
from hostile import hashes, refused

from numprune import NumpruneError, heal, heal_streaming, prune, prune_streaming, save_pruned
from numprune.cli import main
from numprune.models import load_model
from numprune.stream import UNHEALED, Checkpoint, StreamedModel


@pytest.fixture
def calibration(tmp_path) -> list[str]:
    """Calibration flags on a small text file of seeded random words (tokenizing the built-in corpus takes longer
    than the run)."""
    words = "state union nation people congress year world peace war law work tax".split()
    order = torch.randint(0, len(words), (600,), generator=torch.Generator().manual_seed(0)).tolist()
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(words[i] for i in order) + "\n")
    return ["--calib", str(text), "--nsamples", "4", "--seqlen", "16", "--quiet"]


def loaded_layers(models) -> int:
    """Decoder layers holding tensors, over every streamed model in ``models``."""
    return sum(any(not p.is_meta for p in layer.parameters()) for m in models for layer in m.adapter.layers())


@pytest.fixture
def watched(monkeypatch):
    """Records, for the streamed models of a run: the decoder layers already holding tensors whenever a layer is
    read, the layers each checkpoint read touches, and the layers holding tensors whenever a healed layer is
    written."""
    seen = {"models": [], "at_load": [], "reads": [], "at_write": []}
    load, read, healed = StreamedModel._load, Checkpoint.read, StreamedModel.healed

    def watched_load(self, module, prefix, names):
        if self not in seen["models"]:
            seen["models"].append(self)
        if prefix.startswith(self.layers_prefix):
            seen["at_load"].append(loaded_layers(seen["models"]))
        return load(self, module, prefix, names)

    def watched_read(self, names):
        seen["reads"].append({n.split(".")[2] for n in names if n.startswith("model.layers.")})
        return read(self, names)

    def watched_healed(self, i, layer, state):
        seen["at_write"].append(loaded_layers(seen["models"]))
        return healed(self, i, layer, state)

    monkeypatch.setattr(StreamedModel, "_load", watched_load)
    monkeypatch.setattr(Checkpoint, "read", watched_read)
    monkeypatch.setattr(StreamedModel, "healed", watched_healed)
    return seen


def pruned_and_saved(tmp_path, shape="gqa", sharded=True, dtype=torch.float32, **prune_options):
    """A tiny dense model saved (sharded or not), pruned in memory and saved: (dense, pruned, report, tokens)."""
    dense = tiny_llama(shape, layers=3).to(dtype)
    tokens = tiny_tokens(6, 16)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="20KB" if sharded else "1GB")
    pruned, report = prune(dense, tokens, ratio=0.3, progress=False, **{"heal": False, **prune_options})
    save_pruned(pruned, None, report, tmp_path / "pruned")
    return dense, pruned, report, tokens


def assert_same_tensors(expected_folder, got_folder):
    expected, got = saved_tensors(expected_folder), saved_tensors(got_folder)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def without_seconds(layers: list[dict]) -> list[dict]:
    return [{k: v for k, v in layer.items() if k != "seconds"} for layer in layers]


@pytest.mark.parametrize("shape,sharded,prune_options,heal_options", [
    ("gqa", True, {}, dict(lr=1e-3, epochs=2, batch=2)),  # relative loss, all weights
    ("mha", False, dict(method="flap"), dict(lr=1e-3, loss="mse", params="norms")),  # compensation biases
    ("gqa", True, dict(dtype=torch.bfloat16), dict(lr=1e-3)),  # fitted in float32, written in bfloat16
    ("gqa", True, {}, dict(lr=10.0)),  # every fit worse: no layer keeps it, each is written as it was
], ids=["relative", "mse norms, biases", "bfloat16", "nothing kept"])
def test_streamed_healing_equals_in_memory_one_layer_at_a_time(shape, sharded, prune_options, heal_options, tmp_path,
                                                               watched):
    _, _, report, tokens = pruned_and_saved(tmp_path, shape, sharded, **prune_options)
    dtype = prune_options.get("dtype", torch.float32)  # both loaded as saved, as `numprune heal` loads them
    dense, pruned = (load_model(str(tmp_path / folder), dtype)[0] for folder in ("dense", "pruned"))
    healed, record = heal(dense, pruned, tokens, progress=False, **heal_options)
    save_pruned(healed, None, report, tmp_path / "memory")
    inputs = hashes(tmp_path / "dense", tmp_path / "pruned")
    written = heal_streaming(tmp_path / "dense", tmp_path / "pruned", tokens, out=tmp_path / "streamed",
                             progress=False, calibration_info={"source": "test"}, **heal_options)

    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("memory", "streamed")]
    assert config[0] == config[1]
    assert [layer.kept for layer in record.layers] == [heal_options["lr"] < 1] * 3
    # one layer of one model read at a time: none other held when one is read; the healed one alone when written
    assert len(watched["models"]) == 2 and watched["at_load"] and max(watched["at_load"]) == 0
    assert watched["at_write"] == [1, 1, 1] and max(len(layers) for layers in watched["reads"]) == 1
    saved = json.loads((tmp_path / "streamed" / "pruning_report.json").read_text())
    assert saved == written and saved["layers"] == report["layers"] and saved["options"]["heal"]
    assert {k: saved["options"][f"heal_{k}"] for k in heal_options} == heal_options
    healing = record.to_json()
    assert without_seconds(saved["healing"]["layers"]) == without_seconds(healing["layers"])
    assert saved["healing"]["options"] == healing["options"] and saved["healing"]["tokens"] == tokens.numel()
    assert saved["healing"]["calibration"] == {"source": "test"}
    assert hashes(tmp_path / "dense", tmp_path / "pruned") == inputs  # the inputs are left as they were


def test_prune_stream_heal_equals_prune_heal(tiny_model_folder, tmp_path, watched, calibration):
    flags = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", *calibration, "--heal", "--heal-epochs", "2",
             "--heal-lr", "0.001"]
    assert main([*flags, "--out", str(tmp_path / "memory")]) == 0
    assert main([*flags, "--stream", "--out", str(tmp_path / "streamed")]) == 0

    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    assert not (tmp_path / "streamed" / UNHEALED).exists()
    assert watched["at_write"] == [1, 1] and max(watched["at_load"]) == 0
    reports = [json.loads((tmp_path / f / "pruning_report.json").read_text()) for f in ("memory", "streamed")]
    assert reports[0]["options"] == reports[1]["options"] and reports[0]["layers"] == reports[1]["layers"]
    assert without_seconds(reports[0]["healing"]["layers"]) == without_seconds(reports[1]["healing"]["layers"])
    assert reports[1]["healing"]["options"] == reports[0]["healing"]["options"]
    assert reports[1]["time_s"]["healing"] > 0 and reports[1]["compute"]["streaming"] is True
    assert reports[1]["time_s"]["total"] >= reports[1]["time_s"]["healing"]
    probe = tiny_tokens(2, 12, seed=7)
    [(memory, _), (streamed, _)] = reload_all([], [tmp_path / "memory", tmp_path / "streamed"], probe, tmp_path)
    assert torch.equal(memory, streamed)


def test_heal_command_streams(tiny_model_folder, tmp_path, calibration):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--out", str(pruned), "--no-heal",
                 *calibration]) == 0
    flags = ["heal", "--model", str(tiny_model_folder), "--pruned", str(pruned), "--heal-lr", "0.001", *calibration]
    assert main([*flags, "--out", str(tmp_path / "memory")]) == 0
    assert main([*flags, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    reports = [json.loads((tmp_path / f / "pruning_report.json").read_text()) for f in ("memory", "streamed")]
    assert reports[0]["options"] == reports[1]["options"] and reports[1]["options"]["heal_lr"] == 0.001
    for report in reports:
        report["healing"]["layers"] = without_seconds(report["healing"]["layers"])
        del report["healing"]["seconds"]
    assert reports[0]["healing"] == reports[1]["healing"]  # calibration record and dense model too


def test_streamed_healing_same_seed_same_weights(tmp_path):
    _, _, _, tokens = pruned_and_saved(tmp_path)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        heal_streaming(tmp_path / "dense", tmp_path / "pruned", tokens, out=tmp_path / name, progress=False, lr=1e-3,
                       seed=seed)
    runs = [saved_tensors(tmp_path / name) for name in "abc"]
    same = [all(torch.equal(runs[0][n], other[n]) for n in runs[0]) for other in runs[1:]]
    assert same == [True, False]  # the seed orders the windows; another order is another fit


def test_streamed_healing_refuses_distillation_and_bad_input(tiny_model_folder, tmp_path, calibration):
    _, _, _, tokens = pruned_and_saved(tmp_path)
    dense, pruned, other = tmp_path / "dense", tmp_path / "pruned", tmp_path / "other"
    tiny_llama("gqa", layers=3, seed=1).save_pretrained(other)
    out = tmp_path / "out"
    message = "trains the whole pruned model at once; a streamed run holds one layer at a time"
    cases = [(lambda: heal_streaming(dense, pruned, tokens, out=out, mode="distill"), message),
             (lambda: prune_streaming(dense, tokens, ratio=0.3, heal=True, heal_mode="local+distill", out=out),
              message),
             (lambda: heal_streaming(dense, dense, tokens, out=out), "has no pruning_report.json"),
             (lambda: heal_streaming(pruned, pruned, tokens, out=out), "the same model"),
             (lambda: heal_streaming(other, pruned, tokens, out=out), "embeddings .* differ"),
             (lambda: heal_streaming(dense, pruned, None, out=out), "healing needs calibration tokens"),
             (lambda: heal_streaming(dense, pruned, tokens, out=pruned, overwrite=True), "would replace")]
    before = hashes(dense, pruned, other)
    for call, expected in cases:
        with pytest.raises(NumpruneError, match=expected):
            call()
        assert not out.exists()
    assert hashes(dense, pruned, other) == before
    refused("prune --stream distill", message, "prune", "--model", tiny_model_folder, "--ratio", "0.3", "--stream",
            "--heal", "--heal-mode", "distill", "--out", out, *calibration, inputs=[tiny_model_folder])
    refused("heal --stream distill", message, "heal", "--model", dense, "--pruned", pruned, "--stream",
            "--heal-mode", "local+distill", "--out", out, *calibration, inputs=[dense, pruned])
    assert not out.exists()


def test_healing_frees_each_layers_copies_at_once():
    """No reference cycle keeps a layer's float32 copy (and its gradients) alive after its fit, to be freed only by
    a later garbage collection: streamed, memory would then grow with every layer healed."""
    dense = tiny_llama("gqa")
    tokens = tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    gc.collect()
    gc.disable()
    try:
        heal(dense, pruned, tokens, progress=False, loss="relative")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, torch.nn.Module) or torch.is_tensor(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
