"""The data gate: checks every training case before a GPU-day is spent on it.

Every case is checked once (in parallel threads; ~0.4 s per case, nothing next to training): the
verdict is cached by the file's SHA-256 (``run.gate_cache_dir``, default
``$HEARTCOMPLETION_CACHE_DIR`` or ``~/.cache/heartcompletion``, then ``data_gate/``), so a second
run on the same data only hashes the files. ``heart-train`` refuses to start
(:class:`DataGateError`, exit status 2) when a case has

- non-finite points or annotated distances;
- implausible units: the heart's extent must be tens of millimetres (not metres, not network
  units), near-surface |sdf| a few mm, and — the check that catches distances in voxels next to
  points in mm — the |sdf| of a volume point to its closest structure must equal its distance to
  the closest surface sample of that structure (ratio ~1), beyond one voxel of the samples;
- no inside/outside balance (all distances of one sign, e.g. unsigned distances);
- distances whose sign disagrees with the stored outward normals (positive inside);

and when the first batch's loss with the zero-initialised output layer differs from the mean
|normalised target| computed independently from the data (or that mean is implausible).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from HeartCompletionLib.errors import HeartCompletionError

from .case_format import load_case
from .dataset import QUERY_NEAR, QUERY_VOLUME, CaseRef
from .dataset_check import sign_agreement, sign_problem

#: plausible ranges (mm); generous, the point is to catch unit errors (x10, x0.01, voxels)
EXTENT_RANGE_MM = (30.0, 600.0)
NEAR_MEDIAN_RANGE_MM = (0.05, 15.0)
RATIO_RANGE = (0.75, 1.33)
INSIDE_FRACTION_RANGE = (0.02, 0.98)


class DataGateError(HeartCompletionError, RuntimeError):
    """The training data failed the gate; the message lists every problem found."""


def _largest_spacing_mm(case) -> float:
    """The largest voxel spacing of the case's source label map (its meta; 1 mm when unknown)."""
    try:
        spacing = json.loads(str(case["meta"])).get("spacing_mm") or [1.0]
        return float(max(float(v) for v in spacing))
    except (KeyError, TypeError, ValueError):
        return 1.0


def check_case(ref: CaseRef, num_checked_points: int = 2000, seed: int = 0) -> list[str]:
    """Problems of one prepared case (empty list: fine). Messages start with the file."""
    from scipy.spatial import cKDTree

    case = load_case(ref.path)
    where = str(ref.path)
    problems = []
    annotated = case["annotated"].astype(bool)
    if not annotated.any():
        return [f"{where}: no structure is annotated"]
    for key in ("surface_points", "volume_points", "near_points", "origin_mm"):
        if not np.all(np.isfinite(case[key])):
            problems.append(f"{where}: {key} has non-finite values")
    for key in ("volume_sdf", "near_sdf"):
        bad = ~np.isfinite(case[key][:, annotated]).all(axis=0)
        if bad.any():
            names = np.flatnonzero(annotated)[bad].tolist()
            problems.append(f"{where}: {key} has non-finite distances for annotated structure indices {names}")
    if problems:
        return problems

    surface = case["surface_points"].astype(np.float64)
    labels = case["surface_labels"].astype(np.int64)
    extent = float(np.linalg.norm(surface.max(0) - surface.min(0)))
    if not EXTENT_RANGE_MM[0] <= extent <= EXTENT_RANGE_MM[1]:
        problems.append(
            f"{where}: surface points span {extent:.3g} (diagonal); a heart spans tens of mm "
            f"(expected {EXTENT_RANGE_MM[0]:g}-{EXTENT_RANGE_MM[1]:g} mm) — points not stored in mm?"
        )

    rng = np.random.default_rng(seed)
    near = case["near_points"].astype(np.float64)
    sdf = case["near_sdf"][:, annotated].astype(np.float64)
    pick = rng.choice(len(near), size=min(num_checked_points, len(near)), replace=False)
    near, sdf = near[pick], sdf[pick]
    closest = np.argmin(np.abs(sdf), axis=1)
    d_closest = np.abs(sdf[np.arange(len(sdf)), closest])
    median_near = float(np.median(d_closest))
    if not NEAR_MEDIAN_RANGE_MM[0] <= median_near <= NEAR_MEDIAN_RANGE_MM[1]:
        problems.append(
            f"{where}: median |sdf| of near-surface points is {median_near:.3g}; expected a few mm "
            f"({NEAR_MEDIAN_RANGE_MM[0]:g}-{NEAR_MEDIAN_RANGE_MM[1]:g}) — distances not stored in mm?"
        )

    # unit consistency of distances vs points: |sdf| of a volume point to its closest structure ~ its
    # distance to that structure's nearest surface sample, compared more than one voxel (the
    # largest spacing, >= 1 mm) away from the samples. Closer in, the two differ by design on thick
    # slices: the distances are to the voxel staircase, the samples lie on a mesh that slopes between
    # slices (ACDC stacks, 10 mm: median ratio 0.75-0.81 for near points 1 mm out, 1.04-1.06 for
    # volume points beyond 10 mm; isotropic grids 1.01 either way)
    far_enough_mm = max(1.0, _largest_spacing_mm(case))
    volume = case["volume_points"].astype(np.float64)
    vol_sdf = case["volume_sdf"][:, annotated].astype(np.float64)
    pick = rng.choice(len(volume), size=min(num_checked_points, len(volume)), replace=False)
    volume, vol_sdf = volume[pick], vol_sdf[pick]
    vol_closest = np.argmin(np.abs(vol_sdf), axis=1)
    ann_idx = np.flatnonzero(annotated)
    ratios = []
    for j, s in enumerate(ann_idx):
        pts = surface[labels == s]
        sel = vol_closest == j
        if len(pts) < 10 or sel.sum() < 5:
            continue
        dist, _ = cKDTree(pts).query(volume[sel])
        ok = dist > far_enough_mm
        if ok.sum() >= 5:
            ratios.append(np.abs(vol_sdf[sel, j][ok]) / dist[ok])
    if ratios:
        ratio = float(np.median(np.concatenate(ratios)))
        if not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            problems.append(
                f"{where}: |sdf| is {ratio:.3g} x the distance to the nearest surface sample (expected 1): "
                "distances and points are in different units (voxels vs mm?)"
            )

    problem = sign_problem(sign_agreement(surface, case["surface_normals"].astype(np.float64), labels, near,
                                          sdf[np.arange(len(sdf)), closest], ann_idx[closest]))
    if problem:
        problems.append(f"{where}: {problem}")

    inside = float((sdf[np.arange(len(sdf)), closest] < 0).mean())
    if not INSIDE_FRACTION_RANGE[0] <= inside <= INSIDE_FRACTION_RANGE[1]:
        problems.append(
            f"{where}: {inside:.1%} of near-surface points are inside their closest structure; expected a "
            "balance (are distances signed, negative inside?)"
        )
    return problems


def check_first_loss(first_terms: dict, batch: dict, zero_init: bool, tolerance: float = 0.02) -> list[str]:
    """Compare the first batch's volume/near losses with the mean |target| of that batch.

    ``zero_init``: the model starts from its zero-initialised output layer (not fine-tuned), so
    its prediction is 0 and each L1 term must equal the per-sample mean |target|.
    """
    problems = []
    target, mask, kind = batch["target"].double(), batch["target_mask"], batch["query_kind"][..., None]
    for name, code in (("volume", QUERY_VOLUME), ("near", QUERY_NEAR)):
        m = (mask & (kind == code)).double()
        if m.sum() == 0:
            continue
        expected = float(((target.abs() * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)).mean())
        if not 1e-4 <= expected <= 5.0:
            problems.append(
                f"first batch: mean |{name} target| is {expected:.4g} network units (|sdf| / S); expected "
                "0.001-1 — distances not in mm, or S wrong"
            )
        if zero_init:
            got = float(first_terms[name])
            if abs(got - expected) > tolerance * max(expected, 1e-6):
                problems.append(
                    f"first batch: {name} loss {got:.5g} != mean |target| {expected:.5g} although the output "
                    "layer is zero-initialised: the loss or the target normalisation is inconsistent"
                )
    return problems


#: part of every cache key: change it when a rule or threshold changes
GATE_VERSION = 2


def default_cache_dir() -> Path:
    """``$HEARTCOMPLETION_CACHE_DIR`` or ``$XDG_CACHE_HOME/heartcompletion`` (``~/.cache/...``), then ``data_gate``."""
    root = os.environ.get("HEARTCOMPLETION_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "heartcompletion"
    return Path(root) / "data_gate"


def _verdict(ref: CaseRef, seed: int, cache_dir: Path | None) -> list[str]:
    """Problems of one case, from the cache when this content was checked before."""
    from HeartCompletionLib.atomic_io import atomic_write_text

    from .prepare import file_sha256

    where = str(ref.path)
    try:
        key = f"{file_sha256(Path(ref.path))}-v{GATE_VERSION}-s{seed}"
    except OSError as exc:
        return [f"{where}: cannot read the case ({exc})"]
    entry = None if cache_dir is None else Path(cache_dir) / f"{key}.json"
    if entry is not None and entry.is_file():
        try:
            return [f"{where}: {p}" for p in json.loads(entry.read_text(encoding="utf-8"))["problems"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is checked again
    try:
        problems = check_case(ref, seed=seed)
    except (ValueError, OSError) as exc:
        problems = [str(exc) if str(exc).startswith(where) else f"{where}: {exc}"]
    if entry is not None:
        relative = [p[len(where) + 2:] if p.startswith(where + ": ") else p for p in problems]
        try:
            atomic_write_text(entry, json.dumps({"file": where, "problems": relative}))
        except OSError:
            pass  # a read-only cache only costs the next run the check
    return problems


def run_case_checks(refs: list[CaseRef], seed: int = 0, workers: int = 0, cache_dir=None) -> list[str]:
    """Check every case (``workers`` threads, 0 = one per core up to 8); returns all problems found,
    in the order of ``refs``. ``cache_dir``: verdicts by file hash (None: no cache)."""
    from concurrent.futures import ThreadPoolExecutor

    if not refs:
        return ["no training cases"]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(refs) == 1:
        verdicts = [_verdict(ref, seed, cache_dir) for ref in refs]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(refs)), thread_name_prefix="data-gate") as pool:
            verdicts = list(pool.map(lambda ref: _verdict(ref, seed, cache_dir), refs))
    return [p for verdict in verdicts for p in verdict]


def raise_if_problems(problems: list[str]) -> None:
    if problems:
        listing = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataGateError(
            "the data gate refuses to start training:\n  - " + listing + more +
            "\nFix the data (re-run heart-prepare / heart-prepare --check) or set run.data_gate=false "
            "if you know better."
        )


def model_is_zero_output(model: torch.nn.Module, batch: dict, device: torch.device) -> bool:
    """Whether the model predicts exactly 0 on ``batch`` (its fresh zero-initialised state)."""
    with torch.no_grad():
        out = model(batch["enc_points"][:1].to(device), batch["enc_onehot"][:1].to(device),
                    batch["queries"][:1, :16].to(device))
    return bool(torch.count_nonzero(out["sdf"]) == 0)
