"""Never lose a user's data: no output over, into or around an input; nothing replaced without asking;
one atomic step to put an output in place; nothing left behind when writing fails."""

from __future__ import annotations

import os
import resource
import signal
import threading

import pytest
import torch
from safetensors.torch import save_file

from hostile import numprune, refused
from numprune.errors import NumpruneError
from numprune.io import output

PRUNE = ("prune", "--ratio", "0.3", "--nsamples", "2", "--seqlen", "16", "--quiet")


def test_output_over_or_around_the_input_model_is_refused(tiny_model_folder, tmp_path):
    m = tiny_model_folder
    cases = [
        ("prune --out M --overwrite", "would replace", [*PRUNE, "--model", m, "--out", m, "--overwrite"]),
        ("prune --stream --out M --overwrite", "would replace",
         [*PRUNE, "--stream", "--model", m, "--out", m, "--overwrite"]),
        ("prune --out <parent of M> --overwrite", "would replace", [*PRUNE, "--model", m, "--out", m.parent, "--overwrite"]),
        ("prune --out M/inside", "lies inside", [*PRUNE, "--model", m, "--out", m / "inside"]),
        ("compare --out M --overwrite", "would replace",
         ["compare", "--model", m, "--ratios", "0.3", "--methods", "magnitude", "--out", m, "--overwrite"]),
        ("eval --out M/config.json", "lies inside", ["eval", "--model", m, "--out", m / "config.json", "--overwrite"]),
        ("bench --json M/model.safetensors", "lies inside", ["bench", "--model", m, "--json", m / "model.safetensors"]),
        ("generate --grid M/grid.png", "lies inside", ["generate", "--model", m, "--grid", m / "grid.png"]),
    ]
    for case, message, args in cases:
        refused(case, message, *args, inputs=[m.parent])
    assert sorted(p.name for p in m.parent.iterdir()) == ["tiny"]


def test_current_folder_and_data_files_are_inputs_too(tiny_model_folder, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("a user's file\n" * 50)
    refused("prune --out . --overwrite", "the current folder", *PRUNE, "--model", tiny_model_folder, "--out", ".",
            "--overwrite", cwd=work, inputs=[tmp_path])
    refused("prune --calib D/notes.txt --out D --overwrite", "would replace", *PRUNE, "--model", tiny_model_folder,
            "--calib", work / "notes.txt", "--out", work, "--overwrite", inputs=[tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_existing_outputs_are_kept_unless_overwriting_is_asked_for(tiny_model_folder, tmp_path):
    results = tmp_path / "results.json"
    results.write_text("{}\n")
    picture = tmp_path / "plot.png"
    picture.write_bytes(b"not really a png")
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    m = tiny_model_folder
    for case, message, args in [
        ("eval --out existing.json", "already exists", ["eval", "--model", m, "--out", results]),
        ("bench --json existing.json", "already exists", ["bench", "--model", m, "--json", results]),
        ("bench --plot existing.png", "already exists", ["bench", "--model", m, "--plot", picture]),
        ("bench --json DIR --overwrite", "is a folder", ["bench", "--model", m, "--json", project, "--overwrite"]),
        ("prune --out <file> --overwrite", "not a folder", [*PRUNE, "--model", m, "--out", results, "--overwrite"]),
        ("prune --out <foreign folder> --overwrite", "was not written by numprune",
         [*PRUNE, "--model", m, "--out", project, "--overwrite"]),
    ]:
        refused(case, message, *args, inputs=[tmp_path])


def test_paths_that_cannot_be_written_are_refused_before_the_work(tiny_model_folder, tmp_path):
    m = tiny_model_folder
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "elsewhere" / "target")
    refused("prune --out <dangling symlink>", "symbolic link to a missing target", *PRUNE, "--model", m,
            "--out", dangling, inputs=[tmp_path])
    assert not (tmp_path / "elsewhere").exists()
    refused("prune --out <300-byte name>", "too long", *PRUNE, "--model", m, "--out", tmp_path / ("x" * 300),
            inputs=[tmp_path])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused("bench --json <file>/sub/out.json", "is not a folder", "bench", "--model", m, "--json",
            blocker / "sub" / "out.json", inputs=[tmp_path])
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        refused("prune --out <read-only folder>/out", "cannot write into", *PRUNE, "--model", m,
                "--out", locked / "out", inputs=[tmp_path])


def test_a_full_disk_leaves_nothing_behind(tiny_model_folder, tmp_path):
    """Writes past 256 kB fail as on a full disk: one line, no temporary folder, no parent folders created."""
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as ENOSPC would be
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    refused("prune --out new/parents/out on a full disk", "could not write", *PRUNE, "--model", tiny_model_folder,
            "--out", tmp_path / "new" / "parents" / "out", preexec_fn=small_disk, inputs=[tiny_model_folder])
    assert list(tmp_path.iterdir()) == []


# The writer itself, in process: the atomic steps the command line relies on.

def test_a_target_that_appears_meanwhile_is_kept_and_this_output_dropped(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(NumpruneError, match="appeared while this run was writing"):
        with output.output_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("another run's")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_writers_of_one_target_one_fails_cleanly(tmp_path):
    target, errors, barrier = tmp_path / "out", [], threading.Barrier(2)

    def write(name):
        try:
            with output.output_file(target) as tmp:
                tmp.write_text(name)
                barrier.wait()
        except NumpruneError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=write, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "appeared" in errors[0]
    assert target.read_text() in "ab" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_is_one_step_and_an_interrupt_keeps_the_old_output(tmp_path):
    target = tmp_path / "out"
    with output.output_folder(target, marker="report.json") as tmp:
        (tmp / "report.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with output.output_folder(target, overwrite=True, marker="report.json") as tmp:
            (tmp / "report.json").write_text("half")
            raise KeyboardInterrupt
    assert (target / "report.json").read_text() == "old"
    with output.output_folder(target, overwrite=True, marker="report.json") as tmp:
        (tmp / "report.json").write_text("new")
    assert (target / "report.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and output.committed[-1] == target


def test_without_renameat2_the_fallback_still_refuses_and_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_RENAMEAT2", None)
    target = tmp_path / "out.json"
    output.write_text(target, "one")
    with pytest.raises(NumpruneError, match="already exists"):
        output.write_text(target, "two")
    output.write_text(target, "three", overwrite=True)
    assert target.read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_output_folders_and_files_get_normal_permissions(tmp_path):
    """Also the files of writers that create theirs owner-only (safetensors' save_file: 0o600)."""
    umask = os.umask(0o022)
    try:
        with output.output_folder(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, tmp / "sub" / "model.safetensors")
            assert (tmp / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o600  # the writer's own
        with output.output_file(tmp_path / "one.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    for path in (out / "x", out / "sub" / "model.safetensors", tmp_path / "one.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_ctrl_c_while_starting_is_one_line_and_status_130(tiny_model_folder):
    """SIGINT while torch is being imported (the process sends it itself as the import starts, so it always lands
    there): no traceback, nothing written."""
    done = numprune("info", "--model", tiny_model_folder, signal_at="SIGINT torch")
    assert "Traceback" not in done.stderr and done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == ["numprune: interrupted while starting; nothing was written"]
