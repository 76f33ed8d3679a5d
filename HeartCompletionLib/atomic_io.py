"""Atomic file writes: the one place for "never leave a half-written file".

Every output of the project (label maps, training cases, checkpoints, meshes, reports, manifests)
is written to a temporary file in the destination folder and renamed over the destination only
when complete (``os.replace`` is atomic on one file system). A crash, a kill or a full disk leaves
at most a ``<name>.<random>.tmp`` file, never a truncated output, and the previous version of the
file stays intact until the new one is complete.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(folder / "a.txt", "hello").read_text()
'hello'
>>> sorted(p.name for p in folder.iterdir())
['a.txt']
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TMP_SUFFIX = ".tmp"


def temporary_name_for(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``path`` (``<name>.<random>.tmp``)."""
    return tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)


def _default_permissions(path: str) -> None:
    # mkstemp creates owner-only files; outputs get the usual 0o666 & ~umask (shared clusters).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that need a file name (nibabel, torch);
    on success it replaces ``path``; on any exception it is removed and the error re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_name_for(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
