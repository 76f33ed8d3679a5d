"""The training-data format: one ``.npz`` per case (DESIGN.md, "Training data").

The arrays are stored, not deflated (``np.savez``): float32 distances compress by only ~10 %, and
stored members can be memory-mapped (:func:`load_case` with ``mmap=True``), so the training
loader reads just the rows a sample draws instead of inflating ~30 MB per sample (measured on an
H200: 45 samples/s with deflated files and 8 workers, against 490 samples/s the model could
take). Files written deflated (``np.savez_compressed``, older datasets) are still read.

This module is the one place that knows the keys, dtypes and units of a prepared case. Every
point is in RAS millimetres **relative to** ``origin_mm``; every signed distance is in mm,
negative inside. The loader applies the scale ``S`` (see
:mod:`HeartCompletionLib.geometry.normalization`), never this file.
"""

from __future__ import annotations

import json
import math
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from HeartCompletionLib.atomic_io import atomic_open, atomic_write_text
from HeartCompletionLib.errors import HeartCompletionError

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

#: Extra arrays ``heart-prepare`` writes (DESIGN.md: "more are welcome"); readers must not need them.
#: ``near_labels`` is the structure index whose surface sample each near point was drawn around and
#: ``near_offset_mm`` the length of its Gaussian offset, so ``|near_sdf[i, near_labels[i]]| <=
#: near_offset_mm[i]`` (plus the surface sampling error) holds for correct data in mm.
OPTIONAL_KEYS = {
    "near_labels": (np.int8, "(Nn,)"),
    "near_offset_mm": (np.float32, "(Nn,)"),
}

_DTYPES = {**{k: v[0] for k, v in REQUIRED_KEYS.items()}, **{k: v[0] for k, v in OPTIONAL_KEYS.items()}}


class CaseFormatError(HeartCompletionError, ValueError):
    """A prepared case that is missing keys or has the wrong dtypes/shapes (message names the file)."""


def save_case(path: str | Path, arrays: dict, meta: dict) -> Path:
    """Write one case atomically: a temporary file in the same folder, then ``os.replace``.

    ``meta`` gets ``format``/``format_version`` added. A crash (or a full disk) leaves at most a
    ``*.tmp`` file that the next run removes, never a truncated ``.npz``.
    """
    path = Path(path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
    data = {k: np.asarray(v, dtype=_DTYPES[k]) if k in _DTYPES else np.asarray(v) for k, v in arrays.items()}
    data["meta"] = np.array(json.dumps(meta))
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CaseFormatError(f"{path}: refusing to write a case without {missing}")
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **data)
    return path


def load_case(path: str | Path, keys=None, optional=(), mmap: bool = False) -> dict:
    """Load a case (all required keys, or only ``keys``) as a dict of arrays plus ``meta`` as a dict.

    ``optional`` keys (e.g. :data:`OPTIONAL_KEYS`) are added when the file has them. ``mmap``:
    large stored members come back as read-only ``np.memmap`` views of the file (deflated members
    are read as usual). Raises :class:`CaseFormatError` naming the file when it is unreadable,
    lacks a key, or was written by another format version.
    """
    path = Path(path)
    wanted = list(REQUIRED_KEYS) if keys is None else list(dict.fromkeys([*keys, "meta"]))
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in wanted if k not in npz.files]
            if missing:
                raise CaseFormatError(f"{path}: missing keys {missing}")
            names = [*wanted, *(k for k in optional if k in npz.files and k not in wanted)]
            _check_members(path, npz, names)
            out = dict.fromkeys(names)
            if mmap:  # one pass over the local headers, then a map per large stored member
                with open(path, "rb") as fh:
                    out = {k: _memory_map(fh, path, npz.zip.getinfo(f"{k}.npy")) for k in names}
            out = {k: npz[k] if v is None else v for k, v in out.items()}
    except CaseFormatError:
        raise
    except MemoryError:
        raise CaseFormatError(f"{path}: not enough memory to read the case") from None
    # numpy parses .npy headers with the tokenizer (TokenError/SyntaxError on a damaged one)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error, tokenize.TokenError, SyntaxError,
            KeyError, TypeError, NotImplementedError, zlib.error) as exc:
        raise CaseFormatError(f"{path}: unreadable case file ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(str(out["meta"]))
    except json.JSONDecodeError as exc:
        raise CaseFormatError(f"{path}: 'meta' is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CaseFormatError(f"{path}: 'meta' is a JSON {type(meta).__name__}, not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CaseFormatError(
            f"{path}: case format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "re-run heart-prepare"
        )
    out["meta"] = meta
    return out


def _check_members(path: Path, npz, names) -> None:
    """Refuse a member whose .npy header promises more bytes than the member holds (a damaged or
    crafted header would otherwise allocate its promise before the read fails)."""
    size = path.stat().st_size
    for name in names:
        info = npz.zip.getinfo(f"{name}.npy")
        if info.compress_size > size or info.file_size > 1032 * info.compress_size + 4096:
            raise CaseFormatError(f"{path}: member {name!r} claims {info.file_size} bytes from {info.compress_size} "
                                  f"stored bytes in a {size}-byte file: damaged")
        with npz.zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                continue  # numpy reads (or refuses) other versions itself
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(member)
            header_bytes = member.tell() if member.seekable() else 0
        promised = math.prod(shape) * dtype.itemsize
        if promised > info.file_size - header_bytes:
            raise CaseFormatError(f"{path}: member {name!r} promises {promised} bytes ({dtype}, shape {shape}) but "
                                  f"holds {info.file_size - header_bytes}: damaged")


def verify_checksums(path: str | Path) -> None:
    """Check every member of a case file against the CRC-32 its zip directory stores (the whole
    file is read once, ~30 ms for a 30 MB case); :class:`CaseFormatError` naming the file and the
    damaged member. ``heart-prepare`` runs it before it trusts an existing case on resume."""
    import zlib

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, ValueError, struct.error, NotImplementedError) as exc:
        raise CaseFormatError(f"{path}: damaged case file ({type(exc).__name__}: {exc})") from exc
    if bad is not None:
        raise CaseFormatError(f"{path}: member {bad!r} does not match its stored checksum (CRC-32): the file "
                              "was damaged after it was written")


#: members smaller than this are read, not mapped (a map costs a file handle and a page)
_MMAP_MIN_BYTES = 1 << 16


def _memory_map(fh, path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A read-only memmap of a stored ``.npy`` member of the zip open as ``fh``, or None (deflated,
    small, object arrays or an unknown .npy version: the caller reads those)."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < _MMAP_MIN_BYTES:
        return None
    fh.seek(info.header_offset)
    local = fh.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename}: bad local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    fh.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0)):
        return None
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh)
    offset = fh.tell()
    if dtype.hasobject or int(np.prod(shape)) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# --- the dataset manifest (manifest.json / manifest.csv beside the cases) ---------------------

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
#: one row per input label map; list columns are ``;``-joined structure names
MANIFEST_COLUMNS = (
    "case", "status", "reason", "present", "annotated", "truncated",
    "num_surface", "num_volume", "num_near", "seconds", "resumed", "warnings", "source", "output",
)


def manifest_entry(meta: dict, output: str | Path) -> dict:
    """The manifest row of a prepared case, from the ``meta`` it was saved with (fresh or resumed)."""
    points = meta.get("point_counts", {})
    return {
        "case": meta.get("case"), "source": meta.get("source"), "output": str(output), "status": "ok", "reason": "",
        "present": meta.get("present", []), "annotated": meta.get("annotated", []),
        "truncated": meta.get("truncated", []), "num_surface": points.get("surface"),
        "num_volume": points.get("volume"), "num_near": points.get("near"), "warnings": meta.get("warnings", []),
        "seconds": meta.get("timings", {}).get("total_s"),
    }


def write_manifest(output_dir: str | Path, input_dir: str | Path, options, entries) -> dict:
    """Write ``manifest.json`` and ``manifest.csv`` (atomically) and return the manifest dict.

    ``entries`` are per-case dicts (``heart-prepare``'s); ``output`` is stored relative to
    ``output_dir`` so a prepared folder can be moved. ``options`` is a dataclass or a dict.
    """
    import csv
    import dataclasses
    import io

    output_dir = Path(output_dir)
    rows = []
    for entry in sorted(entries, key=lambda e: (e["case"], e["source"])):
        entry = dict(entry)
        try:
            entry["output"] = Path(entry["output"]).relative_to(output_dir).as_posix()
        except ValueError:
            pass
        rows.append(entry)
    failed = [e for e in rows if e["status"] != "ok"]
    manifest = {
        "format": FORMAT_NAME + "-manifest",
        "format_version": FORMAT_VERSION,
        "input_dir": str(input_dir),
        "options": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {}),
        "summary": {"cases": len(rows), "ok": len(rows) - len(failed), "failed": len(failed),
                    "with_warnings": sum(bool(e.get("warnings")) for e in rows)},
        "cases": rows,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for entry in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
                         for k, v in entry.items()})
    for name, text in ((MANIFEST_JSON, json.dumps(manifest, indent=1) + "\n"), (MANIFEST_CSV, buffer.getvalue())):
        try:
            atomic_write_text(output_dir / name, text)
        except OSError as exc:  # read-only folder, full disk: the previous manifest stays as it was
            raise CaseFormatError(f"{output_dir / name}: cannot write the manifest ({exc.strerror or exc}); "
                                  "the cases written so far are complete and a new run resumes them") from exc
    return manifest


def read_manifest(data_dir: str | Path) -> dict | None:
    """``manifest.json`` of a prepared folder as a dict, ``None`` when there is none."""
    path = Path(data_dir) / MANIFEST_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CaseFormatError(f"{path}: unreadable manifest ({exc})") from exc
