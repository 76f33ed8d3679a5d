"""The data gate: checks a sample of the training data before a GPU-day is spent on it.

``heart-train`` refuses to start (:class:`DataGateError`, exit status 2) when a checked case has

- non-finite points or annotated distances;
- implausible units: the heart's extent must be tens of millimetres (not metres, not network
  units), near-surface |sdf| a few mm, and — the check that catches distances in voxels next to
  points in mm — the |sdf| of a near point to its closest structure must equal its distance to
  the closest surface sample of that structure (ratio ~1);
- no inside/outside balance (all distances of one sign, e.g. unsigned distances);

and when the first batch's loss with the zero-initialised output layer differs from the mean
|normalised target| computed independently from the data (or that mean is implausible).
"""

from __future__ import annotations

import numpy as np
import torch

from HeartCompletionLib.errors import HeartCompletionError

from .case_format import load_case
from .dataset import QUERY_NEAR, QUERY_VOLUME, CaseRef

#: plausible ranges (mm); generous, the point is to catch unit errors (x10, x0.01, voxels)
EXTENT_RANGE_MM = (30.0, 600.0)
NEAR_MEDIAN_RANGE_MM = (0.05, 15.0)
RATIO_RANGE = (0.75, 1.33)
INSIDE_FRACTION_RANGE = (0.02, 0.98)


class DataGateError(HeartCompletionError, RuntimeError):
    """The training data failed the gate; the message lists every problem found."""


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

    # unit consistency of distances vs points: |sdf| ~ distance to the nearest surface sample
    ann_idx = np.flatnonzero(annotated)
    ratios = []
    for j, s in enumerate(ann_idx):
        pts = surface[labels == s]
        sel = closest == j
        if len(pts) < 10 or sel.sum() < 5:
            continue
        dist, _ = cKDTree(pts).query(near[sel])
        ok = dist > 1.0  # well above the sample spacing, so the sample distance is accurate
        if ok.sum() >= 5:
            ratios.append(np.abs(sdf[sel, j][ok]) / dist[ok])
    if ratios:
        ratio = float(np.median(np.concatenate(ratios)))
        if not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            problems.append(
                f"{where}: |sdf| is {ratio:.3g} x the distance to the nearest surface sample (expected 1): "
                "distances and points are in different units (voxels vs mm?)"
            )

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


def run_case_checks(refs: list[CaseRef], max_cases: int, seed: int = 0) -> list[str]:
    """Check up to ``max_cases`` cases spread over the list; returns all problems found."""
    if not refs:
        return ["no training cases"]
    pick = np.unique(np.linspace(0, len(refs) - 1, num=min(max_cases, len(refs))).round().astype(int))
    problems = []
    for i in pick:
        try:
            problems.extend(check_case(refs[int(i)], seed=seed))
        except (ValueError, OSError) as exc:
            problems.append(str(exc))
    return problems


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
