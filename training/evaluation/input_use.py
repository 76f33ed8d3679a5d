"""Does a model use its input? Two measures that an encoder ignoring its input cannot pass.

A collapsed encoder (the same latents for every heart) makes the decoder one mean field in the
input-centred frame: the output at a network point is the same whatever heart is given. Two
measures catch it, for two *different* hearts A and B:

- ``output_difference_mm``: mean |f(A, x) - f(B, x)| over shared network points x (mm). A
  collapsed encoder gives ~0 (measured: 3e-7 network units = 3e-5 mm).
- ``disagreement_accuracy``: on the network points where the two hearts disagree about a
  structure (inside one, outside the other, per the label maps), the fraction of (heart, point,
  structure) cases the model classifies right (inside = sdf < 0). Any input-independent field --
  their mean field included -- is right for exactly one of the two hearts at each such point:
  0.5. A model that fits both hearts from their inputs scores near 1.

Network points come from both hearts' own uniform volume samples, mapped through each heart's
own encoder centre (the completion rule), so they cover both hearts in the frame the model sees.

>>> import numpy as np
>>> _disagreement_accuracy(np.array([[True], [False]]), np.array([[False], [True]]),
...                        np.array([[True], [True]]), np.array([[False], [False]]))
0.5
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .near_iou import encoder_input_of_case


def _encode(model, normalization, case: dict, num_input_points: int, min_per_structure: int, rng):
    xyz, onehot, centre = encoder_input_of_case(case, normalization, num_input_points, min_per_structure, rng)
    device = next(model.parameters()).device
    latents, _ = model.encode(torch.from_numpy(xyz)[None].to(device), torch.from_numpy(onehot)[None].to(device))
    return latents, centre


def _disagreement_accuracy(inside_a, inside_b, pred_a, pred_b) -> float:
    """Accuracy of the predicted insides on the (point, structure) cells where A and B disagree."""
    disagree = inside_a != inside_b
    if not disagree.any():
        return float("nan")
    correct = (pred_a == inside_a)[disagree].sum() + (pred_b == inside_b)[disagree].sum()
    return float(correct / (2 * disagree.sum()))


@torch.no_grad()
def input_dependence(model: torch.nn.Module, normalization, case_a: dict, case_b: dict,
                     labels_a: Callable[[np.ndarray], np.ndarray], labels_b: Callable[[np.ndarray], np.ndarray],
                     num_input_points: int, min_per_structure: int, num_points: int = 6000,
                     structure_labels: Sequence[int] | None = None, seed: int = 0) -> dict:
    """``{"output_difference_mm", "disagreement_accuracy", "disagreement_points"}`` for two hearts.

    ``case_a``/``case_b``: prepared cases (:func:`heart_training.data.case_format.load_case`), every
    annotated structure given to the encoder. ``labels_a``/``labels_b``: label value (table
    label, 0 = background) of each heart at RAS points (N, 3) in mm, e.g. from its label map.
    ``structure_labels``: the table's label values in column order (default 1..K).
    """
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        lat_a, centre_a = _encode(model, normalization, case_a, num_input_points, min_per_structure, rng)
        lat_b, centre_b = _encode(model, normalization, case_b, num_input_points, min_per_structure, rng)
        half = num_points // 2
        points = []
        for case, centre in ((case_a, centre_a), (case_b, centre_b)):
            pick = rng.choice(len(case["volume_points"]), size=min(half, len(case["volume_points"])), replace=False)
            points.append(normalization.points_to_network(case["volume_points"][pick].astype(np.float64), centre))
        x_n = np.concatenate(points).astype(np.float32)
        device = next(model.parameters()).device
        queries = torch.from_numpy(x_n)[None].to(device)
        sdf_a = model.decode(lat_a, queries)[0].float().cpu().numpy()
        sdf_b = model.decode(lat_b, queries)[0].float().cpu().numpy()
    finally:
        model.train(was_training)
    k = sdf_a.shape[1]
    values = np.asarray(structure_labels if structure_labels is not None else np.arange(1, k + 1))
    ras_a = normalization.points_to_mm(x_n.astype(np.float64), centre_a) + case_a["origin_mm"]
    ras_b = normalization.points_to_mm(x_n.astype(np.float64), centre_b) + case_b["origin_mm"]
    inside_a = np.asarray(labels_a(ras_a))[:, None] == values[None, :]
    inside_b = np.asarray(labels_b(ras_b))[:, None] == values[None, :]
    return {
        "output_difference_mm": float(normalization.distance_to_mm(np.abs(sdf_a - sdf_b).mean())),
        "disagreement_accuracy": _disagreement_accuracy(inside_a, inside_b, sdf_a < 0, sdf_b < 0),
        "disagreement_points": int((inside_a != inside_b).sum()),
    }


def label_lookup(label_map) -> Callable[[np.ndarray], np.ndarray]:
    """``points_ras (N, 3) mm -> label values (N,)`` of ``label_map`` at the nearest voxel (0 outside the grid)."""
    from HeartCompletionLib.geometry.affine import ras_to_ijk_points

    def lookup(points_ras: np.ndarray) -> np.ndarray:
        ijk = np.rint(ras_to_ijk_points(np.asarray(points_ras, dtype=np.float64), label_map.ijk_to_ras)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.asarray(label_map.shape)), axis=1)
        out = np.zeros(len(ijk), dtype=np.int64)
        i, j, kk = ijk[inside].T
        out[inside] = label_map.labels[i, j, kk]
        return out

    return lookup
