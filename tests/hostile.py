"""Shared by the test_refuse_* files: run the command line as a hostile user would, and check that it
refused cleanly (status 2, one line ``numprune: error: ...``, no traceback) and that every input's
bytes are unchanged. ``numprune(...)``, the command line in a fresh process, serves every test module
that needs one (test_cli, test_gguf).

A fresh ``python -m numprune`` costs 5-25 s of start-up (torch and transformers) on a busy 2-core
machine, so by default a case runs ``numprune.cli.main`` in this process (the same code
``__main__`` runs; an exception other than NumpruneError escapes it and fails the test, as a
traceback would). Cases that depend on the process itself (resource limits, stdin, signals, a
possible hang) always get a fresh process; ``NUMPRUNE_FRESH_PROCESS=1`` gives every case one.

With ``NUMPRUNE_CASE_LOG`` set, every case appends ``{case, exit, stderr_lines, process}`` as a JSON line
there (``scripts/refusal_table.py`` turns the log into the table of cases).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def numprune(*args, cwd=None, timeout=300, signal_at: str | None = None, **popen) -> subprocess.CompletedProcess:
    """``python -m numprune ARGS`` in a fresh process, with this checkout's numprune first on the path.

    ``signal_at`` (``"SIGINT torch"``, ``"SIGTERM numprune.calibrate LayerStream.run"``): the process sends
    itself that signal as that module starts being imported, or as that function is first called
    (tests/signal_hook/sitecustomize.py), so an interruption lands at a point the test chose, whatever the load.
    """
    path = [str(REPO), *([str(REPO / "tests" / "signal_hook")] if signal_at else []), os.environ.get("PYTHONPATH")]
    # No empty entry: Python reads one as the current folder, which a test of what runs from there must not add.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "NUMPRUNE_TEST_SIGNAL": signal_at or ""}
    popen.setdefault("stdin", None if "input" in popen else subprocess.DEVNULL)  # nothing to answer a prompt
    return subprocess.run([sys.executable, "-m", "numprune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, **popen)


def hashes(*paths) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), and the link target of every symbolic link."""
    found = {}
    for root in map(Path, paths):
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_refused(done: subprocess.CompletedProcess, message: str, case: str, process: str) -> None:
    """Exit status 2 and exactly one stderr line ``numprune: error: ...`` containing ``message``."""
    lines = done.stderr.splitlines()
    log = os.environ.get("NUMPRUNE_CASE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": case, "exit": done.returncode, "stderr_lines": len(lines),
                                "process": process}) + "\n")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("numprune: error:"), lines
    assert message in lines[0], lines[0]


def in_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """``numprune ARGS`` through ``numprune.cli.main`` in this process, stdout and stderr captured."""
    from numprune.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([str(a) for a in args])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def refused(case: str, message: str, *args, inputs=(), fresh: bool = False, **run) -> subprocess.CompletedProcess:
    """Run ``numprune ARGS``; it must refuse with ``message`` and leave every file under ``inputs`` as it was.
    ``fresh`` (or any of ``preexec_fn``, ``input``, ``timeout``) runs it in a new process."""
    before = hashes(*inputs)
    fresh = fresh or bool(run.keys() & {"preexec_fn", "input", "timeout"} or os.environ.get("NUMPRUNE_FRESH_PROCESS"))
    done = numprune(*args, **run) if fresh else in_process(*args, **run)
    assert_refused(done, message, case, "fresh" if fresh else "in-process")
    assert hashes(*inputs) == before
    return done
