"""``heart-prepare --check DIR``: validate a prepared dataset before it wastes a GPU-day.

Every ``.npz`` under ``DIR`` is checked against the rules below; every offending case is printed
with all its reasons and the exit code is non-zero. Units are checked by physics, not by
trusting metadata: a signed distance field in mm has slope 1 against points in mm, so distances
stored in voxels (on a grid that is not 1 mm) or divided by 100 fail whatever the file claims.

Rules (``K`` = number of structures, all lengths in mm):

- format: the keys, dtypes and shapes of :data:`.case_format.REQUIRED_KEYS`; K agrees across
  arrays, with the ``meta`` table and with the other cases of the folder;
- finite points, origin and unit normals; surface labels in 0..K-1 and only of annotated structures;
- the ``sdf`` columns of annotated structures are finite, those of the others are all NaN;
- point counts at least ``--min_surface/--min_volume/--min_near`` and at least
  ``--min_surface_per_structure`` surface samples of every annotated structure;
- units: surface samples span a plausible heart (20..600 mm per axis) and every point lies within
  600 mm of ``origin_mm`` (points are stored relative to it); the median near-surface
  distance to the sampled structure lies in 0.2..20 mm; the 90th percentile of
  ``|d(p) - d(q)| / |p - q|`` over neighbouring volume points is 0.7..1.2 (ideal 0.9);
- volume points cover the surface samples; near points lie around the surface samples of their own
  structure (median distance at most 6 mm);
- sign: the sign of near-point distances agrees with the stored outward normals (the side of the
  nearest surface sample) for more than 75 % of the points (distances positive inside fail);
  every annotated structure has negative and positive distances among volume+near points,
  and a near point is no farther from its own structure than its offset from the surface sample
  it was drawn around (plus half a voxel), for 99 % of the points within 8 mm of their sample
  (``near_labels``/``near_offset_mm``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from HeartCompletionLib.errors import ExitCode

from .case_format import OPTIONAL_KEYS, REQUIRED_KEYS, CaseFormatError, load_case, read_manifest


@dataclass(frozen=True)
class CheckLimits:
    """Thresholds of the rules (counts per case, lengths in mm)."""

    min_surface: int = 100_000
    min_volume: int = 100_000
    min_near: int = 100_000
    min_surface_per_structure: int = 50
    extent_mm: tuple[float, float] = (20.0, 600.0)
    max_point_mm: float = 600.0
    near_gap_mm: float = 6.0
    near_median_mm: tuple[float, float] = (0.2, 20.0)
    slope_p90: tuple[float, float] = (0.7, 1.2)
    max_near_violations: float = 0.01
    near_offset_checked_mm: float = 8.0


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--check`` options (shared with ``heart-prepare``'s parser)."""
    limits = CheckLimits()
    group = parser.add_argument_group("--check options")
    group.add_argument("--min_surface", type=int, default=limits.min_surface, help="minimum surface samples per case")
    group.add_argument("--min_volume", type=int, default=limits.min_volume, help="minimum volume points per case")
    group.add_argument("--min_near", type=int, default=limits.min_near, help="minimum near-surface points per case")
    group.add_argument("--min_samples_per_structure", type=int, default=limits.min_surface_per_structure,
                       help="minimum surface samples of each annotated structure")


def check_case(path, limits: CheckLimits | None = None) -> list[str]:
    """Problems of one prepared case (empty list = valid). Never raises for a bad file."""
    limits = limits or CheckLimits()
    try:
        case = load_case(path, optional=OPTIONAL_KEYS)
    except CaseFormatError as exc:
        return [str(exc).replace(f"{path}: ", "", 1)]
    problems = _check_format(case)
    if problems:  # the other rules index arrays by these shapes
        return problems
    return _check_values(case, limits)


def _check_format(case: dict) -> list[str]:
    problems = []
    for key, (dtype, _) in REQUIRED_KEYS.items():
        if key != "meta" and case[key].dtype != np.dtype(dtype):
            problems.append(f"{key} has dtype {case[key].dtype}, expected {np.dtype(dtype)}")
    K = case["annotated"].shape[0] if case["annotated"].ndim == 1 else -1
    ns, nv, nn = (case[k].shape[0] if case[k].ndim else -1 for k in ("surface_points", "volume_points", "near_points"))
    expected = {
        "origin_mm": (3,), "surface_points": (ns, 3), "surface_normals": (ns, 3), "surface_labels": (ns,),
        "volume_points": (nv, 3), "volume_sdf": (nv, K), "near_points": (nn, 3), "near_sdf": (nn, K),
        "annotated": (K,), "truncated": (K,), "near_labels": (nn,), "near_offset_mm": (nn,),
    }
    for key, shape in expected.items():
        if key in case and tuple(case[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(case[key].shape)}, expected {shape}")
    table = case["meta"].get("table")
    if table is not None and len(table) != K:
        problems.append(f"meta lists {len(table)} structures but the arrays have K={K}")
    return problems


def _check_values(case: dict, limits: CheckLimits) -> list[str]:
    problems: list[str] = []
    meta = case["meta"]
    annotated = case["annotated"]
    K = len(annotated)
    names = meta.get("table") or [f"structure {k}" for k in range(K)]
    for key in ("origin_mm", "surface_points", "surface_normals", "volume_points", "near_points"):
        if not np.all(np.isfinite(case[key])):
            problems.append(f"{key} holds NaN/inf")
    lengths = np.linalg.norm(case["surface_normals"], axis=1)
    if np.mean(np.abs(lengths - 1) > 1e-2) > 1e-3:
        problems.append("surface_normals are not unit vectors")
    labels = case["surface_labels"].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= K):
        problems.append(f"surface_labels outside 0..{K - 1}")
        return problems
    counts = np.bincount(labels, minlength=K)
    for k in range(K):
        if counts[k] and not annotated[k]:
            problems.append(f"{names[k]} has surface samples but is not annotated")
        if annotated[k] and counts[k] < limits.min_surface_per_structure:
            problems.append(f"{names[k]} is annotated but has {counts[k]} surface samples (< {limits.min_surface_per_structure})")
    for key, minimum in (("surface_points", limits.min_surface), ("volume_points", limits.min_volume),
                         ("near_points", limits.min_near)):
        if len(case[key]) < minimum:
            problems.append(f"{key}: {len(case[key])} points, fewer than the minimum {minimum}")
    for key in ("volume_sdf", "near_sdf"):
        sdf = case[key]
        for k in range(K):
            column = sdf[:, k]
            if annotated[k] and not np.all(np.isfinite(column)):
                problems.append(f"{key}[{names[k]}] is annotated but holds {np.count_nonzero(~np.isfinite(column))} NaN/inf")
            if not annotated[k] and not np.all(np.isnan(column)):
                problems.append(f"{key}[{names[k]}] is not annotated but holds {np.count_nonzero(~np.isnan(column))} values (expected NaN)")
    if problems or not annotated.any() or not len(case["surface_points"]):
        return problems
    return problems + _check_units_and_sign(case, limits, names)


def _check_units_and_sign(case: dict, limits: CheckLimits, names: list[str]) -> list[str]:
    problems = []
    annotated = case["annotated"]
    surface = case["surface_points"].astype(np.float64)
    extent = surface.max(axis=0) - surface.min(axis=0)
    lo, hi = limits.extent_mm
    if extent.max() < lo or extent.max() > hi:
        problems.append(f"surface samples span {np.round(extent, 2).tolist()} mm: not a heart in mm (expected {lo:g}..{hi:g} mm)")
    farthest = max(float(np.abs(case[k]).max(initial=0.0)) for k in ("surface_points", "volume_points", "near_points"))
    if farthest > limits.max_point_mm:
        problems.append(f"a point lies {farthest:.4g} mm from origin_mm (limit {limits.max_point_mm:g} mm): "
                        "points not relative to origin_mm, or not in mm")
    volume = case["volume_points"]
    if len(volume):
        lo, hi = volume.min(axis=0) - 1.0, volume.max(axis=0) + 1.0
        outside = float(np.mean(np.any((surface < lo) | (surface > hi), axis=1)))
        if outside > 0.01:
            problems.append(f"{100 * outside:.1f} % of the surface samples lie outside the box of the volume points: "
                            "volume points not around the heart, or in another frame")
    near_sdf, near = case["near_sdf"], case["near_points"]
    if "near_labels" in case and len(near):
        gap = _median_gap_to_own_surface(surface, case["surface_labels"], near, case["near_labels"])
        if gap > limits.near_gap_mm:
            problems.append(f"near points lie a median {gap:.3g} mm from the surface samples (limit "
                            f"{limits.near_gap_mm:g} mm): not drawn around the surface, or in another frame")
    if "near_labels" in case and len(near):
        own = np.abs(near_sdf[np.arange(len(near)), case["near_labels"].astype(np.int64)])
    else:
        own = np.nanmin(np.abs(near_sdf[:, annotated]), axis=1) if len(near) else np.zeros(0)
    own = own[np.isfinite(own)]
    if own.size:
        median = float(np.median(own))
        lo, hi = limits.near_median_mm
        if not lo <= median <= hi:
            problems.append(f"median near-surface |sdf| is {median:.4g} mm (expected {lo:g}..{hi:g} mm): distances in the wrong units?")
    slope = volume_sdf_slope(case["volume_points"], case["volume_sdf"][:, annotated])
    if slope is not None and not limits.slope_p90[0] <= slope <= limits.slope_p90[1]:
        problems.append(f"|d(p)-d(q)|/|p-q| of neighbouring volume points is {slope:.3g} at the 90th percentile "
                        f"(a distance in mm gives ~0.9): distances and points are in different units")
    if len(near):
        labels = (case["near_labels"].astype(np.int64) if "near_labels" in case
                  else np.flatnonzero(annotated)[np.nanargmin(np.abs(near_sdf[:, annotated]), axis=1)])
        signed_own = near_sdf[np.arange(len(near)), labels]
        problem = sign_problem(sign_agreement(surface, case["surface_normals"].astype(np.float64),
                                              case["surface_labels"], near, signed_own, labels))
        if problem:
            problems.append(problem)
    both = np.concatenate([case["volume_sdf"], near_sdf])
    for k in np.flatnonzero(annotated):
        if not (both[:, k] < 0).any() or not (both[:, k] > 0).any():
            problems.append(f"{names[k]}: no inside/outside balance (negative {int((both[:, k] < 0).sum())}, "
                            f"positive {int((both[:, k] > 0).sum())} of {len(both)} points)")
    if "near_labels" in case and "near_offset_mm" in case and len(near):
        half_voxel = 0.5 * float(max(case["meta"].get("spacing_mm") or [1.0]))
        offset = case["near_offset_mm"]
        # within a few mm of the surface (distances far out may come from a coarser tier)
        close = offset <= limits.near_offset_checked_mm
        d = np.abs(near_sdf[np.flatnonzero(close), case["near_labels"][close].astype(np.int64)])
        bad = float(np.mean(d > offset[close] + half_voxel + 0.05)) if close.any() else 0.0
        if bad > limits.max_near_violations:
            problems.append(f"{100 * bad:.1f} % of near points are farther from their structure than from the surface "
                            f"sample they were drawn around: surface samples and distances disagree")
    return problems


#: at least this fraction of near points must lie on the side of the surface their sign says
MIN_SIGN_AGREEMENT = 0.75


def sign_agreement(surface, normals, surface_labels, points, own_sdf, point_labels, max_points: int = 20_000,
                   min_side_mm: float = 0.5, max_gap_mm: float = 6.0) -> float | None:
    """Fraction of points whose distance sign agrees with the stored outward normals.

    For each point the nearest surface sample of its own structure gives the side
    ``(p - s) . n`` (positive outside); a correct SDF is positive outside, so the signs agree for
    nearly every point clearly off the surface (~0.95+); distances stored with the wrong sign
    (positive inside) agree for almost none. ``None`` when too few points are usable.
    """
    from scipy.spatial import cKDTree

    step = max(1, len(points) // max_points)
    points, own_sdf = np.asarray(points[::step], np.float64), np.asarray(own_sdf[::step], np.float64)
    point_labels = np.asarray(point_labels[::step]).astype(np.int64)
    surface_labels = np.asarray(surface_labels).astype(np.int64)
    agree = total = 0
    for k in np.unique(point_labels):
        own = surface_labels == k
        sel = (point_labels == k) & np.isfinite(own_sdf)
        if own.sum() < 10 or not sel.any():
            continue
        gap, idx = cKDTree(surface[own]).query(points[sel])
        side = np.einsum("ij,ij->i", points[sel] - surface[own][idx], normals[own][idx])
        usable = (np.abs(side) > min_side_mm) & (gap < max_gap_mm) & (np.abs(own_sdf[sel]) > min_side_mm)
        agree += int(np.count_nonzero(np.sign(side[usable]) == np.sign(own_sdf[sel][usable])))
        total += int(usable.sum())
    return agree / total if total >= 20 else None


def sign_problem(agreement: float | None) -> str | None:
    """The message for a :func:`sign_agreement` below :data:`MIN_SIGN_AGREEMENT` (None: fine)."""
    if agreement is None or agreement >= MIN_SIGN_AGREEMENT:
        return None
    return (f"the sign of the distances agrees with the outward surface normals for only {100 * agreement:.0f} % of "
            f"the near points (expected > {100 * MIN_SIGN_AGREEMENT:.0f} %): distances stored positive inside "
            "(sign flipped), or normals pointing inwards")


def _median_gap_to_own_surface(surface, surface_labels, near, near_labels, max_points: int = 20_000) -> float:
    """Median distance (mm) from near points to the nearest surface sample of their own structure."""
    from scipy.spatial import cKDTree

    step = max(1, len(near) // max_points)
    near, near_labels = near[::step], near_labels[::step].astype(np.int64)
    gaps = np.full(len(near), np.inf)
    for k in np.unique(near_labels):
        own = surface[surface_labels == k]
        if len(own):
            gaps[near_labels == k] = cKDTree(own).query(near[near_labels == k])[0]
    return float(np.median(gaps))


def volume_sdf_slope(points: np.ndarray, sdf: np.ndarray, max_points: int = 20_000) -> float | None:
    """90th percentile of ``|d(p) - d(q)| / |p - q|`` over nearest-neighbour pairs of points.

    A signed distance field has gradient norm 1, so along random directions the ratio is
    ``|cos theta|`` (uniform on 0..1 in 3-D): 0.9 at the 90th percentile when ``d`` and ``p`` share
    units. ``None`` when there are too few points.
    """
    from scipy.spatial import cKDTree

    if len(points) < 100 or sdf.shape[1] == 0:
        return None
    step = max(1, len(points) // max_points)
    pts, values = points[::step].astype(np.float64), sdf[::step].astype(np.float64)
    _, idx = cKDTree(pts).query(pts, k=2)
    gap = np.linalg.norm(pts - pts[idx[:, 1]], axis=1)
    keep = gap > 1e-6
    ratio = np.abs(values[keep] - values[idx[keep, 1]]) / gap[keep, None]
    ratio = ratio[np.isfinite(ratio)]
    return float(np.percentile(ratio, 90)) if ratio.size else None


def find_cases(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*.npz")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data_dir).parts))


def check_dataset(data_dir, limits: CheckLimits | None = None, progress: bool = True) -> dict[str, list[str]]:
    """``{case path: problems}`` for every ``.npz`` under ``data_dir`` (valid cases map to ``[]``)."""
    from tqdm import tqdm

    data_dir = Path(data_dir)
    results: dict[str, list[str]] = {}
    tables: dict[str, tuple] = {}
    for path in tqdm(find_cases(data_dir), desc="heart-prepare --check", unit="case", disable=not progress):
        results[str(path)] = check_case(path, limits)
        try:
            tables[str(path)] = tuple(load_case(path, keys=[])["meta"].get("table") or ())
        except CaseFormatError:
            pass
    if tables:  # a dataset mixes cases of one structure table only
        common, _ = Counter(tables.values()).most_common(1)[0]
        for path, table in tables.items():
            if table != common:
                results[path].append(f"structure table {list(table)} differs from the rest of the dataset {list(common)}")
    return results


def run_check_cli(args: argparse.Namespace) -> int:
    data_dir = Path(args.check)
    if not data_dir.is_dir():
        print(f"heart-prepare --check: error: {data_dir}: no such folder", file=sys.stderr)
        return ExitCode.USAGE
    limits = CheckLimits(min_surface=args.min_surface, min_volume=args.min_volume, min_near=args.min_near,
                         min_surface_per_structure=args.min_samples_per_structure)
    results = check_dataset(data_dir, limits, progress=not getattr(args, "quiet", False))
    if not results:
        print(f"heart-prepare --check: error: {data_dir}: no .npz cases", file=sys.stderr)
        return ExitCode.USAGE
    manifest = read_manifest(data_dir) or {}
    for entry in manifest.get("cases", []):
        if entry.get("status") != "ok":  # reported, but the prepared cases may still be fine to train on
            print(f"note: {entry['case']} was not converted: {entry.get('reason')}")
    bad = {path: problems for path, problems in results.items() if problems}
    for path, problems in bad.items():
        print(f"FAIL {path}")
        for problem in problems:
            print(f"  - {problem}")
    print(f"heart-prepare --check: {len(results) - len(bad)} of {len(results)} cases pass" + (
        f", {len(bad)} fail" if bad else ""))
    return ExitCode.FAILED if bad else ExitCode.OK
