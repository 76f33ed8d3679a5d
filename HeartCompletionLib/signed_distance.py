"""Signed distances in mm (negative inside) from arbitrary RAS points to label-map structures.

A structure's boundary is the 0.5 iso-surface of its binary mask, the surface that
:mod:`HeartCompletionLib.surface` extracts and samples. Each distance is built in three tiers,
all vectorised over points, one structure at a time:

1. **fine** (the structure's bounding box + a margin, at the image's own resolution): an exact
   Euclidean distance transform with the voxel spacing (``edt`` package, scipy fallback) gives
   the distance from each voxel centre to the nearest voxel centre of the other side; half a
   voxel less is the distance to the iso-surface. Interpolated trilinearly at the points.
2. **near the surface** (``|d| < BAND_VOXELS`` voxels): the magnitude is refined against the
   marching-cubes surface: the nearest vertices and their smooth outward normals give an implicit
   moving-least-squares plane distance (capped by the distance to the nearest vertex). The sign
   is the trilinearly interpolated mask occupancy (> 0.5 inside), i.e. exactly the inside/outside
   of the label map that marching cubes approximates.
3. **far** (outside the fine box, hence outside the structure): a distance transform on a coarse
   grid (blocks of about ``COARSE_SPACING_MM``) covering the image and the points, bounded below
   by the distance to the structure's bounding box. Errors here are about a coarse voxel, at
   distances of ``FINE_MARGIN_MM`` and more, which training tolerates.

Outside the image there is no structure: the mask is zero there, so points beyond the image are
outside every structure and their distances still measure the way back to the surface.

>>> import numpy as np
>>> from HeartCompletionLib.geometry import make_ijk_to_ras
>>> from HeartCompletionLib.labelmap import LabelMap
>>> centres = make_ijk_to_ras(spacing_mm=(2.0, 2.0, 2.0))
>>> labels = np.zeros((31, 31, 31), dtype=np.uint8)
>>> labels[5:26, 5:26, 5:26] = 3  # a cube whose faces (midway between voxel centres) are at 9 and 51 mm
>>> d = signed_distances_mm(LabelMap(labels, centres), [[30, 30, 30], [30, 30, 55], [30, 30, 500]], [3])
>>> [round(float(v), 1) for v in d[:2, 0]], bool(abs(d[2, 0] - 449.0) < 2.0)  # far: the coarse tier
([-21.0, 4.0], True)
"""

from __future__ import annotations

import os

import numpy as np

from .geometry import ras_to_ijk_points, spacing_of
from .surface import padded_crop, structure_boxes, surface_from_box

#: Half-width (in largest-spacing voxels) of the band around the surface refined against the mesh.
BAND_VOXELS = 2.5
#: The fine tier covers the structure's bounding box plus this margin (mm; at least band + 2 voxels).
FINE_MARGIN_MM = 8.0
#: Target block size (mm) of the coarse tier for points beyond the fine box.
COARSE_SPACING_MM = 3.0
#: The coarse grid extends at most this many blocks beyond the image; farther points are clamped
#: onto it and the clamping distance is added (an upper bound, exact along the axes).
COARSE_MAX_EXTENSION = 48
#: Fine tier: distance from a voxel centre to the iso-surface = distance to the nearest centre of
#: the other side minus this many (smallest-spacing) voxels.
SURFACE_OFFSET_VOXELS = 0.25
#: Coarse tier: block-centre distances plus this many (mean) block sizes.
COARSE_OFFSET_BLOCKS = 0.25
#: Nearest surface vertices used by the moving-least-squares refinement.
NEIGHBOURS = 8


def default_threads() -> int:
    """Threads per call (distance transform, KD-tree): at most 2, the budget of one worker."""
    return max(1, min(2, os.cpu_count() or 1))


def _edt(inside: np.ndarray, spacing, threads: int) -> np.ndarray:
    """Distance (mm, float32) from every voxel centre to the nearest voxel centre of the other side."""
    try:
        import edt
    except ImportError:  # the fast `edt` package is optional (extra "fast"); scipy is exact too
        from scipy.ndimage import distance_transform_edt

        out = distance_transform_edt(~inside, sampling=spacing).astype(np.float32)
        out[inside] = distance_transform_edt(inside, sampling=spacing)[inside]
        return out
    # multi-label mode: each voxel's distance to the nearest voxel of the other label, both sides at once
    return edt.edt(inside.astype(np.uint8) + 1, anisotropy=tuple(float(s) for s in spacing), parallel=threads)


def _outside_edt(outside: np.ndarray, spacing, threads: int) -> np.ndarray:
    try:
        import edt
    except ImportError:
        from scipy.ndimage import distance_transform_edt

        return distance_transform_edt(outside, sampling=spacing).astype(np.float32)
    return edt.edt(outside, anisotropy=tuple(float(s) for s in spacing), parallel=threads)


def trilinear(grid: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``grid`` at continuous indices ``q`` (N, 3), clamped to the grid.

    Every axis of ``grid`` must have at least 2 samples. Returns float32 (N,).
    """
    shape = np.asarray(grid.shape, dtype=np.int64)
    q = np.clip(q, 0.0, shape - 1)
    base = np.minimum(q.astype(np.int64), shape - 2)
    frac = (q - base).astype(np.float32)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    flat = grid.ravel()
    if flat.dtype != np.float32:  # e.g. a uint8 mask: differences must not wrap around
        flat = flat.astype(np.float32)
    index = base @ strides
    fx, fy, fz = frac[:, 0], frac[:, 1], frac[:, 2]

    def plane(offset):  # bilinear in (j, k) at i = base_i + offset
        i = index + offset * strides[0]
        c00, c01 = flat[i], flat[i + 1]
        c10, c11 = flat[i + strides[1]], flat[i + strides[1] + 1]
        low = c00 + (c01 - c00) * fz
        high = c10 + (c11 - c10) * fz
        return low + (high - low) * fy

    p0 = plane(0)
    return (p0 + (plane(1) - p0) * fx).astype(np.float32, copy=False)


class _StructureField:
    """Signed distance (mm) to one structure, evaluated at continuous voxel indices of the image."""

    def __init__(self, box_mask, box_lo, matrix, mesh, domain_lo, domain_hi, threads: int):
        from scipy.spatial import cKDTree

        self.matrix = matrix
        self.spacing = spacing_of(matrix)
        self.threads = threads
        self.band_mm = BAND_VOXELS * float(self.spacing.max())
        self.box_lo = np.asarray(box_lo, dtype=np.int64)
        self.box_hi = self.box_lo + np.asarray(box_mask.shape) - 1

        # fine tier: bounding box + margin, zero (outside) beyond the image
        margin_mm = max(FINE_MARGIN_MM, self.band_mm + 2.0 * float(self.spacing.max()))
        margin = np.ceil(margin_mm / self.spacing).astype(np.int64)
        self.fine_lo = self.box_lo - margin
        fine_mask = padded_crop(box_mask, -margin, np.asarray(box_mask.shape) - 1 + margin)
        self.fine_mask = fine_mask.view(np.uint8)
        dist = _edt(fine_mask, self.spacing, threads)
        # voxel-centre distances overshoot the iso-surface (midway between the centres): by half a
        # voxel across a flat face, by less across a curved one where some centre lies close to
        # it; SURFACE_OFFSET_VOXELS is the compromise measured on spheres and ellipsoids
        half = np.float32(SURFACE_OFFSET_VOXELS * self.spacing.min())
        self.fine_sdf = np.where(fine_mask, half - dist, dist - half).astype(np.float32)

        # coarse tier over the whole query domain (outside distances only: the fine box holds the inside)
        self.factor = np.maximum(1, np.round(COARSE_SPACING_MM / self.spacing)).astype(np.int64)
        self.coarse_lo = np.asarray(domain_lo, dtype=np.int64)
        n_blocks = np.maximum(2, -(-(np.asarray(domain_hi) - self.coarse_lo + 1) // self.factor))
        a0 = (self.box_lo - self.coarse_lo) // self.factor
        a1 = (self.box_hi - self.coarse_lo) // self.factor
        lo_fine = self.coarse_lo + a0 * self.factor
        hi_fine = self.coarse_lo + (a1 + 1) * self.factor - 1
        part = padded_crop(box_mask, lo_fine - self.box_lo, hi_fine - self.box_lo)
        nb = a1 - a0 + 1
        f = self.factor
        part = part.reshape(nb[0], f[0], nb[1], f[1], nb[2], f[2]).any(axis=(1, 3, 5))
        occupied = np.zeros(tuple(n_blocks), dtype=bool)
        occupied[a0[0] : a1[0] + 1, a0[1] : a1[1] + 1, a0[2] : a1[2] + 1] = part
        self.coarse = _outside_edt(~occupied, self.spacing * self.factor, threads)

        self.tree = cKDTree(mesh.vertices)
        self.vertex_normals = mesh.vertex_normals

    def evaluate(self, ijk: np.ndarray, ras: np.ndarray) -> np.ndarray:
        out = np.empty(len(ijk), dtype=np.float32)
        local = ijk - self.fine_lo
        fine_shape = np.asarray(self.fine_sdf.shape)
        in_fine = np.all((local >= 0) & (local <= fine_shape - 1), axis=1)
        idx_fine = np.flatnonzero(in_fine)
        out[idx_fine] = trilinear(self.fine_sdf, local[idx_fine])
        idx_far = np.flatnonzero(~in_fine)
        if idx_far.size:
            out[idx_far] = self._far(ijk[idx_far])
        band = idx_fine[np.abs(out[idx_fine]) < self.band_mm]
        if band.size:
            out[band] = self._near(local[band], ras[band])
        return out

    def _far(self, ijk: np.ndarray) -> np.ndarray:
        """Outside distance (mm) from the coarse grid, bounded below by the distance to the box."""
        q = (ijk - self.coarse_lo - 0.5 * (self.factor - 1)) / self.factor
        n = np.asarray(self.coarse.shape)
        clamped = np.clip(q, 0.0, n - 1)
        beyond_mm = np.linalg.norm((q - clamped) * self.factor * self.spacing, axis=1)
        # the occupied blocks stick out of the structure (one inside voxel fills a block), so the
        # block-centre distance falls short, by about a quarter block on curved surfaces
        block_mm = float(np.mean(self.factor * self.spacing))
        coarse = trilinear(self.coarse, clamped) + beyond_mm + COARSE_OFFSET_BLOCKS * block_mm
        gap = np.maximum(np.maximum(self.box_lo - ijk, ijk - self.box_hi), 0.0) * self.spacing
        box_mm = np.linalg.norm(gap, axis=1) - 0.5 * float(self.spacing.max())
        return np.maximum(coarse, box_mm).astype(np.float32)

    def _near(self, local: np.ndarray, ras: np.ndarray) -> np.ndarray:
        """Occupancy sign, moving-least-squares magnitude against the mesh vertices (mm)."""
        inside = trilinear(self.fine_mask, local) > 0.5
        k = min(NEIGHBOURS, len(self.vertex_normals))
        dist, nearest = self.tree.query(ras, k=k, workers=self.threads)
        if k == 1:
            dist, nearest = dist[:, None], nearest[:, None]
        offsets = ras[:, None, :] - self.tree.data[nearest]
        plane = np.einsum("nkc,nkc->nk", offsets, self.vertex_normals[nearest])
        h2 = float(self.spacing.max()) ** 2
        weights = np.exp(-(dist**2 - dist[:, :1] ** 2) / h2)
        magnitude = np.abs((weights * plane).sum(axis=1) / weights.sum(axis=1))
        # the nearest vertex lies on the surface: the surface is never farther than it
        magnitude = np.minimum(magnitude, dist[:, 0])
        return np.where(inside, -magnitude, magnitude).astype(np.float32)


def _query_domain(ijk: np.ndarray, shape, factor_hint: np.ndarray):
    """Voxel-index box (lo, hi) covering the image and the points, at most
    ``COARSE_MAX_EXTENSION`` coarse blocks beyond the image on each side."""
    shape = np.asarray(shape, dtype=np.int64)
    cap = COARSE_MAX_EXTENSION * factor_hint
    lo = np.zeros(3, dtype=np.int64)
    hi = shape - 1
    if len(ijk):
        lo = np.minimum(lo, np.floor(ijk.min(axis=0)).astype(np.int64))
        hi = np.maximum(hi, np.ceil(ijk.max(axis=0)).astype(np.int64))
    return np.maximum(lo, -cap), np.minimum(hi, shape - 1 + cap)


def signed_distances_mm(label_map, points_ras, labels, meshes=None, threads: int | None = None) -> np.ndarray:
    """Signed distance in mm (negative inside) from each point to each listed structure.

    ``label_map`` is a :class:`~HeartCompletionLib.labelmap.LabelMap`; ``points_ras`` (N, 3) RAS mm
    anywhere (inside or outside the image); ``labels`` the structures' label values. Returns
    float32 (N, len(labels)); a label that does not occur in the map gets a NaN column (no surface,
    no distance). ``meshes`` may hold surfaces from
    :func:`HeartCompletionLib.surface.structure_surfaces` to avoid extracting them again;
    ``threads`` (default :func:`default_threads`) is used by the distance transform and KD-tree.
    """
    points = np.asarray(points_ras, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{label_map.source}: query points must be an (N, 3) array of RAS mm, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{label_map.source}: query points contain NaN or infinite coordinates")
    labels = [int(v) for v in labels]
    threads = default_threads() if threads is None else max(1, int(threads))
    out = np.full((len(points), len(labels)), np.nan, dtype=np.float32)
    if len(points) == 0:
        return out
    matrix = label_map.ijk_to_ras
    spacing = spacing_of(matrix)
    ijk = ras_to_ijk_points(points, matrix)
    factor = np.maximum(1, np.round(COARSE_SPACING_MM / spacing)).astype(np.int64)
    domain_lo, domain_hi = _query_domain(ijk, label_map.shape, factor)
    boxes = structure_boxes(label_map.labels, labels)
    for column, value in enumerate(labels):
        if value not in boxes:
            continue
        box_mask, box_lo = boxes[value]
        mesh = meshes.get(value) if meshes is not None else None
        if mesh is None:
            mesh = surface_from_box(box_mask, box_lo, matrix)
        field = _StructureField(box_mask, box_lo, matrix, mesh, domain_lo, domain_hi, threads)
        out[:, column] = field.evaluate(ijk, points)
    return out
