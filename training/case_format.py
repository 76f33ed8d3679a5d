"""The training-data format: one compressed ``.npz`` per case (DESIGN.md, "Training data").

This module is the one place that knows the keys, dtypes and units of a prepared case. Every
point is in RAS millimetres **relative to** ``origin_mm``; every signed distance is in mm,
negative inside. The loader applies the scale ``S`` (see
:mod:`HeartCompletionLib.normalization`), never this file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT_NAME = "heartcompletion-case"
FORMAT_VERSION = 1

#: key -> (dtype, shape description). ``K`` = number of structures, ``Ns/Nv/Nn`` point counts.
REQUIRED_KEYS = {
    "origin_mm": (np.float64, "(3,)"),
    "surface_points": (np.float32, "(Ns, 3)"),
    "surface_normals": (np.float32, "(Ns, 3)"),
    "surface_labels": (np.int8, "(Ns,)"),
    "volume_points": (np.float32, "(Nv, 3)"),
    "volume_sdf": (np.float32, "(Nv, K)"),
    "near_points": (np.float32, "(Nn, 3)"),
    "near_sdf": (np.float32, "(Nn, K)"),
    "annotated": (np.bool_, "(K,)"),
    "truncated": (np.bool_, "(K,)"),
    "meta": (np.str_, "JSON string"),
}


class CaseFormatError(ValueError):
    """A prepared case that is missing keys or has the wrong dtypes/shapes (message names the file)."""


def save_case(path: str | Path, arrays: dict, meta: dict) -> Path:
    """Write one case atomically: a temporary file in the same folder, then ``os.replace``.

    ``meta`` gets ``format``/``format_version`` added. A crash (or a full disk) leaves at most a
    ``*.tmp`` file that the next run removes, never a truncated ``.npz``.
    """
    path = Path(path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
    data = {k: np.asarray(v, dtype=REQUIRED_KEYS[k][0]) if k in REQUIRED_KEYS else np.asarray(v) for k, v in arrays.items()}
    data["meta"] = np.array(json.dumps(meta))
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CaseFormatError(f"{path}: refusing to write a case without {missing}")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_case(path: str | Path, keys=None) -> dict:
    """Load a case (all keys, or only ``keys``) as a dict of arrays plus ``meta`` as a dict.

    Raises :class:`CaseFormatError` naming the file when it is unreadable, lacks a key, or was
    written by another format version.
    """
    path = Path(path)
    wanted = list(REQUIRED_KEYS) if keys is None else list(dict.fromkeys([*keys, "meta"]))
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in wanted if k not in npz.files]
            if missing:
                raise CaseFormatError(f"{path}: missing keys {missing}")
            out = {k: npz[k] for k in wanted}
    except CaseFormatError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CaseFormatError(f"{path}: unreadable case file ({exc})") from exc
    try:
        meta = json.loads(str(out["meta"]))
    except json.JSONDecodeError as exc:
        raise CaseFormatError(f"{path}: 'meta' is not JSON ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CaseFormatError(
            f"{path}: case format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "re-run heart-prepare"
        )
    out["meta"] = meta
    return out
