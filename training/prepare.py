"""``heart-prepare``: label maps -> one training ``.npz`` per case (DESIGN.md, "Training data").

Per case (:func:`prepare_case`), all geometry in RAS millimetres from the file's own affine:

1. read the label map (values mapped onto the structure table; labels outside it are warned
   about and ignored);
2. ``num_surface`` area-uniform surface samples with outward normals over the annotated structures
   that are present (proportional to area, at least ``min_surface_per_structure`` each);
3. the **padded box**: the axis-aligned RAS bounding box of those surface samples, padded on every
   side by ``max(padding_fraction * extent, min_padding_mm)`` of that axis (default 10 %, >= 10 mm).
   Its centre is the case's ``origin_mm``; every stored point is relative to it;
4. ``num_volume`` points uniform in the padded box and ``num_near`` near-surface points (surface
   samples plus isotropic Gaussian offsets, alternating sigma 1 mm and 4 mm), each with the signed
   distance in mm (negative inside) to every structure of the table; columns of structures the case
   does not annotate are NaN.

Annotation (which structures a label map claims to contain): a sidecar ``<case>.json`` beside the
label map with ``{"annotated": [names]}`` wins, then ``--annotated``, else every structure of the
table (``--structures`` narrows all three). An annotated structure with no voxels is warned about
and stored as *not* annotated (NaN): an absent structure has no finite distance to learn.
``truncated`` flags annotated structures with a voxel on the image border (cut by the field of view).

The CLI (:func:`main`) finds label maps recursively, runs cases in parallel, resumes (a case whose
``.npz`` is valid, from the same input file and options, is kept), writes ``manifest.json`` /
``manifest.csv`` atomically and exits non-zero when a case failed; other cases still go on.
``heart-prepare --check OUT`` validates a prepared dataset (:mod:`.dataset_check`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from HeartCompletionLib.structures import StructureTable

from .case_format import FORMAT_VERSION, load_case, manifest_entry, save_case, write_manifest


class PrepareError(ValueError):
    """A case that cannot be prepared; the message names the file and the problem."""


@dataclass(frozen=True)
class PrepareOptions:
    """How cases are converted. Distances/sizes in mm, counts per case. Picklable (worker processes).

    ``table``: structure table spec (``None`` = the default ten, or a JSON path); ``convention``:
    the label numbering of the input files (see :mod:`HeartCompletionLib.label_conventions`);
    ``structures``/``annotated``: names (or synonyms) of the table, ``None`` = all.
    """

    table: str | None = None
    convention: str | None = None
    structures: tuple[str, ...] | None = None
    annotated: tuple[str, ...] | None = None
    num_surface: int = 120_000
    num_volume: int = 250_000
    num_near: int = 250_000
    min_surface_per_structure: int = 1_000
    near_sigmas_mm: tuple[float, ...] = (1.0, 4.0)
    padding_fraction: float = 0.10
    min_padding_mm: float = 10.0
    #: structures with fewer voxels than this are kept but warned about
    min_structure_voxels: int = 50
    seed: int = 0

    def fingerprint(self) -> str:
        """Hash of everything that changes the arrays of a case (resume keeps only matching cases):
        the options, the format version, the table's content and a convention file's content."""
        convention = self.convention
        if convention and Path(convention).is_file():
            convention = Path(convention).read_text(encoding="utf-8", errors="replace")
        text = json.dumps({"options": asdict(self), "format_version": FORMAT_VERSION, "convention": convention,
                           "table": StructureTable.from_spec(self.table).to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _CaseContext:
    """What the orchestrator knows about one input file."""

    case_id: str
    source: Path
    output: Path
    notes: list = field(default_factory=list)


# --- one case -------------------------------------------------------------------------------


def case_seed(seed: int, case_id: str) -> int:
    """Deterministic per-case seed from the case name: independent of order, workers and resume."""
    digest = hashlib.sha256(f"{int(seed)}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def strip_label_map_suffix(name: str) -> str | None:
    """``"case_001.nii.gz"`` -> ``"case_001"``; ``None`` when the name is not a label-map file."""
    from HeartCompletionLib.labelmap_io import LabelMapError, suffix_of

    try:
        suffix = suffix_of(name)  # the reader's list of suffixes, longest match first
    except LabelMapError:
        return None
    return name[: -len(suffix)] or None


def sidecar_path(input_path: Path) -> Path:
    """``<case>.json`` beside the label map (suffix ``.nii.gz``/``.seg.nrrd``/... replaced)."""
    stem = strip_label_map_suffix(input_path.name) or input_path.stem
    return input_path.with_name(stem + ".json")


def _read_sidecar(input_path: Path, table: StructureTable) -> list[str] | None:
    path = sidecar_path(input_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = data["annotated"]
        if not isinstance(names, list):
            raise TypeError("'annotated' must be a list of structure names")
        return [s.name for s in table.subset(names)]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        # KeyError also covers unknown structure names (table.subset names them)
        raise PrepareError(f"{path}: bad annotation sidecar ({exc}); expected {{\"annotated\": [names]}}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _border_labels(labels: np.ndarray) -> set[int]:
    """Label values with a voxel on any of the six faces of the image."""
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    return {int(v) for face in faces for v in np.unique(face)}


def padded_box_mm(points_mm: np.ndarray, fraction: float, min_padding_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box of ``points_mm`` padded per axis by ``max(fraction * extent, min_padding_mm)``."""
    lo, hi = points_mm.min(axis=0), points_mm.max(axis=0)
    pad = np.maximum(fraction * (hi - lo), min_padding_mm)
    return lo - pad, hi + pad


def _structures_to_use(label_map, table: StructureTable, options: PrepareOptions, input_path: Path, notes: list):
    """``(present, used, voxel counts)``: labels with voxels, and those of them that are annotated
    (sidecar > ``options.annotated`` > all, within ``options.structures``). Appends warnings to ``notes``."""
    K = len(table)
    selected = table.names if options.structures is None else [s.name for s in table.subset(options.structures)]
    claimed = _read_sidecar(input_path, table)
    if claimed is None:
        claimed = table.names if options.annotated is None else [s.name for s in table.subset(options.annotated)]
    claimed_labels = [table.by_name(n).label for n in table.names if n in claimed and n in selected]

    counts = np.zeros(K + 1, dtype=np.int64)
    for plane in label_map.labels:  # slice by slice: no int64 copy of a 512x512x300 CT volume
        counts += np.bincount(plane.ravel(), minlength=K + 1)[: K + 1]
    present = [lab for lab in table.labels if counts[lab] > 0]
    if not present:
        raise PrepareError(f"{input_path}: no voxel of any structure of the table {table.names} (empty label map)")
    for lab in present:
        name = table.by_label(lab).name
        if lab not in claimed_labels:
            if name in selected:  # a deliberate --structures choice needs no warning
                notes.append(f"{input_path}: {name} has {counts[lab]} voxels but is not annotated; its voxels are ignored")
        elif counts[lab] < options.min_structure_voxels:
            notes.append(f"{input_path}: {name} has only {counts[lab]} voxels (< {options.min_structure_voxels})")
    for lab in claimed_labels:
        if counts[lab] == 0:
            notes.append(f"{input_path}: {table.by_label(lab).name} is annotated but has no voxels; stored as not annotated")
    used = [lab for lab in claimed_labels if counts[lab] > 0]
    if not used:
        raise PrepareError(f"{input_path}: none of the annotated structures {claimed} has voxels")
    return present, used, counts


def prepare_case(input_path, output_path, options: PrepareOptions | None = None, case_id: str | None = None) -> dict:
    """Convert one label map into one ``.npz`` (written atomically) and return its manifest entry.

    Raises :class:`PrepareError` (message names the file) for a case that cannot be prepared,
    ``OSError`` when the output cannot be written. The input file is only read.
    """
    from HeartCompletionLib.labelmap_io import read_label_map
    from HeartCompletionLib.signed_distance import signed_distances_mm
    from HeartCompletionLib.surface import sample_structure_surfaces, structure_surfaces

    options = options or PrepareOptions()
    input_path, output_path = Path(input_path), Path(output_path)
    case_id = case_id or strip_label_map_suffix(input_path.name) or input_path.stem
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    table = StructureTable.from_spec(options.table)
    K = len(table)
    notes: list[str] = []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        label_map = read_label_map(input_path, table=table, convention=options.convention)
    notes += [str(w.message) for w in caught]
    timings["read_s"] = time.perf_counter() - t_start

    present, used, counts = _structures_to_use(label_map, table, options, input_path, notes)
    on_border = _border_labels(label_map.labels)
    truncated = np.array([lab in on_border and lab in used for lab in table.labels], dtype=bool)
    annotated = np.array([lab in used for lab in table.labels], dtype=bool)

    rng = np.random.default_rng(case_seed(options.seed, case_id))
    t = time.perf_counter()
    floor = min(options.min_surface_per_structure, options.num_surface // len(used))
    meshes = structure_surfaces(label_map, used)  # extracted once, shared by sampling and distances
    surf_pts, surf_nrm, surf_lab = sample_structure_surfaces(
        label_map, used, options.num_surface, rng, min_per_structure=floor, meshes=meshes
    )
    surf_pts = np.asarray(surf_pts, dtype=np.float64)
    timings["surface_s"] = time.perf_counter() - t

    lo, hi = padded_box_mm(surf_pts, options.padding_fraction, options.min_padding_mm)
    origin = (lo + hi) / 2.0
    volume = rng.uniform(lo, hi, size=(options.num_volume, 3))
    pick = rng.integers(0, len(surf_pts), size=options.num_near)
    sigmas = np.asarray(options.near_sigmas_mm, dtype=np.float64)[np.arange(options.num_near) % len(options.near_sigmas_mm)]
    offsets = rng.normal(size=(options.num_near, 3)) * sigmas[:, None]
    near = surf_pts[pick] + offsets

    t = time.perf_counter()
    used_sdf = signed_distances_mm(label_map, np.concatenate([volume, near]), used, meshes=meshes)
    sdf = np.full((len(used_sdf), K), np.nan, dtype=np.float32)
    sdf[:, [lab - 1 for lab in used]] = used_sdf
    timings["distances_s"] = time.perf_counter() - t

    arrays = {
        "origin_mm": origin,
        "surface_points": surf_pts - origin,
        "surface_normals": surf_nrm,
        "surface_labels": np.asarray(surf_lab, dtype=np.int64) - 1,
        "volume_points": volume - origin,
        "volume_sdf": sdf[: options.num_volume],
        "near_points": near - origin,
        "near_sdf": sdf[options.num_volume :],
        "annotated": annotated,
        "truncated": truncated,
        "near_labels": np.asarray(surf_lab, dtype=np.int64)[pick] - 1,
        "near_offset_mm": np.linalg.norm(offsets, axis=1),
    }
    names = lambda mask: [n for n, m in zip(table.names, mask) if m]  # noqa: E731
    meta = {
        "case": case_id,
        "source": str(input_path.resolve()),
        "source_sha256": _sha256(input_path),
        "present": [table.by_label(lab).name for lab in present],
        "annotated": names(annotated),
        "truncated": names(truncated),
        "warnings": notes,
        "shape": list(label_map.shape),
        "spacing_mm": label_map.spacing_mm.tolist(),
        "ijk_to_ras": label_map.ijk_to_ras.tolist(),
        "table": table.names,
        "table_name": table.name,
        "voxel_counts": {table.by_label(lab).name: int(counts[lab]) for lab in present},
        "point_counts": {"surface": len(surf_pts), "volume": options.num_volume, "near": options.num_near},
        "box_mm": {"lo": lo.tolist(), "hi": hi.tolist()},
        "seed": case_seed(options.seed, case_id),
        "options": asdict(options),
        "options_fingerprint": options.fingerprint(),
    }
    # the file cannot hold its own save time: timings inside stop before saving
    timings["total_s"] = time.perf_counter() - t_start
    meta["timings"] = {k: round(v, 3) for k, v in timings.items()}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    save_case(output_path, arrays, meta)
    return {**manifest_entry(meta, output_path), "seconds": round(time.perf_counter() - t_start, 3)}


# --- many cases -----------------------------------------------------------------------------


def find_label_maps(input_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Label-map files under ``input_dir`` (recursive, sorted; hidden files and ``exclude`` skipped)."""
    found = []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if exclude is not None and exclude in path.parents:
            continue
        if strip_label_map_suffix(path.name) is not None:
            found.append(path)
    return found


def _entry_from_existing(ctx: _CaseContext, options: PrepareOptions) -> dict | None:
    """The manifest entry of an already prepared, still valid case; ``None`` when it must be redone."""
    if not ctx.output.is_file():
        return None
    try:
        meta = load_case(ctx.output, keys=["annotated"])["meta"]
    except ValueError as exc:
        ctx.notes.append(f"{ctx.output}: existing file is not a valid case ({exc}); prepared again")
        return None
    if meta.get("options_fingerprint") != options.fingerprint() or meta.get("source_sha256") != _sha256(ctx.source):
        ctx.notes.append(f"{ctx.output}: prepared from another input file or with other options; prepared again")
        return None
    return {**manifest_entry(meta, ctx.output), "source": str(ctx.source), "resumed": True}


def _run_case(ctx: _CaseContext, options: PrepareOptions) -> dict:
    """:func:`prepare_case` that never raises: a failure becomes a ``failed`` entry naming the file."""
    t0 = time.perf_counter()
    try:
        entry = prepare_case(ctx.source, ctx.output, options, case_id=ctx.case_id)
    except OSError as exc:
        # writing failed (read errors of the label map arrive as LabelMapError, a ValueError)
        reason = f"{ctx.output}: cannot write the case: {exc}" if str(ctx.source) not in str(exc) else str(exc)
        entry = _failed(ctx, reason)
    except Exception as exc:  # noqa: BLE001 - any bad case must not stop the others
        message = str(exc) or type(exc).__name__
        entry = _failed(ctx, message if str(ctx.source) in message else f"{ctx.source}: {message}")
    entry["warnings"] = ctx.notes + entry.get("warnings", [])
    entry.setdefault("seconds", round(time.perf_counter() - t0, 3))
    return entry


def _failed(ctx: _CaseContext, reason: str) -> dict:
    return {"case": ctx.case_id, "source": str(ctx.source), "output": str(ctx.output), "status": "failed", "reason": reason}


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete ``*.tmp`` files a killed run left behind (``save_case``/manifest temporaries)."""
    stale = [p for p in output_dir.rglob("*.tmp") if p.is_file() and (".npz." in p.name or p.name.startswith("manifest."))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def prepare_dataset(
    input_dir, output_dir, options: PrepareOptions | None = None, workers: int = 1, overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare every label map under ``input_dir`` into ``output_dir``; returns the manifest dict.

    Output mirrors the input folders (``IN/a/case.nii.gz`` -> ``OUT/a/case.npz``). Never raises for
    a bad case (it is listed as failed); raises ``PrepareError`` for a bad input/output folder.
    """
    from tqdm import tqdm

    options = options or PrepareOptions()
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not input_dir.is_dir():
        raise PrepareError(f"{input_dir}: input folder does not exist")
    StructureTable.from_spec(options.table)  # fail early on a bad table, not once per case
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"{output_dir}: cannot create the output folder ({exc})") from exc
    remove_stale_temporaries(output_dir)

    contexts, entries, seen = [], {}, {}
    for source in find_label_maps(input_dir, exclude=output_dir):
        rel = source.relative_to(input_dir)
        case_id = (rel.parent / strip_label_map_suffix(source.name)).as_posix()
        ctx = _CaseContext(case_id, source, output_dir / f"{case_id}.npz")
        if case_id in seen:
            entries[str(source)] = _failed(ctx, f"{source}: same case name {case_id!r} as {seen[case_id]}; rename one")
            continue
        seen[case_id] = source
        contexts.append(ctx)

    pending = []
    for ctx in contexts:
        existing = None if overwrite else _entry_from_existing(ctx, options)
        if existing is None:
            pending.append(ctx)
        else:
            entries[str(ctx.source)] = existing

    last_write = [0.0]

    def finish(ctx: _CaseContext, entry: dict) -> None:
        entries[str(ctx.source)] = {**entry, "source": str(ctx.source)}
        if entry["status"] != "ok":
            bar.write(f"FAILED {entry['case']}: {entry['reason']}", file=sys.stderr)
        bar.update()
        if time.monotonic() - last_write[0] > 5.0:  # progress survives a kill; not rewritten per case
            write_manifest(output_dir, input_dir, options, entries.values())
            last_write[0] = time.monotonic()

    with tqdm(total=len(contexts), initial=len(contexts) - len(pending), desc="heart-prepare", unit="case",
              disable=not progress) as bar:
        if workers <= 1 or len(pending) <= 1:
            for ctx in pending:
                finish(ctx, _run_case(ctx, options))
        else:
            _run_parallel(pending, options, workers, finish)
    return write_manifest(output_dir, input_dir, options, entries.values())


def _run_parallel(pending: list, options: PrepareOptions, workers: int, on_done) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_case, ctx, options): ctx for ctx in pending}
        for future in as_completed(futures):
            ctx = futures[future]
            try:
                entry = future.result()
            except BrokenProcessPool as exc:  # a worker died (e.g. killed for memory)
                entry = _failed(ctx, f"{ctx.source}: worker process died ({exc}); try fewer --workers")
            on_done(ctx, entry)


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareOptions()
    parser = argparse.ArgumentParser(
        prog="heart-prepare",
        description="Convert label maps (.nii/.nii.gz/.nrrd/.seg.nrrd, searched recursively) into training .npz "
        "files (points and signed distances in RAS mm), or validate a prepared folder with --check.",
        epilog="Examples:\n  heart-prepare --input_dir labelmaps --output_dir prepared --workers 4\n"
        "  heart-prepare --check prepared",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input_dir", type=Path, help="folder of label maps (searched recursively)")
    parser.add_argument("--output_dir", type=Path, help="where the .npz files, manifest.json and manifest.csv go")
    parser.add_argument("--check", type=Path, metavar="DIR", help="validate the prepared folder DIR instead of converting")
    parser.add_argument("--workers", type=int, default=None, help="parallel cases (default: half the CPU cores)")
    parser.add_argument("--label_map", dest="convention", default=None, metavar="CONV",
                        help="label numbering of the inputs: 'mmwhs', 'totalsegmentator' or a JSON file "
                        "{value: structure name} (default: the table's values 1..K)")
    parser.add_argument("--table", default=None, help="structure table JSON (default: the ten structures)")
    parser.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                        help="process only these structures (the others are stored as not annotated)")
    parser.add_argument("--annotated", nargs="+", default=None, metavar="NAME",
                        help="structures the label maps annotate (default all; a <case>.json sidecar "
                        "{\"annotated\": [...]} overrides it per case)")
    parser.add_argument("--num_surface", type=int, default=defaults.num_surface, help="surface samples per case")
    parser.add_argument("--num_volume", type=int, default=defaults.num_volume, help="uniform points in the padded box")
    parser.add_argument("--num_near", type=int, default=defaults.num_near, help="near-surface points per case")
    parser.add_argument("--min_surface_per_structure", type=int, default=defaults.min_surface_per_structure,
                        help="floor of surface samples per structure")
    parser.add_argument("--near_sigma_mm", type=float, nargs="+", default=list(defaults.near_sigmas_mm),
                        help="Gaussian offsets (mm) of near-surface points, used in turn")
    parser.add_argument("--padding_fraction", type=float, default=defaults.padding_fraction,
                        help="box padding as a fraction of the structures' extent per axis")
    parser.add_argument("--min_padding_mm", type=float, default=defaults.min_padding_mm, help="minimum box padding (mm)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="dataset seed (each case derives its own)")
    parser.add_argument("--overwrite", action="store_true", help="prepare every case again (default: resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from .dataset_check import add_check_arguments

    add_check_arguments(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    for name in ("num_surface", "num_volume", "num_near"):
        if getattr(args, name) < 1:
            raise PrepareError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(s <= 0 for s in args.near_sigma_mm):
        raise PrepareError(f"--near_sigma_mm must be positive millimetres, got {args.near_sigma_mm}")
    options = PrepareOptions(
        table=None if args.table is None else str(Path(args.table).resolve()),
        convention=args.convention if args.convention is None or not Path(args.convention).is_file()
        else str(Path(args.convention).resolve()),
        structures=None if args.structures is None else tuple(args.structures),
        annotated=None if args.annotated is None else tuple(args.annotated),
        num_surface=args.num_surface, num_volume=args.num_volume, num_near=args.num_near,
        min_surface_per_structure=args.min_surface_per_structure, near_sigmas_mm=tuple(args.near_sigma_mm),
        padding_fraction=args.padding_fraction, min_padding_mm=args.min_padding_mm, seed=args.seed,
    )
    # unknown names fail here, once, instead of in every case
    table = StructureTable.from_spec(options.table)
    for names in (options.structures, options.annotated):
        if names is not None:
            table.subset(names)
    return options


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is not None:
        from .dataset_check import run_check_cli

        return run_check_cli(args)
    if args.input_dir is None or args.output_dir is None:
        parser.error("--input_dir and --output_dir are required (or use --check DIR)")
    import os

    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) // 2)
    try:
        options = options_from_args(args)
        manifest = prepare_dataset(args.input_dir, args.output_dir, options, workers=workers,
                                   overwrite=args.overwrite, progress=not args.quiet)
    except (PrepareError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes its str()
        print(f"heart-prepare: error: {message}", file=sys.stderr)
        return 2
    summary = manifest["summary"]
    print(f"heart-prepare: {summary['ok']} of {summary['cases']} cases ok, {summary['failed']} failed, "
          f"{summary['with_warnings']} with warnings -> {Path(args.output_dir) / 'manifest.json'}")
    for entry in manifest["cases"]:
        if entry["status"] != "ok":
            print(f"  FAILED {entry['case']}: {entry['reason']}", file=sys.stderr)
    if summary["cases"] == 0:
        print(f"heart-prepare: error: no label maps (.nii/.nii.gz/.nrrd/.seg.nrrd) under {args.input_dir}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
