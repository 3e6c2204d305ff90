"""Saved folders reload, in a fresh process, into the same model; writes are atomic."""

import json
from pathlib import Path

import pytest
import torch
from conftest import reload_all, tiny_llama, tiny_tokens

from numprune.api import prune
from numprune.errors import NumpruneError
from numprune.save import REPORT_NAME, save_pruned


def reload_logits(folder: Path, probe: torch.Tensor, tmp_path: Path, import_numprune: bool):
    return reload_all([] if import_numprune else [folder], [folder] if import_numprune else [], probe, tmp_path)[0]


@pytest.mark.parametrize("allocation,plain", [("uniform", True), ("global", False)])
def test_round_trip_in_a_fresh_process(allocation, plain, tmp_path, tokens):
    pruned, report = prune(tiny_llama("gqa"), tokens, ratio=0.35, allocation=allocation, progress=False)
    assert report["loads_without_numprune"] is plain
    out = save_pruned(pruned, None, report, tmp_path / "out")
    probe = tiny_tokens(2, 12, seed=5)
    logits, (cls, had_numprune) = reload_logits(out, probe, tmp_path, import_numprune=not plain)
    with torch.no_grad():
        torch.testing.assert_close(logits, pruned(probe).logits, rtol=1e-5, atol=1e-5)
    assert cls == ("LlamaForCausalLM" if plain else "NumpruneLlamaForCausalLM")
    assert had_numprune == str(not plain)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["layers"] == report["layers"]
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))


def test_existing_output_needs_overwrite(tmp_path, tokens):
    pruned, report = prune(tiny_llama("mha"), tokens, ratio=0.2, progress=False)
    out = save_pruned(pruned, None, report, tmp_path / "out")
    with pytest.raises(NumpruneError, match="already exists"):
        save_pruned(pruned, None, report, out)
    report = {**report, "marker": 1}  # any JSON object saves as given
    save_pruned(pruned, None, report, out, overwrite=True)
    assert json.loads((out / REPORT_NAME).read_text())["marker"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_failed_save_leaves_nothing(tmp_path, tokens):
    pruned, report = prune(tiny_llama("mha"), tokens, ratio=0.2, progress=False)
    report = {**report, "unserialisable": object()}
    with pytest.raises(TypeError):
        save_pruned(pruned, None, report, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
