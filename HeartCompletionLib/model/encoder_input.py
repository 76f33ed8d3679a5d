"""What the encoder sees: the one rule shared by training and inference.

Given area-uniform surface samples of a heart (RAS mm, with a structure index per point) and the
set of *input* structures (the ones the user/phase mask provides):

1. the centre ``c`` is the mean of **all** surface samples of the input structures (an
   area-weighted surface centroid; hidden structures never move it), see
   :class:`~HeartCompletionLib.geometry.normalization.Normalization`;
2. the encoder gets a fixed number of points drawn from the input structures, proportional to
   their surface area but at least ``min_per_structure`` from each (small structures such as the
   coronaries must not vanish), each as ``xyz_n`` plus ``one-hot(K)``.

>>> rng = np.random.default_rng(0)
>>> labels = np.repeat(np.arange(3), [1000, 100, 10]).astype(np.int8)
>>> idx = select_encoder_points(labels, [0, 2], 64, rng, min_per_structure=8)
>>> len(idx), int((labels[idx] == 2).sum()) >= 8, bool((labels[idx] != 1).all())
(64, True, True)
"""

from __future__ import annotations

import numpy as np

from HeartCompletionLib.geometry.normalization import Normalization


def select_encoder_points(
    surface_labels: np.ndarray,
    input_indices,
    num_points: int,
    rng: np.random.Generator,
    min_per_structure: int = 32,
) -> np.ndarray:
    """Indices (``num_points``,) into the surface samples, drawn from the input structures only.

    Counts are proportional to each input structure's number of samples (= its area, since the
    samples are area-uniform) with a floor of ``min_per_structure`` (capped so the floors fit).
    A structure with fewer samples than its count is sampled with replacement.
    """
    surface_labels = np.asarray(surface_labels)
    present = [int(k) for k in input_indices if np.any(surface_labels == int(k))]
    if not present:
        raise ValueError("no surface points of any input structure: nothing to encode")
    pools = [np.flatnonzero(surface_labels == k) for k in present]
    sizes = np.array([len(p) for p in pools], dtype=np.float64)
    floor = min(min_per_structure, num_points // len(present))
    remaining = num_points - floor * len(present)
    share = remaining * sizes / sizes.sum()
    counts = floor + np.floor(share).astype(int)
    # hand out the rounding remainder to the largest fractional parts (deterministic)
    leftover = num_points - counts.sum()
    if leftover > 0:
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        counts[order[:leftover]] += 1
    chosen = []
    for pool, count in zip(pools, counts):
        replace = count > len(pool)
        chosen.append(rng.choice(pool, size=int(count), replace=replace))
    out = np.concatenate(chosen)
    rng.shuffle(out)
    return out


def encoder_centre_mm(surface_points_mm: np.ndarray, surface_labels: np.ndarray, input_indices) -> np.ndarray:
    """Centre ``c`` in mm: the mean of all surface samples of the input structures."""
    keep = np.isin(np.asarray(surface_labels), [int(k) for k in input_indices])
    if not keep.any():
        raise ValueError("no surface points of any input structure: cannot place the heart")
    return Normalization().centre_mm(np.asarray(surface_points_mm)[keep])


def encoder_arrays(
    points_mm: np.ndarray,
    labels: np.ndarray,
    centre_mm: np.ndarray,
    normalization: Normalization,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(xyz_n (N, 3) float32, onehot (N, K) float32)`` for the chosen encoder points."""
    xyz_n = normalization.points_to_network(np.asarray(points_mm, dtype=np.float64), centre_mm).astype(np.float32)
    onehot = np.zeros((len(labels), num_classes), dtype=np.float32)
    onehot[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1.0
    return xyz_n, onehot
