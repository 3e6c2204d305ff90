"""Never run foreign code: no model folder's Python (auto_map), no pickle, no prompt asking whether to."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
from hostile import numprune, refused

# A module that leaves a mark wherever it is imported, and a pickle that leaves one when loaded.
PLANTED_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tiny_model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(PLANTED_CODE.format(marker=str(marker)))
    return folder, marker


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_folder_with_its_own_code_is_refused_without_a_prompt(planted, file):
    folder, marker = planted
    config = json.loads((folder / file).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                          "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / file).write_text(json.dumps(config))
    refused(f"info: auto_map in {file} (stdin answers y)", "never runs a model folder's code", "info", "--model",
            folder, input="y\n", inputs=[folder])  # a fresh process whose stdin would say yes to a prompt
    refused(f"prune --stream: auto_map in {file}", "never runs a model folder's code", "prune", "--model", folder,
            "--ratio", "0.3", "--stream", "--out", folder.parent / "out", inputs=[folder])
    assert not marker.exists() and not (folder.parent / "out").exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_with_a_way_to_convert_them(planted, name):
    folder, marker = planted
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(pickle.dumps(_Planted(str(marker))))
    for command in (["info", "--model", folder],
                    ["prune", "--model", folder, "--ratio", "0.3", "--stream", "--out", folder.parent / "out"]):
        done = refused(f"{command[0]}{' --stream' if '--stream' in command else ''}: only {name}",
                       "safetensors only", *command, inputs=[folder])
        assert "weights_only=True" in done.stderr and "save_file" in done.stderr
    assert not marker.exists()


def test_python_m_numprune_in_a_folder_with_code_runs_none_of_it(tmp_path):
    """`python -m numprune` puts the current folder first on the import path: a folder holding a module that
    numprune imports (safetensors.py) must not have it run."""
    (tmp_path / "safetensors.py").write_text("open(__file__ + '.ran', 'w').close()\nraise SystemExit(7)\n")
    done = numprune("--version", cwd=tmp_path)
    assert done.returncode == 0 and not (tmp_path / "safetensors.py.ran").exists(), done.stderr
    assert done.stdout.startswith("numprune ")


def test_a_side_file_linking_outside_the_model_folder_is_not_copied_into_a_streamed_output(tiny_model_folder,
                                                                                          tmp_path):
    """prune --stream copies side files (generation_config.json, merges.txt, ...) as they are: a link to a file
    outside the folder would pull any readable file into an output the user may publish."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish\n")
    (folder / "generation_config.json").unlink(missing_ok=True)
    (folder / "generation_config.json").symlink_to(secret)
    refused("prune --stream: generation_config.json links outside", "outside the model folder", "prune", "--model",
            folder, "--ratio", "0.3", "--stream", "--calib", "sotu", "--nsamples", "2", "--seqlen", "16", "--out",
            tmp_path / "out", inputs=[folder, secret])
    assert not (tmp_path / "out").exists()
