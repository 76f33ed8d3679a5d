"""Physical geometry: IJK -> RAS matrices and coordinate transforms.

Every array of points in this project is in the patient's physical frame, RAS millimetres,
unless its name says otherwise (``_ijk`` / ``_vox`` for voxel indices, ``_n`` for normalised
network coordinates, see :mod:`HeartCompletionLib.geometry.normalization`). Voxel indices never leave
the reader: everything downstream receives ``(labels, ijk_to_ras)``.

``ijk_to_ras`` is a 4x4 float64 matrix; column j of its 3x3 block is the direction of voxel
axis j scaled by that axis' spacing in mm. Direction matrices may be oblique and may flip axes
(determinant -1); they must be orthogonal up to the spacing.
"""

from __future__ import annotations

import numpy as np

#: LPS (DICOM/ITK/NRRD "left-posterior-superior") <-> RAS. Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_ijk_to_ras(
    spacing_mm=(1.0, 1.0, 1.0), origin_ras=(0.0, 0.0, 0.0), direction=None
) -> np.ndarray:
    """Build an IJK->RAS matrix from spacing (mm), origin (RAS mm, centre of voxel 0,0,0) and a
    3x3 direction matrix (columns = unit axis directions in RAS; identity by default)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(spacing_mm, dtype=np.float64)[None, :]
    matrix[:3, 3] = np.asarray(origin_ras, dtype=np.float64)
    validate_ijk_to_ras(matrix)
    return matrix


def validate_ijk_to_ras(ijk_to_ras: np.ndarray, source: str = "image") -> np.ndarray:
    """Check a 4x4 IJK->RAS matrix: finite, affine, non-singular, axes orthogonal (tolerance 1e-3)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{source}: IJK->RAS must be a finite 4x4 matrix, got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"{source}: IJK->RAS last row must be 0 0 0 1, got {m[3].tolist()}")
    spacing = spacing_of(m)
    if np.any(spacing <= 1e-9):
        raise ValueError(f"{source}: zero spacing in IJK->RAS {spacing.tolist()}")
    unit = m[:3, :3] / spacing[None, :]
    if not np.allclose(unit.T @ unit, np.eye(3), atol=1e-3):
        raise ValueError(f"{source}: voxel axes are not orthogonal (sheared grids are not supported)")
    return m


def spacing_of(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm along i, j, k (norms of the matrix columns)."""
    return np.linalg.norm(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3], axis=0)


def direction_of(ijk_to_ras: np.ndarray) -> np.ndarray:
    """3x3 unit direction matrix (columns = axis directions in RAS)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    return m[:3, :3] / spacing_of(m)[None, :]


def ijk_to_ras_points(ijk, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (N, 3) -> RAS mm (N, 3), float64."""
    ijk = np.asarray(ijk, dtype=np.float64)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    return ijk @ m[:3, :3].T + m[:3, 3]


def ras_to_ijk_points(ras, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS mm (N, 3) -> continuous voxel indices (N, 3), float64."""
    ras = np.asarray(ras, dtype=np.float64)
    inv = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    return ras @ inv[:3, :3].T + inv[:3, 3]


def distance_to_image_border_mm(points_ras, shape, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Distance (mm) from each RAS point to the nearest face of the image box (voxel centres
    ``-0.5 .. n - 0.5`` along each axis), negative outside: the one rule for "near the cut" of a
    structure truncated by the field of view (training targets and fitting targets alike).

    >>> float(distance_to_image_border_mm([[2.0, 5.0, 5.0]], (10, 10, 10), np.diag([2.0, 2.0, 2.0, 1.0]))[0])
    3.0
    """
    ijk = ras_to_ijk_points(np.asarray(points_ras, dtype=np.float64).reshape(-1, 3), ijk_to_ras)
    to_face = np.minimum(ijk + 0.5, np.asarray(shape, np.float64)[:3] - 0.5 - ijk) * spacing_of(ijk_to_ras)
    return to_face.min(axis=1)


def voxel_centers_ras(shape, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS mm of every voxel centre, shape (*shape, 3), C order (i slowest)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    ijk = np.stack(grids, axis=-1).reshape(-1, 3)
    return ijk_to_ras_points(ijk, ijk_to_ras).reshape(*shape, 3)


def image_corners_ras(shape, ijk_to_ras: np.ndarray) -> np.ndarray:
    """The 8 corners of the image box (voxel-centre extent) in RAS mm, (8, 3)."""
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)],
        dtype=np.float64,
    )
    return ijk_to_ras_points(corners, ijk_to_ras)


def rotation_matrix(axis, angle_rad: float) -> np.ndarray:
    """Proper 3x3 rotation (det +1) about ``axis`` by ``angle_rad`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)
