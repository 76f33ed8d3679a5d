"""``heart-prepare``, one case: a label map -> one training ``.npz`` (DESIGN.md, "Training data").

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
label map with ``{"annotated": [names]}`` wins, then ``--annotated``, then the structures the label
convention (``--label_map``) names, else every structure of the table (``--structures`` narrows all
four; :func:`HeartCompletionLib.structures.conventions.default_annotated`). A dataset cannot annotate
what its convention does not name: ACDC's ``{1: RV, 2: Myocardium, 3: LV}`` annotates those three. An annotated structure with no voxels is warned about
and stored as *not* annotated (NaN): an absent structure has no finite distance to learn.
``truncated`` flags annotated structures with a voxel on the image border (cut by the field of view).

The command line and the batch over many cases (workers, progress, resume, manifest, ``--check``)
are in :mod:`.prepare_cli` (``heart-prepare``, ``python -m heart_training.data.prepare_cli``); this
module imports nothing from it.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.io.labelmap_files import case_name
from HeartCompletionLib.structures.conventions import default_annotated
from HeartCompletionLib.structures.table import StructureTable

from .case_format import FORMAT_VERSION, manifest_entry, save_case


class PrepareError(HeartCompletionError, ValueError):
    """A case that cannot be prepared; the message names the file and the problem."""


@dataclass(frozen=True)
class PrepareOptions:
    """How cases are converted. Distances/sizes in mm, counts per case. Picklable (worker processes).

    ``table``: structure table spec (``None`` = the default ten, or a JSON path); ``convention``:
    the label numbering of the input files (see :mod:`HeartCompletionLib.structures.conventions`);
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
    #: refuse label maps of more voxels (None: ``read_label_map``'s default, 1.5 G or $HEARTCOMPLETION_MAX_VOXELS);
    #: it decides whether a case is read, never its arrays, so it is not part of the fingerprint
    max_voxels: int | None = None

    def fingerprint(self) -> str:
        """Hash of everything that changes the arrays of a case (resume keeps only matching cases):
        the options, the format version, the table's content and a convention file's content."""
        convention = self.convention
        if convention and Path(convention).is_file():
            convention = Path(convention).read_text(encoding="utf-8", errors="replace")
        options = asdict(self)
        options.pop("max_voxels")
        if self.convention:  # cases prepared before conventions defined the annotated set are redone
            options["annotation_rule"] = "convention-names"
        text = json.dumps({"options": options, "format_version": FORMAT_VERSION, "convention": convention,
                           "table": StructureTable.from_spec(self.table).to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- one case -------------------------------------------------------------------------------


def case_seed(seed: int, case_id: str) -> int:
    """Deterministic per-case seed from the case name: independent of order, workers and resume."""
    digest = hashlib.sha256(f"{int(seed)}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sidecar_path(input_path: Path) -> Path:
    """``<case>.json`` beside the label map (suffix ``.nii.gz``/``.seg.nrrd``/... replaced)."""
    stem = case_name(input_path)
    return input_path.with_name(stem + ".json")


def read_sidecar(input_path: Path, table: StructureTable) -> list[str] | None:
    """The ``{"annotated": [names]}`` sidecar beside a label map (table names), ``None`` when absent."""
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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the manifest's ``source_sha256``; resume compares it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    claimed = default_annotated(table, options.convention, options.annotated, read_sidecar(input_path, table))
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
    from HeartCompletionLib.geometry.signed_distance import signed_distances_mm
    from HeartCompletionLib.geometry.surface import sample_structure_surfaces, structure_surfaces
    from HeartCompletionLib.io.labelmap_files import read_label_map

    options = options or PrepareOptions()
    input_path, output_path = Path(input_path), Path(output_path)
    case_id = case_id or case_name(input_path)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    table = StructureTable.from_spec(options.table)
    K = len(table)
    notes: list[str] = []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        label_map = read_label_map(input_path, table=table, convention=options.convention,
                                   max_voxels=options.max_voxels)
    notes += [str(w.message) for w in caught]
    timings["read_s"] = time.perf_counter() - t_start

    present, used, counts = _structures_to_use(label_map, table, options, input_path, notes)
    on_border = set(label_map.border_labels())  # labels > 0; used ones are > 0 too
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

    # near points grouped by the structure they were drawn around (stable): the trainer's
    # per-structure query balance then finds each group by binary search instead of a sort
    near_labels = np.asarray(surf_lab, dtype=np.int64)[pick] - 1
    order = np.argsort(near_labels, kind="stable")
    near, offsets, near_labels = near[order], offsets[order], near_labels[order]
    sdf = np.concatenate([sdf[: options.num_volume], sdf[options.num_volume:][order]])
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
        "near_labels": near_labels,
        "near_offset_mm": np.linalg.norm(offsets, axis=1),
    }
    names = lambda mask: [n for n, m in zip(table.names, mask) if m]  # noqa: E731
    meta = {
        "case": case_id,
        "source": str(input_path.resolve()),
        "source_sha256": file_sha256(input_path),
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
