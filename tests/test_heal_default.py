"""Healing as part of the default method: numerical-robust distils where the training fits in memory, heals
block-local where it does not (and when streamed), and the other methods, image generators and depth runs only
heal when asked."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import reload_all, tiny_llama, tiny_tokens
from hostile import refused
from test_llamagen import random_sequences, tiny_llamagen

import numprune.api
from numprune import NumpruneError, heal, prune, prune_streaming
from numprune.adapters import adapter_for
from numprune.cli import main
from numprune.distill import memory_needed
from numprune.recipe import DISTILL_TOKENS, HealOptions


def distillation_need(model, keep: float = 1.0, resident: bool = False, **options) -> int:
    return memory_needed(adapter_for(model), HealOptions(**options), 16, keep=keep, resident=resident)


def test_the_default_budget_is_the_validated_one_at_most_one_pass():
    assert HealOptions().decided("distill", 65_536).tokens == DISTILL_TOKENS == 12_288
    assert HealOptions().decided("distill", 96).tokens == 96  # a few windows: each once, not 128 times
    assert HealOptions().decided("distill").tokens == DISTILL_TOKENS
    assert HealOptions(tokens=500).decided("distill", 96).tokens == 500  # a budget given is the budget
    assert HealOptions(epochs=2).decided("distill", 96).tokens is None


def test_the_default_method_distils_each_window_once():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    healed, report = prune(dense, tokens, ratio=0.3, progress=False)
    plain, plain_report = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    options = report["options"]
    assert options["method"] == "numerical-robust" and options["heal"] and options["heal_mode"] == "distill"
    assert options["heal_tokens"] == 96 and report["healing"]["distillation"]["tokens"] == 96
    assert "healing" not in plain_report and not plain_report["options"]["heal"]
    assert report["layers"] == plain_report["layers"]  # the same units removed; healing moves the kept weights
    probe = tiny_tokens(3, 20, seed=7)
    with torch.no_grad():
        assert not torch.allclose(healed(probe).logits, plain(probe).logits, atol=1e-4)
    again, _ = prune(dense, tokens, ratio=0.3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(healed.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("method", ["numerical", "flap", "wanda-sp"])
def test_the_paper_and_the_baselines_heal_only_when_asked(method):
    dense, tokens = tiny_llama("gqa"), tiny_tokens(4, 16)
    _, report = prune(dense, tokens, ratio=0.3, method=method, progress=False)
    assert "healing" not in report and report["options"]["heal"] is False
    _, asked = prune(dense, tokens, ratio=0.3, method=method, heal_mode="local", progress=False)
    assert asked["options"]["heal"] and asked["healing"]["mode"] == "local"


def test_without_the_memory_the_default_heals_block_local(monkeypatch):
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    need = distillation_need(dense, keep=0.7, resident=True)
    monkeypatch.setattr(numprune.api, "free_memory", lambda device: need // 2)
    _, report = prune(dense, tokens, ratio=0.3, progress=False)
    assert report["options"]["heal_mode"] == "local" and report["options"]["heal_tokens"] is None
    assert len(report["healing"]["layers"]) == 3 and report["healing"]["distillation"] is None
    monkeypatch.setattr(numprune.api, "free_memory", lambda device: need * 2)
    _, report = prune(dense, tokens, ratio=0.3, progress=False)
    assert report["options"]["heal_mode"] == "distill"


def test_distillation_asked_without_the_memory_is_refused_before_the_work(monkeypatch):
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)

    def no_work(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(numprune.api, "free_memory", lambda device: 1024)
    monkeypatch.setattr(numprune.api, "select", no_work)
    with pytest.raises(NumpruneError, match=r"distillation trains the whole pruned model, which needs about .* GiB, "
                                            r"and 0.0 GiB is free: heal with the local mode"):
        prune(dense, tokens, ratio=0.3, heal_mode="distill", progress=False)
    monkeypatch.setattr(importlib.import_module("numprune.heal"), "free_memory", lambda device: 1024)
    before = {name: p.clone() for name, p in pruned.state_dict().items()}
    with pytest.raises(NumpruneError, match="distillation trains the whole pruned model"):
        heal(dense, pruned, tokens, progress=False, mode="local+distill")
    assert all(torch.equal(before[name], p) for name, p in pruned.state_dict().items())
    _, record = heal(dense, pruned, tokens, progress=False)  # no mode: block-local in the memory there is
    assert record.options.mode == "local" and record.distillation is None


def test_the_memory_estimate_grows_with_what_distillation_holds():
    dense = tiny_llama("gqa")
    full = distillation_need(dense)
    assert distillation_need(dense, keep=0.5) < full  # fewer trained weights, fewer gradients and moments
    assert distillation_need(dense, resident=True) > full  # the pruned model itself, not built yet
    assert distillation_need(dense, lora_rank=4) < full  # LoRA's state is negligible
    assert distillation_need(dense, batch=4) > full  # four windows' logits and activations
    trained = sum(p.numel() for name, p in dense.named_parameters() if "embed" not in name and "lm_head" not in name)
    assert full - distillation_need(dense, lora_rank=4) == pytest.approx(12 * trained, rel=1e-6)


def test_streamed_the_default_heals_block_local_as_in_memory(tmp_path):
    dense, tokens = tiny_llama("gqa", layers=3), tiny_tokens(6, 16)
    dense.save_pretrained(tmp_path / "dense")
    report = prune_streaming(tmp_path / "dense", tokens, ratio=0.3, out=tmp_path / "streamed", progress=False)
    memory, memory_report = prune(dense, tokens, ratio=0.3, heal_mode="local", progress=False)
    assert report.options.heal_mode == "local" and report.healing["distillation"] is None
    assert memory_report.to_json()["options"] == report.to_json()["options"]
    probe = tiny_tokens(2, 12, seed=7)
    [(streamed, _)] = reload_all([], [tmp_path / "streamed"], probe, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(streamed, memory(probe).logits, rtol=1e-5, atol=1e-5)


def test_image_generators_and_depth_runs_heal_only_when_asked():
    generator = tiny_llamagen()
    tokens = random_sequences(generator, 6)
    _, report = prune(generator, tokens, ratio=0.3, progress=False)
    assert "healing" not in report and report["options"]["heal"] is False
    _, asked = prune(generator, tokens, ratio=0.3, heal=True, progress=False)  # the method's own, asked for: heals
    assert asked["options"]["heal"] and asked["healing"]["distillation"]["tokens"] > 0
    dense, text = tiny_llama("gqa", layers=4), tiny_tokens(6, 16)
    _, depth = prune(dense, text, ratio=0.2, depth=1, progress=False)
    assert "healing" not in depth and depth["options"]["heal"] is False


def test_no_heal_from_the_command_line(tiny_model_folder, tmp_path, capsys):
    flags = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32"]
    assert main([*flags, "--out", str(tmp_path / "healed")]) == 0
    assert "healing: distilled 128 tokens" in capsys.readouterr().out  # 4 x 32: one pass
    assert main([*flags, "--no-heal", "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    reports = [json.loads((tmp_path / f / "pruning_report.json").read_text()) for f in ("healed", "plain")]
    assert reports[0]["options"]["heal_mode"] == "distill" and "healing" not in reports[1]
    refused("distillation with --stream", "the healing mode distill distils", *flags, "--stream", "--heal-tokens",
            "64", "--out", tmp_path / "out", inputs=[tiny_model_folder])


def test_statistics_alone_prune_without_the_default_healing():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(4, 16)
    stats = numprune.calibrate(dense, tokens, progress=False)
    pruned, report = prune(dense, None, stats=stats, ratio=0.3, progress=False)
    plain, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    assert "healing" not in report and report["options"]["heal"] is False
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), plain.state_dict().values()))
    # healing asked for still needs the tokens, even where it is the method's own
    for asked in (dict(heal_tokens=64), dict(method="flap", heal=True), dict(heal=True)):
        with pytest.raises(NumpruneError, match="calibration tokens are needed for healing"):
            prune(dense, None, stats=stats, ratio=0.3, progress=False, **asked)
