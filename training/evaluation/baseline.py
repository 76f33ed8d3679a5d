"""The nearest-case baseline every ``heart-eval`` number is read against.

Completing a heart by copy and paste: find the training case whose *available* structures look
most like the test case's after aligning their centroids (a translation only), and paste that
case's missing structures into the test image.

Matching (all in RAS mm, each case in its own physical frame)
    1. Every case is described per structure by its volume centroid, its volume and up to
       ``surface_points`` boundary-voxel centres (a fixed subsample, deterministic).
    2. The translation ``t`` aligns the mean of the available structures' centroids (each
       structure weighted equally, so the large chambers do not drown the small ones).
    3. A cheap score ranks all candidates: RMS of the per-structure centroid residuals after the
       alignment plus the mean difference of equivalent-sphere radii (both mm).
    4. The ``refine`` best candidates are re-ranked by the symmetric mean surface distance (mm)
       of the available structures after alignment (k-d trees on the boundary samples), averaged
       over structures; the smallest wins (ties: the first case in the list).

Pasting
    The chosen case's label map is resampled into the test image's own grid in physical space:
    each test voxel centre ``p`` takes the label at ``p - t`` in the training image (nearest
    voxel). Only the structures to complete are pasted, and only into background voxels: given
    voxels are kept (the same no-overlap fusion as the model's completion). With
    ``replace=True`` (the ``full`` reconstruction scenario) every requested structure comes from
    the training case and the given ones are dropped.

A case that is itself in the training set finds itself (distance 0, ``t = 0``) and gets back
exactly its own structures. ``heart-eval`` excludes the test case's own file from the
candidates, so a test set that overlaps the training folder cannot leak.

>>> from HeartCompletionLib.io.synthetic import synthetic_label_map
>>> cases = [synthetic_label_map(seed=s, spacing_mm=3.0) for s in (0, 1)]
>>> baseline = NearestCaseBaseline.from_label_maps(cases, case_ids=["a", "b"])
>>> result = baseline.complete(cases[1], input_labels=[1, 2, 3], structures=[8])
>>> result.case_id, result.distance_mm
('b', 0.0)
"""

from __future__ import annotations

import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from HeartCompletionLib.atomic_io import atomic_open
from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.affine import ijk_to_ras_points, ras_to_ijk_points
from HeartCompletionLib.io.labelmap import LabelMap

#: bump when the descriptor definition changes (stale caches are then rebuilt)
DESCRIPTOR_VERSION = 1


class BaselineError(HeartCompletionError, ValueError):
    """No training case can complete the request (message says which structures are lacking)."""


@dataclass
class StructureDescriptor:
    """One structure of one case: centroid (RAS mm), volume (mm^3), boundary samples (RAS mm)."""

    centroid_mm: np.ndarray
    volume_mm3: float
    surface_mm: np.ndarray
    _tree: cKDTree | None = field(default=None, repr=False)

    @property
    def radius_mm(self) -> float:
        """Radius of the sphere with the same volume."""
        return float((3.0 * self.volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0))

    @property
    def tree(self) -> cKDTree:
        if self._tree is None:
            self._tree = cKDTree(self.surface_mm)
        return self._tree


@dataclass
class CaseDescriptor:
    """A training (or test) case: its id, where to reload it from, and its structures."""

    case_id: str
    structures: dict
    source: Path | None = None

    @property
    def labels(self) -> list[int]:
        return sorted(self.structures)


def describe_label_map(label_map: LabelMap, case_id: str, labels: Iterable[int] | None = None,
                       surface_points: int = 400, source: Path | None = None) -> CaseDescriptor:
    """Descriptor of ``label_map`` for the given labels (default: all present), in RAS mm.

    Works on each structure's bounding box only, so CT-sized grids stay cheap.
    """
    wanted = set(label_map.present_labels()) if labels is None else {int(v) for v in labels}
    voxel_mm3 = label_map.voxel_volume_mm3
    boxes = ndimage.find_objects(np.where(np.isin(label_map.labels, list(wanted)), label_map.labels, 0))
    structures = {}
    for index, box in enumerate(boxes):
        label = index + 1
        if box is None or label not in wanted:
            continue
        # pad the box by one voxel so the boundary test sees the outside of the structure
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        offset = np.array([s.start for s in box], dtype=np.float64)
        mask = label_map.labels[box] == label
        border = mask & ~ndimage.binary_erosion(mask, border_value=0)
        border_ijk = np.argwhere(border).astype(np.float64) + offset
        if len(border_ijk) > surface_points:
            # fixed subsample (same case -> same points, every run)
            pick = np.random.default_rng(label).choice(len(border_ijk), surface_points, replace=False)
            border_ijk = border_ijk[np.sort(pick)]
        centroid_ijk = np.argwhere(mask).mean(axis=0) + offset
        structures[label] = StructureDescriptor(
            centroid_mm=ijk_to_ras_points(centroid_ijk[None, :], label_map.ijk_to_ras)[0],
            volume_mm3=float(mask.sum()) * voxel_mm3,
            surface_mm=ijk_to_ras_points(border_ijk, label_map.ijk_to_ras),
        )
    return CaseDescriptor(case_id=case_id, structures=structures, source=source)


def _file_key(path: Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def save_descriptor_cache(path: Path, cases: Sequence[CaseDescriptor]) -> Path:
    """Descriptors of file-backed cases as one ``.npz`` (JSON index + surface arrays), written atomically."""
    path = Path(path)
    index, arrays = [], {}
    for i, case in enumerate(cases):
        if case.source is None:
            continue
        entry = {"key": _file_key(case.source), "structures": {}}
        for label, d in case.structures.items():
            entry["structures"][str(label)] = {"centroid_mm": d.centroid_mm.tolist(), "volume_mm3": d.volume_mm3}
            arrays[f"s{i}_{label}"] = d.surface_mm.astype(np.float32)
            entry["structures"][str(label)]["array"] = f"s{i}_{label}"
        index.append(entry)
    with atomic_open(path, "wb") as handle:
        np.savez(handle, index=np.array(json.dumps({"version": DESCRIPTOR_VERSION, "cases": index})), **arrays)
    return path


def load_descriptor_cache(path: Path) -> dict:
    """``{file key: CaseDescriptor}`` from :func:`save_descriptor_cache`; empty when absent or stale."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            index = json.loads(str(npz["index"]))
            if index.get("version") != DESCRIPTOR_VERSION:
                return {}
            out = {}
            for entry in index["cases"]:
                structures = {
                    int(label): StructureDescriptor(np.asarray(s["centroid_mm"], dtype=np.float64), float(s["volume_mm3"]),
                                                    npz[s["array"]].astype(np.float64))
                    for label, s in entry["structures"].items()
                }
                out[entry["key"]] = CaseDescriptor("", structures)
            return out
    except (OSError, ValueError, KeyError, json.JSONDecodeError, zipfile.BadZipFile):
        return {}  # a damaged cache is rebuilt, never trusted


@dataclass
class BaselineResult:
    """The pasted completion (test image geometry) and which training case it came from."""

    label_map: LabelMap
    case_id: str
    translation_mm: np.ndarray
    distance_mm: float
    completed_labels: list


def _translation(test: CaseDescriptor, train: CaseDescriptor, labels: Sequence[int]) -> np.ndarray:
    """``t`` (mm) moving ``train`` onto ``test``: difference of the mean per-structure centroids."""
    test_c = np.mean([test.structures[v].centroid_mm for v in labels], axis=0)
    train_c = np.mean([train.structures[v].centroid_mm for v in labels], axis=0)
    return test_c - train_c


def _coarse_score(test: CaseDescriptor, train: CaseDescriptor, labels: Sequence[int], t: np.ndarray) -> float:
    residual = [test.structures[v].centroid_mm - (train.structures[v].centroid_mm + t) for v in labels]
    rms = float(np.sqrt(np.mean(np.sum(np.square(residual), axis=1))))
    radius = float(np.mean([abs(test.structures[v].radius_mm - train.structures[v].radius_mm) for v in labels]))
    return rms + radius


def _surface_score(test: CaseDescriptor, train: CaseDescriptor, labels: Sequence[int], t: np.ndarray) -> float:
    """Symmetric mean surface distance (mm) after translating ``train`` by ``t``, mean over structures."""
    scores = []
    for v in labels:
        a, b = test.structures[v], train.structures[v]
        d_ab = b.tree.query(a.surface_mm - t)[0].mean()  # test points into the (untranslated) train tree
        d_ba = a.tree.query(b.surface_mm + t)[0].mean()
        scores.append(0.5 * (d_ab + d_ba))
    return float(np.mean(scores))


class NearestCaseBaseline:
    """Nearest training case aligned on the available structures; its missing structures pasted.

    Build it from label maps in memory (:meth:`from_label_maps`) or from files
    (:meth:`from_paths`, which keeps only descriptors and reloads the chosen case's label map on
    demand, a few of them cached).
    """

    def __init__(self, cases: Sequence[CaseDescriptor], label_maps: dict | None = None,
                 loader: Callable[[Path], LabelMap] | None = None, refine: int = 16, cache_size: int = 4):
        if not cases:
            raise BaselineError("the nearest-case baseline needs at least one training case")
        self.cases = list(cases)
        self._label_maps = dict(label_maps or {})
        self._loader = loader
        self._cache: OrderedDict = OrderedDict()
        self.refine = int(refine)
        self.cache_size = int(cache_size)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_label_maps(cls, label_maps: Sequence[LabelMap], case_ids: Sequence[str] | None = None,
                        **kwargs) -> NearestCaseBaseline:
        case_ids = list(case_ids) if case_ids is not None else [f"case_{i:04d}" for i in range(len(label_maps))]
        cases = [describe_label_map(lm, cid) for lm, cid in zip(label_maps, case_ids)]
        return cls(cases, label_maps=dict(zip(case_ids, label_maps)), **kwargs)

    @classmethod
    def from_paths(cls, paths: Sequence[Path], loader: Callable[[Path], LabelMap], case_ids=None,
                   progress: bool = True, cache_path: Path | None = None, **kwargs) -> NearestCaseBaseline:
        """Describe every training label map (``loader(path) -> LabelMap``); a tqdm bar shows progress.

        ``cache_path``: an ``.npz`` of descriptors reused for files whose path, size and
        modification time are unchanged (reading ~1,000 CT label maps takes a while) and
        rewritten (atomically) with the current set.
        """
        from tqdm import tqdm

        paths = [Path(p) for p in paths]
        case_ids = list(case_ids) if case_ids is not None else [p.name for p in paths]
        cached = load_descriptor_cache(cache_path) if cache_path else {}
        cases = []
        for path, cid in tqdm(list(zip(paths, case_ids)), desc="baseline: describing training cases",
                              unit="case", disable=not progress):
            hit = cached.get(_file_key(path))
            if hit is not None:
                cases.append(CaseDescriptor(cid, hit.structures, source=path))
            else:
                cases.append(describe_label_map(loader(path), cid, source=path))
        if cache_path:
            save_descriptor_cache(cache_path, cases)
        return cls(cases, loader=loader, **kwargs)

    def label_map_of(self, case: CaseDescriptor) -> LabelMap:
        if case.case_id in self._label_maps:
            return self._label_maps[case.case_id]
        if case.case_id in self._cache:
            self._cache.move_to_end(case.case_id)
            return self._cache[case.case_id]
        if self._loader is None or case.source is None:
            raise BaselineError(f"training case {case.case_id!r} has no label map to paste from")
        label_map = self._loader(case.source)
        self._cache[case.case_id] = label_map
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return label_map

    # --- matching -----------------------------------------------------------------------
    def find_nearest(self, test: CaseDescriptor, input_labels: Sequence[int], needed_labels: Sequence[int],
                     exclude: Iterable = ()) -> tuple[CaseDescriptor, np.ndarray, float]:
        """``(training case, translation t in mm, surface distance in mm)`` for the best match.

        Candidates must hold every ``needed_labels`` structure and share at least one input
        structure; those sharing more input structures rank first. ``exclude`` holds case ids
        or source paths that must not be used (the test case itself).
        """
        excluded = {str(e) for e in exclude}
        inputs = [int(v) for v in input_labels if int(v) in test.structures]
        if not inputs:
            raise BaselineError(f"case {test.case_id!r}: none of the input structures {list(input_labels)} is present")
        ranked = []
        for order, case in enumerate(self.cases):
            if case.case_id in excluded or (case.source is not None and str(case.source) in excluded):
                continue
            if not set(needed_labels) <= set(case.structures):
                continue
            common = [v for v in inputs if v in case.structures]
            if not common:
                continue
            t = _translation(test, case, common)
            ranked.append((-len(common), _coarse_score(test, case, common, t), order, case, common, t))
        if not ranked:
            raise BaselineError(
                f"case {test.case_id!r}: no training case holds structures {sorted(needed_labels)} "
                f"together with any of the inputs {inputs}"
            )
        ranked.sort(key=lambda r: r[:3])
        best_common = ranked[0][0]
        shortlist = [r for r in ranked if r[0] == best_common][: max(self.refine, 1)]
        scored = [(_surface_score(test, case, common, t), order, case, t) for _, _, order, case, common, t in shortlist]
        distance, _, case, t = min(scored, key=lambda s: s[:2])
        return case, t, distance

    # --- completion ---------------------------------------------------------------------
    def complete(self, label_map: LabelMap, input_labels: Sequence[int], structures: Sequence[int],
                 replace: bool = False, exclude: Iterable = (), case_id: str = "test") -> BaselineResult:
        """Complete ``label_map`` (holding the input structures) with ``structures`` pasted from
        the nearest training case; the result is in ``label_map``'s geometry."""
        input_labels = [int(v) for v in input_labels]
        structures = sorted({int(v) for v in structures})
        test = describe_label_map(label_map, case_id, labels=input_labels)
        case, t, distance = self.find_nearest(test, input_labels, structures, exclude)
        pasted = paste_structures(self.label_map_of(case), label_map, structures, t)
        if replace:
            out = pasted
        else:
            # given voxels are kept; pasted structures only fill background
            out = np.where(label_map.labels > 0, label_map.labels, pasted).astype(label_map.labels.dtype)
        result = LabelMap(out, label_map.ijk_to_ras.copy(), source=label_map.source, metadata={"baseline": case.case_id})
        return BaselineResult(result, case.case_id, t, distance, structures)


def paste_structures(source: LabelMap, target: LabelMap, labels: Sequence[int], translation_mm) -> np.ndarray:
    """Labels ``labels`` of ``source`` moved by ``translation_mm`` (RAS) and resampled (nearest
    voxel) into ``target``'s grid; an int array of ``target``'s shape, 0 elsewhere.

    Only the bounding box of the moved structures in the target grid is visited, one slab of
    constant first index at a time (memory bounded on CT-sized grids).
    """
    t = np.asarray(translation_mm, dtype=np.float64)
    out = np.zeros(target.shape, dtype=target.labels.dtype)
    selected = np.isin(source.labels, list(labels))
    if not selected.any():
        return out
    extent = [np.flatnonzero(selected.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.array([e[0] for e in extent])
    hi = np.array([e[-1] for e in extent])
    # the source cropped to the moved structures; everything else reads as background
    crop = np.where(selected, source.labels, 0)[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    corners = np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5)
                        for c in (lo[2] - 0.5, hi[2] + 0.5)])
    corners_target = ras_to_ijk_points(ijk_to_ras_points(corners, source.ijk_to_ras) + t, target.ijk_to_ras)
    start = np.clip(np.floor(corners_target.min(axis=0)).astype(int), 0, target.shape)
    stop = np.clip(np.ceil(corners_target.max(axis=0)).astype(int) + 1, 0, target.shape)
    if np.any(stop <= start):
        return out  # the moved structures fall outside the test image
    # target ijk -> RAS -> minus t -> source ijk, relative to the crop: one affine map
    shift = np.eye(4)
    shift[:3, 3] = -t
    to_source = np.linalg.inv(source.ijk_to_ras) @ shift @ target.ijk_to_ras
    to_source[:3, 3] -= lo
    j = np.arange(start[1], stop[1], dtype=np.float64)[:, None]
    k = np.arange(start[2], stop[2], dtype=np.float64)[None, :]
    in_plane = [to_source[r, 1] * j + to_source[r, 2] * k + to_source[r, 3] for r in range(3)]
    for i in range(start[0], stop[0]):
        idx = [np.rint(in_plane[r] + to_source[r, 0] * i).astype(np.int64) for r in range(3)]
        inside = np.ones(idx[0].shape, dtype=bool)
        for r in range(3):
            inside &= (idx[r] >= 0) & (idx[r] < crop.shape[r])
        slab = np.zeros(idx[0].shape, dtype=out.dtype)
        slab[inside] = crop[idx[0][inside], idx[1][inside], idx[2][inside]]
        out[i, start[1]:stop[1], start[2]:stop[2]] = slab
    return out
