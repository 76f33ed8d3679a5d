"""Atomic file writes: the one place for "never leave a half-written file".

Every output of the project (label maps, training cases, checkpoints, meshes, reports, manifests)
is written to a temporary file in the destination folder and renamed over the destination only
when complete (``os.replace`` is atomic on one file system). A crash, a kill or a full disk leaves
at most a ``<name>.<random>.tmp`` file, never a truncated output, and the previous version of the
file stays intact until the new one is complete.

The temporary is removed on any exception (including ``KeyboardInterrupt``) and on SIGTERM/SIGHUP
(while a write is in progress in the main thread, a handler removes the live temporaries and then
lets the signal end the process as it would have; handlers someone else installed are left
alone). Only ``kill -9`` or a power cut can leave one: :func:`remove_stale_temporaries` sweeps
those of our own naming when a command starts again.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(folder / "a.txt", "hello").read_text()
'hello'
>>> sorted(p.name for p in folder.iterdir())
['a.txt']
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TMP_SUFFIX = ".tmp"


def temporary_name_for(path: Path, type_suffix: str = "") -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``path`` (``<name>.<random>.tmp``; with a
    ``type_suffix`` for writers that pick the format from the name, a hidden
    ``.<name>.<random>.tmp<type_suffix>``, which no command takes for an input)."""
    if type_suffix:
        return tempfile.mkstemp(prefix="." + path.name + ".", suffix=TMP_SUFFIX + type_suffix, dir=path.parent)
    return tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)


def _default_permissions(path: str) -> None:
    # mkstemp creates owner-only files; outputs get the usual 0o666 & ~umask (shared clusters).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


#: temporaries being written now (removed by the signal handler)
_LIVE: set[str] = set()
_LOCK = threading.Lock()
_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
_INSTALLED: dict = {}  # signal -> the handler we replaced (always SIG_DFL: we only replace that)


def _remove_live_and_resignal(signum, frame) -> None:  # noqa: ARG001
    for tmp in list(_LIVE):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die by the signal, as without us


def _track(tmp: str) -> None:
    with _LOCK:
        _LIVE.add(tmp)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            if sig not in _INSTALLED and signal.getsignal(sig) == signal.SIG_DFL:
                try:
                    signal.signal(sig, _remove_live_and_resignal)
                    _INSTALLED[sig] = signal.SIG_DFL
                except (ValueError, OSError):
                    pass


def _untrack(tmp: str) -> None:
    with _LOCK:
        _LIVE.discard(tmp)
        if _LIVE or threading.current_thread() is not threading.main_thread():
            return
        for sig in list(_INSTALLED):
            if signal.getsignal(sig) is _remove_live_and_resignal:
                try:
                    signal.signal(sig, _INSTALLED[sig])
                except (ValueError, OSError):
                    continue
            del _INSTALLED[sig]


@contextmanager
def atomic_path(path: str | Path, type_suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that need a file name (nibabel, torch;
    ``type_suffix`` such as ``".seg.nrrd"`` for writers that choose the format by the name's
    ending); on success it replaces ``path``; on any exception (or SIGTERM/SIGHUP) it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGHUP are held back while the file is created and tracked: a signal between the two
    # would otherwise kill the process with the temporary left behind (seen under load)
    blocking = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if blocking else None
    try:
        fd, tmp = temporary_name_for(path, type_suffix)
        os.close(fd)
        _track(tmp)
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _untrack(tmp)


def remove_stale_temporaries(folder: str | Path, names, recursive: bool = False) -> list[Path]:
    """Delete temporaries of our own naming (``<name>.<8 random characters>.tmp``, as
    :func:`temporary_name_for` makes them) that a killed run left in ``folder`` for the given file
    ``names`` (exact names or ``fnmatch`` patterns such as ``"*.safetensors"``). Other ``*.tmp``
    files are never touched. Returns what was removed."""
    import fnmatch

    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")
    removed = []
    for candidate in (folder.rglob("*" + TMP_SUFFIX) if recursive else folder.glob("*" + TMP_SUFFIX)):
        match = pattern.match(candidate.name)
        if match and candidate.is_file() and any(fnmatch.fnmatchcase(match["name"], n) for n in names):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` on success."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding or "utf-8", "newline": ""}
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)
