"""Per-structure IoU on a case's own near-surface points: how well a model fits the hearts it saw.

Inside means ``sdf < 0``, for the prediction and for the stored target; every structure is
scored on the same points (all of the case's near-surface points, or ``num_points`` of them),
with every annotated structure as encoder input, through the shared encoder-input rule of
:mod:`HeartCompletionLib.model.encoder_input` (the rule completion uses). The test of the trainer and
``benchmarks/overfit_iou.py`` both use this one function.
"""

from __future__ import annotations

import numpy as np
import torch

from HeartCompletionLib.model.encoder_input import encoder_arrays, encoder_centre_mm, select_encoder_points


def encoder_input_of_case(case: dict, normalization, num_input_points: int, min_per_structure: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xyz_n (N, 3), onehot (N, K), centre_mm (3,))`` of a prepared case with every annotated
    structure as input, by the completion rule (:mod:`HeartCompletionLib.model.encoder_input`)."""
    k = case["near_sdf"].shape[1]
    labels = case["surface_labels"].astype(np.int64)
    inputs = np.flatnonzero(case["annotated"])
    centre = encoder_centre_mm(case["surface_points"], labels, inputs)
    idx = select_encoder_points(labels, inputs, num_input_points, rng, min_per_structure)
    xyz, onehot = encoder_arrays(case["surface_points"][idx], labels[idx], centre, normalization, k)
    return xyz, onehot, centre


@torch.no_grad()
def near_surface_iou(model: torch.nn.Module, normalization, case: dict, num_input_points: int,
                     min_per_structure: int, num_points: int = 4000, seed: int = 0) -> np.ndarray:
    """(K,) IoU per structure (NaN where neither prediction nor target has an inside point)."""
    rng = np.random.default_rng(seed)
    xyz, onehot, centre = encoder_input_of_case(case, normalization, num_input_points, min_per_structure, rng)
    n = len(case["near_points"])
    pick = rng.choice(n, size=min(num_points, n), replace=False) if num_points else np.arange(n)
    queries = normalization.points_to_network(case["near_points"][pick].astype(np.float64), centre)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(torch.from_numpy(xyz)[None].to(device), torch.from_numpy(onehot)[None].to(device),
                    torch.from_numpy(queries.astype(np.float32))[None].to(device))
    finally:
        model.train(was_training)
    return sign_iou(out["sdf"][0].float().cpu().numpy(), case["near_sdf"][pick])


def sign_iou(pred_sdf: np.ndarray, true_sdf: np.ndarray) -> np.ndarray:
    """(K,) IoU of the insides (sdf < 0) of ``pred_sdf`` and ``true_sdf`` (both (N, K)), per
    column; NaN where neither has an inside point.

    >>> sign_iou(np.array([[-1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]]), np.array([[-1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]))
    array([0.5, nan])
    """
    pred, true = np.asarray(pred_sdf) < 0, np.asarray(true_sdf) < 0
    union = (pred | true).sum(0)
    return np.where(union > 0, (pred & true).sum(0) / np.maximum(union, 1), np.nan)
