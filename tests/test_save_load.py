"""Saved folders reload, in a fresh process, into the same model; writes are atomic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokens
from numprune.api import prune
from numprune.errors import NumpruneError
from numprune.save import REPORT_NAME, save_pruned

RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
probe = load_file(sys.argv[1])["probe"]
logits = {}
for i, folder in enumerate(sys.argv[3:]):
    if folder == "--import-numprune":
        import numprune
        continue
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits[str(len(logits))] = model(probe).logits.contiguous()
    print(type(model).__name__, "numprune" in sys.modules)
save_file(logits, sys.argv[2])
"""


def reload_all(plain: list[Path], with_numprune: list[Path], probe: torch.Tensor, tmp_path: Path):
    """Load ``plain`` folders, then ``import numprune`` and load ``with_numprune``, in one fresh process
    with AutoModelForCausalLM: [(logits, (class name, whether numprune was imported))], in that order."""
    from safetensors.torch import save_file

    save_file({"probe": probe}, tmp_path / "probe.safetensors")
    folders = [*map(str, plain), "--import-numprune", *map(str, with_numprune)]
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "probe.safetensors"),
                           str(tmp_path / "logits.safetensors"), *folders], capture_output=True, text=True, check=True)
    logits = load_file(tmp_path / "logits.safetensors")
    return [(logits[str(i)], tuple(line.split())) for i, line in enumerate(done.stdout.splitlines())]


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
