"""Fuzz the readers: mutated NIfTI, NRRD, .seg.nrrd, .npz and .safetensors files.

A seeded loop takes one small valid file of each kind (a synthetic heart written by
``write_label_map``, a case written by ``heart-prepare``, a tiny model's inference checkpoint),
mutates its header fields (sizes, types, offsets, geometry, segment fields, tensor shapes, model
config, structure names) or its bytes (flips, truncation, inside and outside the compression),
and reads the result with the project's reader:

- ``read_label_map`` (expects :class:`LabelMapError`),
- ``load_case`` and ``load_case(mmap=True)`` (expects :class:`CaseFormatError`),
- ``load_inference_checkpoint`` (expects :class:`CheckpointError`).

Every outcome must be either a correct load (a well-formed result) or the project's own error
whose message names the file; anything else (another exception, a message without the path, a
numpy allocation larger than the file could justify) is a failure, printed with the seed and
mutation that reproduce it. Exit status 1 when there was any failure.

    python benchmarks/fuzz_readers.py --count 20000          # a long run
    python benchmarks/fuzz_readers.py --count 300 --seed 7   # what the test suite runs
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shlex
import struct
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".npz", ".safetensors")
#: deflate expands at most ~1032:1; numpy allocations may be this many times the justified bytes
MEMORY_FACTOR = 16
MEMORY_FLOOR = 64 << 20
_BIG = [0, -1, 1, 2, 3, 7, 255, 256, 32767, -32768, 65535, 1 << 20, 1 << 31, (1 << 31) - 1, 10 ** 12]
_FLOATS = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), 3.0]


# --- seed files -------------------------------------------------------------------------------
def make_seeds(folder: Path) -> dict[str, bytes]:
    """One small valid file of each kind: ``{suffix: bytes}``."""
    from heart_training.data.prepare import PrepareOptions, prepare_case

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map
    from HeartCompletionLib.model.checkpoint import save_inference_checkpoint
    from HeartCompletionLib.model.configs import get_config
    from HeartCompletionLib.model.vecset import HeartVecSet
    from HeartCompletionLib.structures.table import StructureTable

    folder.mkdir(parents=True, exist_ok=True)
    heart = synthetic_label_map(seed=0, spacing_mm=5.0)
    seeds = {}
    for suffix in KINDS[:4]:
        seeds[suffix] = write_label_map(heart, folder / f"seed{suffix}").read_bytes()
    options = PrepareOptions(num_surface=600, num_volume=300, num_near=300, min_surface_per_structure=20)
    prepare_case(folder / "seed.nii.gz", folder / "seed.npz", options, case_id="seed")
    seeds[".npz"] = (folder / "seed.npz").read_bytes()
    table = StructureTable.default()
    config = get_config("tiny", len(table))
    config = type(config).from_dict({**config.to_dict(), "width": 16, "depth": 1, "num_latents": 8})
    path = save_inference_checkpoint(folder / "seed.safetensors", HeartVecSet(config), table, Normalization(),
                                     phase=1, data_summary={})
    seeds[".safetensors"] = path.read_bytes()
    return seeds


# --- mutations --------------------------------------------------------------------------------
def _flip(rng: random.Random, data: bytes, region: int | None = None) -> tuple[bytes, str]:
    data = bytearray(data)
    n = rng.choice([1, 1, 2, 4, 8])
    end = len(data) if region is None else min(region, len(data))
    where = []
    for _ in range(n):
        i = rng.randrange(max(end, 1))
        data[i] = rng.randrange(256)
        where.append(i)
    return bytes(data), f"bytes {where} changed"


def _truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"truncated to {cut} bytes"


def _mutate_nifti_header(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    data = bytearray(raw)
    field = rng.choice(["dim", "dim0", "datatype", "pixdim", "vox_offset", "scl_slope", "srow", "codes", "magic"])
    if field == "dim":
        i = rng.randrange(1, 4)
        value = rng.choice([0, -1, 1, 2, 1024, 2048, 32767, -32768])
        struct.pack_into("<h", data, 40 + 2 * i, value)
    elif field == "dim0":
        value = rng.choice([0, 1, 2, 4, 5, 7, 8, -1, 99])
        struct.pack_into("<h", data, 40, value)
        if rng.random() < 0.5:
            struct.pack_into("<h", data, 48, rng.choice([2, 3, 1000]))
    elif field == "datatype":
        value = rng.choice([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 2304, 7, 9999])
        struct.pack_into("<h", data, 70, value)
    elif field == "pixdim":
        i = rng.randrange(8)
        value = rng.choice(_FLOATS)
        struct.pack_into("<f", data, 76 + 4 * i, value)
    elif field == "vox_offset":
        value = rng.choice([0.0, 348.0, 352.0, 353.0, 1e9, -4.0, float("nan")])
        struct.pack_into("<f", data, 108, value)
    elif field == "scl_slope":
        value = rng.choice(_FLOATS)
        struct.pack_into("<ff", data, 112, value, rng.choice(_FLOATS))
    elif field == "srow":
        i = rng.randrange(12)
        value = rng.choice(_FLOATS)
        struct.pack_into("<f", data, 280 + 4 * i, value)
    elif field == "codes":
        value = rng.choice([0, 1, 2, 3, 4, 99, -1])
        struct.pack_into("<hh", data, 252, value, rng.choice([0, 1, 2, 99]))
    else:
        data[344:348] = rng.choice([b"n+1\0", b"ni1\0", b"xxxx", b"n+2\0"])
    return bytes(data), f"NIfTI {field} = {value if field != 'magic' else bytes(data[344:348])!r}"


_NRRD_FIELDS = {
    "sizes": ["2048 2048 2048", "0 10 10", "-5 10 10", "10 10", "1000000 1000000 1000000", "4 4 4 4", "x y z",
              "99999999999999999999 1 1"],
    "type": ["double", "float", "int64", "uint16", "block", "rgb", "short", "signed char", "junk"],
    "encoding": ["raw", "gzip", "bzip2", "ascii", "hex", "lolz"],
    "dimension": ["0", "1", "2", "4", "99", "-1", "three"],
    "space directions": ["(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)", "none (1,0,0) (0,1,0)",
                         "(1,0) (0,1)", "(1e308,0,0) (0,1e308,0) (0,0,1e308)", "junk"],
    "space origin": ["(nan,nan,nan)", "(1,2)", "(inf,0,0)", "junk"],
    "space": ["left-posterior-superior", "right-anterior-superior", "scanner-xyz", "3D-right-handed", "lps", ""],
    "kinds": ["domain domain domain", "list domain domain domain", "RGB-color domain domain", "junk"],
    "endian": ["big", "little", "middle"],
    "data file": ["/etc/passwd", "LIST", "missing.raw"],
    "byte skip": ["-1", "1000000000", "junk"],
    "line skip": ["5", "-3"],
}
_SEGMENT_FIELDS = {"LabelValue": ["0", "-1", "99999", "x", "1.5"], "Layer": ["0", "5", "-1", "x"],
                   "Name": ["", "LV", "Aorta", "∆∆∆", "a" * 500], "Tags": ["|||", "TerminologyEntry:x", ":"]}


def _mutate_nrrd_header(rng: random.Random, raw: bytes, seg: bool) -> tuple[bytes, str]:
    end = raw.find(b"\n\n")
    header, body = raw[:end].decode("utf-8", "replace").split("\n"), raw[end:]
    if seg and rng.random() < 0.4:
        lines = [i for i, line in enumerate(header) if line.startswith("Segment")]
        i = rng.choice(lines)
        key = header[i].split(":=")[0]
        field = key.split("_", 1)[1]
        value = rng.choice(_SEGMENT_FIELDS.get(field, ["", "junk", "\u00ff"]))
        header[i] = f"{key}:={value}"
        description = f"NRRD {key} = {value!r}"
    else:
        field = rng.choice(list(_NRRD_FIELDS))
        value = rng.choice(_NRRD_FIELDS[field])
        lines = [i for i, line in enumerate(header) if line.split(":")[0] == field]
        if lines and rng.random() < 0.15:
            del header[lines[0]]
            description = f"NRRD field {field!r} removed"
        else:
            if lines:
                header[lines[0]] = f"{field}: {value}"
            else:
                header.insert(1, f"{field}: {value}")
            description = f"NRRD {field}: {value}"
    return "\n".join(header).encode("utf-8") + body, description


def _mutate_npz(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """A header of one .npy member (shape, dtype, order) or the meta JSON, as bytes of the same length."""
    data = bytearray(raw)
    starts = [m.start() for m in re.finditer(rb"\{'descr'", raw)]
    i = rng.choice(starts)
    end = raw.index(b"}", i) + 1
    text = raw[i:end].decode("latin-1")
    choice = rng.choice(["shape", "descr", "order"])
    if choice == "shape":
        new = re.sub(r"'shape': \(([^)]*)\)", lambda m: "'shape': (" + ", ".join(
            str(rng.choice([0, 1, 3, 10, 99999, 10 ** 9, 10 ** 12])) for _ in range(max(1, m.group(1).count(",") + rng.choice([0, 0, 1]))))
            + ("," if rng.random() < 0.5 else "") + ")", text)
    elif choice == "descr":
        new = re.sub(r"'descr': '[^']*'", "'descr': '" + rng.choice(["<f8", "|O", "<U9", "<c16", "|b1", "<i8", "V3"]) + "'",
                     text)
    else:
        new = text.replace("False", "True") if "False" in text else text.replace("True", "False")
    new = new[:len(text)].ljust(len(text))  # same length: offsets of the zip stay valid
    data[i:end] = new.encode("latin-1")
    return bytes(data), f"npy header at {i}: {new.strip()!r}"


def _mutate_safetensors(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["heartcompletion"])
    tensors = [k for k in header if k != "__metadata__"]
    choice = rng.choice(["shape", "dtype", "offsets", "config", "names", "version", "drop", "length", "table"])
    if choice == "shape":
        key = rng.choice(tensors)
        header[key]["shape"] = [rng.choice(_BIG + [4, 16]) for _ in range(rng.choice([0, 1, 2, 3]))]
        description = f"tensor {key} shape {header[key]['shape']}"
    elif choice == "dtype":
        key = rng.choice(tensors)
        header[key]["dtype"] = rng.choice(["F16", "F64", "I8", "BOOL", "X", 5])
        description = f"tensor {key} dtype {header[key]['dtype']}"
    elif choice == "offsets":
        key = rng.choice(tensors)
        header[key]["data_offsets"] = rng.choice([[0, 0], [-4, 4], [10 ** 12, 10 ** 12 + 4], "x", [1], [4, 0]])
        description = f"tensor {key} data_offsets {header[key]['data_offsets']}"
    elif choice == "config":
        key = rng.choice(["width", "depth", "num_latents", "heads", "num_classes", "mlp_ratio"])
        meta["model_config"][key] = rng.choice(_BIG + [32768, 0.5, "wide", None])
        description = f"model_config {key} = {meta['model_config'][key]!r}"
    elif choice == "names":
        i = rng.randrange(len(meta["structure_table"]["structures"]))
        meta["structure_table"]["structures"][i]["name"] = rng.choice(["LV\nSegment0_Name:=x", "", "\0", "LA", 7])
        description = f"structure {i} name {meta['structure_table']['structures'][i]['name']!r}"
    elif choice == "version":
        meta[rng.choice(["format_version", "format"])] = rng.choice([0, 2, "1", None])
        description = "format/version changed"
    elif choice == "drop":
        key = rng.choice(["model_config", "structure_table", "normalization", "encoder_input"])
        meta.pop(key)
        description = f"metadata {key} removed"
    elif choice == "table":
        meta["structure_table"] = rng.choice([[], {"structures": "x"}, {"structures": [{"label": 1}]}, None])
        description = f"structure_table = {meta['structure_table']!r}"
    else:
        new_n = rng.choice([0, 1, 7, n - 1, n + 1, 10 ** 12, 2 ** 64 - 1])
        return struct.pack("<Q", new_n) + raw[8:], f"header length field {new_n}"
    header["__metadata__"]["heartcompletion"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:], description


def mutate(rng: random.Random, suffix: str, seed: bytes) -> tuple[bytes, str]:
    """One mutation of ``seed`` (bytes of a valid ``suffix`` file): ``(bytes, description)``."""
    compressed = suffix == ".nii.gz"
    roll = rng.random()
    if roll < 0.1:
        return _truncate(rng, seed)
    if roll < 0.25:
        return _flip(rng, seed, region=rng.choice([None, 1024]))
    if compressed:  # mutate the content, then compress again
        inner, description = mutate(rng, ".nii", gzip.decompress(seed))
        return gzip.compress(inner, compresslevel=1, mtime=0), description + " (inside the gzip stream)"
    if suffix == ".nii":
        return _mutate_nifti_header(rng, seed)
    if suffix in (".nrrd", ".seg.nrrd"):
        return _mutate_nrrd_header(rng, seed, seg=suffix == ".seg.nrrd")
    if suffix == ".npz":
        return _mutate_npz(rng, seed)
    return _mutate_safetensors(rng, seed)


# --- reading and judging ----------------------------------------------------------------------
def _read(path: Path, suffix: str):
    if suffix == ".npz":
        from heart_training.data.case_format import OPTIONAL_KEYS, load_case

        first = load_case(path, optional=OPTIONAL_KEYS)
        load_case(path, optional=OPTIONAL_KEYS, mmap=True)
        return first
    if suffix == ".safetensors":
        from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

        return load_inference_checkpoint(path)
    from HeartCompletionLib.io.labelmap_files import read_label_map

    return read_label_map(path)


def _well_formed(result, suffix: str) -> str | None:
    """Why a successful load is not a correct one (None: it is)."""
    if suffix == ".npz":
        from heart_training.data.case_format import REQUIRED_KEYS

        missing = [k for k in REQUIRED_KEYS if k not in result]
        return f"loaded without {missing}" if missing else None
    if suffix == ".safetensors":
        return None if hasattr(result.model, "decode") and len(result.table) == result.config.num_classes else \
            "model and table disagree"
    labels = result.labels
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        return f"labels {labels.dtype} {labels.shape}"
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        return f"labels outside the table (min {labels.min()}, max {labels.max()})"
    if result.ijk_to_ras.shape != (4, 4):
        return f"ijk_to_ras of shape {result.ijk_to_ras.shape}"
    return None


def justified_bytes(path: Path, suffix: str) -> int:
    size = path.stat().st_size
    return size * 1032 if suffix in (".nii.gz", ".nrrd", ".seg.nrrd", ".npz") else size


def fuzz(count: int, seed: int = 0, folder: Path | None = None, progress: bool = True) -> dict:
    """Run ``count`` mutations; returns ``{"outcomes": Counter, "failures": [...], "by_kind": {...}}``."""
    from HeartCompletionLib.errors import HeartCompletionError

    own = tempfile.TemporaryDirectory() if folder is None else None
    folder = Path(own.name if own else folder)
    seeds = make_seeds(folder / "seeds")
    for suffix, data in seeds.items():  # each seed loads (and every lazy import is done before measuring)
        path = folder / f"seed_check{suffix}"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problem = _well_formed(_read(path, suffix), suffix)
        if problem:
            raise RuntimeError(f"seed file {path} does not load correctly: {problem}")
        path.unlink()
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = {k: Counter() for k in KINDS}
    failures = []
    t0 = time.perf_counter()
    for i in range(count):
        suffix = KINDS[i % len(KINDS)]
        data, description = mutate(rng, suffix, seeds[suffix])
        path = folder / f"m{i:06d}{suffix}"
        path.write_bytes(data)
        tracemalloc.start()
        failure = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = _read(path, suffix)
            failure = _well_formed(result, suffix)
            outcome = "loaded" if failure is None else "bad load"
            del result
        except HeartCompletionError as exc:
            outcome = "refused"
            if str(path) not in str(exc):
                outcome, failure = "error without the file", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
            outcome, failure = "other exception", f"{type(exc).__name__}: {exc}"
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        limit = MEMORY_FLOOR + MEMORY_FACTOR * justified_bytes(path, suffix)
        if peak > limit:
            outcome, failure = "too much memory", f"{peak / 1e6:.1f} MB allocated, limit {limit / 1e6:.1f} MB"
        outcomes[outcome] += 1
        by_kind[suffix][outcome] += 1
        if failure is not None:
            failures.append({"index": i, "kind": suffix, "mutation": description, "outcome": outcome,
                             "problem": failure[:500], "file": str(path)})
        else:
            path.unlink()
        if progress and (i + 1) % max(1, count // 20) == 0:
            print(f"  {i + 1}/{count} mutations, {time.perf_counter() - t0:.1f} s: {dict(outcomes)}", flush=True)
    if own is not None:
        own.cleanup()
    return {"outcomes": outcomes, "by_kind": by_kind, "failures": failures, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fuzz_readers.py", description=__doc__.split("\n\n")[0],
        epilog="Exit status 0 when every mutation loaded correctly or was refused naming the file, 1 otherwise.")
    parser.add_argument("--count", type=int, default=2000, help="mutations (default 2000; spread over the six kinds)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations (a failure names its index)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="folder for the files (failing ones are kept there; default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    result = fuzz(args.count, args.seed, args.keep, progress=not args.quiet)
    print(f"{args.count} mutations in {result['seconds']:.1f} s (seed {args.seed})")
    for kind, counter in result["by_kind"].items():
        print(f"  {kind:12s} " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
    print("  total        " + ", ".join(f"{k} {v}" for k, v in sorted(result["outcomes"].items())))
    for failure in result["failures"][:50]:
        print(f"FAIL #{failure['index']} {failure['kind']} ({failure['mutation']}): {failure['outcome']}: "
              f"{failure['problem']}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
