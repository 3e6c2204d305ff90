"""The one writer of every file and folder numprune saves (model folders, reports, JSON, plots, caches).

An output is written under a hidden temporary name beside its target (same folder, so the final
rename is atomic) and renamed into place in one step when complete:

- without ``overwrite`` the rename fails if the target appeared meanwhile (Linux ``renameat2`` with
  ``RENAME_NOREPLACE``), so of two runs writing the same target one fails cleanly;
- with ``overwrite`` the new output and the old one swap places in one step (``RENAME_EXCHANGE``)
  and the old one is deleted after, so at every moment the target holds either the old or the new
  complete output.

Where ``renameat2`` is missing (not Linux, glibc < 2.28) or the file system refuses it, the
fallback is a hard link for files (which fails if the target exists) and, for folders, a plain
rename after a check (a plain rename still refuses to replace a non-empty folder); replacing then
takes two renames, with a short moment between them with no output at the target.

Everything a path decides is checked up front by one function, ``check_target``, before any long
work: an existing target without ``overwrite``, a folder where a file is wanted or the reverse,
something that is neither a regular file nor numprune's own folder (a device, a pipe, a socket,
a foreign folder), a dangling symbolic link, an overlong name, an unwritable parent, a target that
is, contains or lies inside one of the run's inputs, numprune's cache or another output of the
same run. Any OSError while writing (a full disk) becomes one NumpruneError; the temporary output
and any parent folders created for it are removed.

A temporary's name carries its machine and process id (``.numprune-<host>-<pid>-<random>.<name>``): a
run killed outright (SIGKILL, a power cut) cannot remove its own, so the next output written beside it
removes those of this machine whose process is gone. Another machine's (a shared folder) or another
container's are left alone: their process ids mean nothing here, and their run may still be writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from numprune.errors import NumpruneError
from numprune.io.cache import cache_root

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)
_TEMP_PREFIX = ".numprune-"
# ".numprune-" + the host (8 hex digits) + "-" + a process id (Linux: at most 7 digits) + "-" + 8 hex digits + "."
_TEMP_EXTRA = len(_TEMP_PREFIX) + 8 + 1 + 7 + 1 + 8 + 1
_TEMP_NAME = re.compile(rf"{re.escape(_TEMP_PREFIX)}([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}\.")
_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def _host() -> str:
    """This machine and process namespace, as 8 hex digits: where a temporary's process id means something."""
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(f"{socket.gethostname()} {namespace}".encode()).hexdigest()[:8]


HOST = _host()
# Outputs this process has put in place: the command line's message on Ctrl-C says which.
committed: list[Path] = []


def check_target(out: str | os.PathLike, *, overwrite: bool = False, folder: bool = True,
                 inputs: Iterable[str | os.PathLike | None] = (), outputs: Iterable[str | os.PathLike | None] = (),
                 marker: str | None = None, into_cache: bool = False) -> Path:
    """The absolute target path, once everything the path alone decides is known to allow writing it: the one
    place that decides whether a path may be written, called by every writer before its work.

    ``folder`` says whether a folder or a file is written. ``inputs`` are paths the run reads (model
    folders, data files): the target may not be one of them (nor the same file through a link),
    contain one, or lie inside one; ``outputs`` are the run's other outputs, written or not yet:
    the target may not be one, contain one or lie inside one. Nor may it be the current folder or
    one above it, nor lie in numprune's cache folder (unless ``into_cache``: numprune's own cache
    builders). With ``overwrite``, only a regular file, or a folder that is empty or holds
    ``marker`` (a file every such output has), is replaced, so that a mistyped path never deletes
    a folder numprune did not write, nor a device or a pipe.
    """
    if out is None or not str(out).strip():
        raise NumpruneError("the output path is empty")
    kind = "folder" if folder else "file"
    target = Path(os.path.abspath(Path(out).expanduser()))
    if target.parent == target:
        raise NumpruneError(f"cannot write the {kind} {target}: it is the root folder")
    _check_names(target)
    if not _is_utf8(target):  # safetensors and tokenizers write UTF-8 paths only
        shown = os.fsencode(target).decode("utf-8", "replace")
        raise NumpruneError(f"output path {shown} is not valid UTF-8; choose a name in UTF-8")
    try:
        return _check_target(target, overwrite, folder, inputs, outputs, marker, into_cache, kind)
    except OSError as e:  # a path the system refuses to look at (too long, a loop of links, ...)
        raise NumpruneError(f"cannot write {str(target)[:80]}: {e.strerror or e}") from None


def _check_target(target: Path, overwrite: bool, folder: bool, inputs: Iterable, outputs: Iterable,
                  marker: str | None, into_cache: bool, kind: str) -> Path:
    real = Path(os.path.realpath(target))
    if target.is_symlink() and not target.exists():
        raise NumpruneError(f"output path {target} is a symbolic link to a missing target; remove it or choose "
                            "another path")
    _check_not_an_input(target, real, inputs, kind, into_cache)
    _check_not_another_output(target, real, outputs, kind)
    if target.exists():
        if not overwrite:
            raise NumpruneError(f"output {kind} {target} already exists and overwriting was not asked for")
        if folder and not target.is_dir():
            raise NumpruneError(f"output path {target} exists and is not a folder")
        if not folder and target.is_dir():
            raise NumpruneError(f"output path {target} is a folder; give a file name")
        if not folder and not stat.S_ISREG(target.stat().st_mode):
            raise NumpruneError(f"output path {target} is not a regular file (a device, a pipe or a socket); "
                                "it is not replaced")
        if folder and marker and any(target.iterdir()) and not _is_regular_file(target / marker):
            raise NumpruneError(f"{target} is not empty and was not written by numprune (it has no {marker}); "
                                "it is not replaced")
    ancestor = next(p for p in target.parents if os.path.lexists(p))
    if not ancestor.is_dir():
        raise NumpruneError(f"cannot write {target}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise NumpruneError(f"cannot write into {ancestor} (permission denied or read-only)")
    try:  # a probe: what access() cannot tell (a read-only file system for root, quotas)
        os.rmdir(_make_temp(ancestor, "probe", folder=True))
    except OSError as e:
        raise NumpruneError(f"cannot write into {ancestor}: {e.strerror}") from None
    return target


def _check_not_an_input(target: Path, real: Path, inputs: Iterable, kind: str, into_cache: bool) -> None:
    """Not over, around or inside what the run reads or numprune keeps; the current folder may hold outputs, but
    is never replaced. Nothing but numprune's own cache builders writes in the cache folder: an output named as an
    entry not built yet would be taken for it by later runs (a pruned model as the embedded one)."""
    inputs = [Path(p) for p in inputs if p is not None]
    protected = [(Path(os.path.realpath(p)), "an input of this run", True) for p in inputs]
    protected.append((Path(os.path.realpath(os.getcwd())), "the current folder", False))
    if not into_cache:
        cache = cache_root()
        protected.append((Path(os.path.realpath(cache)), "numprune's cache", True))
        protected += [(Path(os.path.realpath(entry)), "in numprune's cache", True) for entry in _entries(cache)]
    for path, what, enclosing in protected:
        if real == path or real in path.parents:
            raise NumpruneError(f"output {kind} {target} would replace {path} ({what}); choose another path")
        if enclosing and path in real.parents and not path.is_file():  # a folder, or the cache before its first use
            raise NumpruneError(f"output {kind} {target} lies inside {path} ({what}); choose a path outside it")
    if target.exists():  # the same file through a hard link
        for path in inputs:
            if path.is_file() and os.path.samefile(target, path):
                raise NumpruneError(f"output {kind} {target} is the same file as {path} (an input of this run); "
                                    "choose another path")


def _is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file itself (numprune writes its marker so): not a link to one, nor a folder."""
    return path.is_file() and not path.is_symlink()


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds; nothing if it is not a folder or cannot be read."""
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _check_not_another_output(target: Path, real: Path, outputs: Iterable, kind: str) -> None:
    """Two outputs of one run never share a path, nor does one lie inside the other (written or not yet)."""
    for other in (Path(os.path.realpath(Path(p).expanduser())) for p in outputs if p is not None and str(p).strip()):
        if real == other or real in other.parents or other in real.parents:
            raise NumpruneError(f"output {kind} {target} and {other} (another output of this run) overlap; "
                                "choose separate paths")


def _is_utf8(path: Path) -> bool:
    """Whether ``path`` is UTF-8 (a name that is not holds its undecodable bytes as surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_names(target: Path) -> None:
    """Every name the output needs fits the file system: the folders to create, and the target's name
    with the temporary prefix (the longest name written)."""
    ancestor = next(p for p in target.parents if os.path.isdir(p))
    limit = os.pathconf(ancestor, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    names = [(p.name, limit) for p in target.parents if p.name] + [(target.name, limit - _TEMP_EXTRA)]
    for name, allowed in names:
        if len(os.fsencode(name)) > allowed:
            raise NumpruneError(f"output name {name[:40]}... is too long: at most {allowed} bytes")


@contextmanager
def output_folder(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable = (),
                  marker: str | None = None, into_cache: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` that becomes ``out`` only if the block completes."""
    with _output(out, overwrite, inputs, marker, into_cache, folder=True) as tmp:
        yield tmp


@contextmanager
def output_file(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``out`` (same suffix) that becomes ``out`` only if the block completes."""
    with _output(out, overwrite, inputs, None, False, folder=False) as tmp:
        yield tmp


def write_text(out: str | os.PathLike, text: str, *, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """``text`` as the file ``out``, written through ``output_file``."""
    with output_file(out, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(text)
    return Path(out)


@contextmanager
def _output(out, overwrite: bool, inputs: Iterable, marker: str | None, into_cache: bool, *,
            folder: bool) -> Iterator[Path]:
    target = check_target(out, overwrite=overwrite, folder=folder, inputs=inputs, marker=marker, into_cache=into_cache)
    created = _make_parents(target.parent)
    tmp = None
    try:  # from here on, an interrupt removes the parents created (the stale temporaries may take a while)
        _remove_stale_temporaries(target.parent)
        tmp = _make_temp(target.parent, target.name, folder=folder)
        yield tmp
        _normal_permissions(tmp)
        _commit(tmp, target, overwrite)
    except BaseException as error:
        if tmp is not None:
            _remove(tmp)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(error, (OSError, SafetensorError)):  # a full disk, a lost mount, ...
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            raise NumpruneError(f"could not write {target}: {reason}") from None
        raise


def _normal_permissions(tmp: Path) -> None:
    """Every file written gets the permissions a new file gets here (0o666 less the umask): some writers,
    as safetensors' ``save_file``, create theirs readable by the owner only."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents (normal permissions); return those created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        for path in missing:
            path.mkdir()
    except OSError as e:
        for path in reversed(missing):
            if path.exists():
                path.rmdir()
        raise NumpruneError(f"cannot create the folder {folder}: {e.strerror}") from None
    return missing


def _make_temp(parent: Path, name: str, *, folder: bool) -> Path:
    """A new hidden path beside the target, named with this process's id: a folder made with mkdir's normal
    permissions (0o777 less the umask, not mkdtemp's 0o700), or a file path with the target's name at the end
    (so its suffix says the format to writers such as matplotlib)."""
    while True:
        path = parent / f"{_TEMP_PREFIX}{HOST}-{os.getpid()}-{secrets.token_hex(4)}.{name}"
        try:
            if folder:
                path.mkdir()
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries in ``folder`` left by this machine's numprune processes that no longer run (killed
    outright), as far as this user may (another user's, in a shared folder, stay)."""
    for entry in _entries(folder):
        match = _TEMP_NAME.match(entry.name)
        if match and match[1] == HOST and not _running(int(match[2])):
            with contextlib.suppress(OSError):
                _remove(entry)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Put ``tmp`` in place at ``target`` in one step, with Ctrl-C and SIGTERM held until it is done."""
    with _signals_held():
        if not overwrite or not os.path.lexists(target):
            try:
                _rename_noreplace(tmp, target)
            except FileExistsError:
                if not overwrite:
                    raise NumpruneError(f"{target} appeared while this run was writing it (another run?); "
                                        "it was left as it is and this run's output discarded") from None
                _replace(tmp, target)
        else:
            _replace(tmp, target)
        committed.append(target)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then reach the handlers they had.

    Blocking them in this thread alone does not hold them: the kernel hands a signal to another thread (torch
    has several), and Python runs the handler in the main thread at its next step, inside the block (the old
    output then deleted and the new one in place, reported as nothing written). So, in the main thread, the
    handlers themselves wait: they note the signal, raised again after the block.
    """
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    noted: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in _BLOCKED} if main else {}
    handlers = {s: h for s, h in handlers.items() if h is not None}  # None: set outside Python, left alone
    for signum in handlers:
        signal.signal(signum, lambda number, _frame: noted.append(number))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if noted:
            signal.raise_signal(noted[0])


def _replace(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` and ``target`` in one step, then delete the old output (now at ``tmp``)."""
    try:
        _renameat2(tmp, target, _RENAME_EXCHANGE)
    except NotImplementedError:  # two steps: the old output aside, the new one in
        aside = _make_temp(target.parent, target.name, folder=True)
        os.rename(target, aside / "old")
        os.rename(tmp, target)
        _remove(aside)
        return
    _remove(tmp)


def _rename_noreplace(tmp: Path, target: Path) -> None:
    try:
        _renameat2(tmp, target, _RENAME_NOREPLACE)
    except NotImplementedError:
        if tmp.is_dir():
            if os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir())):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
            os.rename(tmp, target)  # fails on a non-empty folder that appeared meanwhile
        else:
            os.link(tmp, target)  # fails if the target exists
            os.unlink(tmp)


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """Linux renameat2; NotImplementedError where the system or the file system lacks it."""
    if _RENAMEAT2 is None:
        raise NotImplementedError
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise NotImplementedError
    raise OSError(code, os.strerror(code), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
