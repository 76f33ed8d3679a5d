"""Plausibility of a completed heart against a whole-heart envelope (issue 11).

A whole-heart mask (a radiotherapy "heart" contour, TotalSegmentator's ``heart`` class) is the
union of the chambers and the myocardium, not a structure of the table: a plausible completion
lies inside it and fills it. :func:`envelope_fit` measures both, in physical space:

- ``inside_fraction`` = vol(completion ∩ envelope) / vol(completion): how much of the completed
  heart lies inside the envelope (1 = nothing sticks out);
- ``fill_fraction`` = vol(completion ∩ envelope) / vol(envelope): how much of the envelope it fills
  (1 = the whole envelope is covered);
- ``envelope_in_view_fraction``: the share of the envelope inside the completion's grid. The
  completion cannot fill what its grid does not reach, so ``fill_fraction`` is bounded by it (a
  field-of-view limit, not a model error).

The two masks may live on different grids of the same patient: the envelope is looked up at the
completion's voxel centres by physical (RAS) coordinates, nearest neighbour, and the envelope's own
volume is measured on its own grid. Which structures make up the "heart" is a choice:
:data:`ENVELOPE_STRUCTURES` (chambers, myocardium and LAA) is what such contours hold; the great
vessels, coronaries and pulmonary veins leave or lie on the envelope, so scoring all ten is
reported separately.
"""

from __future__ import annotations

import numpy as np

from HeartCompletionLib.io.labelmap import LabelMap

#: structures a whole-heart contour encloses (chambers, myocardium, the atrial appendage)
ENVELOPE_STRUCTURES = ("Myocardium", "LA", "LV", "RA", "RV", "LAA")


def _ijk_of(points_ras: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Nearest voxel indices (int64) of RAS points on a grid."""
    ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    return np.rint(points_ras @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]).astype(np.int64)


def _voxel_centres_ras(shape, ijk_to_ras: np.ndarray, index: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.unravel_index(index, shape), axis=1).astype(np.float64)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    return ijk @ m[:3, :3].T + m[:3, 3]


def sample_mask(mask: np.ndarray, mask_ijk_to_ras: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    """``mask`` (bool, its own grid) at RAS points, nearest neighbour; False outside its grid."""
    ijk = _ijk_of(points_ras, mask_ijk_to_ras)
    shape = np.asarray(mask.shape)
    inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
    out = np.zeros(len(points_ras), dtype=bool)
    out[inside] = mask[tuple(ijk[inside].T)]
    return out


def envelope_fit(completed: LabelMap, envelope: np.ndarray, envelope_ijk_to_ras: np.ndarray, labels) -> dict:
    """Inside / fill fractions of the union of ``labels`` of ``completed`` against ``envelope``
    (a bool mask on its own grid ``envelope_ijk_to_ras``). Volumes in ml."""
    heart = np.isin(completed.labels, list(labels))
    heart_index = np.flatnonzero(heart)
    heart_ml = heart_index.size * completed.voxel_volume_mm3 / 1000.0
    inside = sample_mask(envelope, envelope_ijk_to_ras, _voxel_centres_ras(heart.shape, completed.ijk_to_ras, heart_index))
    inside_ml = int(inside.sum()) * completed.voxel_volume_mm3 / 1000.0

    envelope = np.asarray(envelope, dtype=bool)
    env_index = np.flatnonzero(envelope)
    env_voxel_ml = abs(np.linalg.det(np.asarray(envelope_ijk_to_ras)[:3, :3])) / 1000.0
    envelope_ml = env_index.size * env_voxel_ml
    env_points = _voxel_centres_ras(envelope.shape, envelope_ijk_to_ras, env_index)
    in_view = np.all((_ijk_of(env_points, completed.ijk_to_ras) >= 0)
                     & (_ijk_of(env_points, completed.ijk_to_ras) < np.asarray(completed.shape)), axis=1)
    return {
        "heart_ml": round(heart_ml, 2),
        "envelope_ml": round(envelope_ml, 2),
        "inside_ml": round(inside_ml, 2),
        "inside_fraction": float(inside_ml / heart_ml) if heart_ml > 0 else float("nan"),
        "fill_fraction": float(inside_ml / envelope_ml) if envelope_ml > 0 else float("nan"),
        "envelope_in_view_fraction": float(in_view.mean()) if env_index.size else float("nan"),
    }


def read_envelope(path) -> tuple[np.ndarray, np.ndarray]:
    """A whole-heart mask file (any non-zero value) as ``(bool mask, IJK->RAS matrix in mm)``,
    through the project's reader (its value is no structure of the table: that warning is muted)."""
    import warnings

    from HeartCompletionLib.io.labelmap_files import read_label_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        envelope = read_label_map(path)
    return envelope.labels > 0, envelope.ijk_to_ras
