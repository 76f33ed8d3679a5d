"""Signed distances in mm (negative inside) from arbitrary RAS points to label-map structures.

A structure's boundary is the 0.5 iso-surface of its binary mask, the surface that
:mod:`HeartCompletionLib.geometry.surface` extracts and samples. Each distance comes from one of three
tiers, all vectorised over the points:

1. **fine** (the structure's bounding box + ``FINE_MARGIN_MM``, at the image's own resolution):
   an exact Euclidean distance transform with the voxel spacing (``edt`` package, scipy
   fallback) gives the distance from each voxel centre to the nearest voxel centre of the other
   side; a fraction of a voxel less (``SURFACE_OFFSET_VOXELS``) is the distance to the
   iso-surface. Interpolated trilinearly at the points.
2. **near the surface** (``|d| < BAND_VOXELS`` voxels): the value blends (fully within
   ``MLS_FULL_VOXELS``) into an implicit moving-least-squares signed distance to the
   marching-cubes surface: the nearest vertices' tangent planes (smooth outward normals from the
   mask gradient), weighted by a kernel that vanishes at the last neighbour, so the field stays
   continuous with a unit slope. Where the label map is unambiguous (trilinear mask occupancy
   <= ``SIGN_GUARD`` or >= 1 - ``SIGN_GUARD``, e.g. at every voxel centre) its side is enforced,
   so inside/outside agrees with the label map.
3. **far** (outside the fine box, hence outside the structure): a distance transform on a coarse
   grid (blocks of about ``COARSE_SPACING_MM``) covering the image and the points, all structures
   interpolated at once. Its error is a fraction of a block, at distances beyond the margin.

Outside the image there is no structure: the mask is zero there, so points beyond the image are
outside every structure and their distances still measure the way back to the surface.
Measured accuracy and speed: docs/surfaces_and_distances.md.

>>> import numpy as np
>>> from HeartCompletionLib.geometry.affine import make_ijk_to_ras
>>> from HeartCompletionLib.io.labelmap import LabelMap
>>> centres = make_ijk_to_ras(spacing_mm=(2.0, 2.0, 2.0))
>>> ball = np.linalg.norm(np.indices((31, 31, 31)) - 15.0, axis=0) <= 9.5  # voxels of a 19 mm ball
>>> lm = LabelMap(ball.astype(np.uint8) * 3, centres)
>>> d = signed_distances_mm(lm, [[30, 30, 30], [30, 30, 52], [30, 30, 150]], [3])
>>> bool(np.abs(d[:, 0] - [-19.0, 3.0, 101.0]).max() <= 1.0)  # inside, near, far: within half a voxel
True
"""

from __future__ import annotations

import os

import numpy as np

from .affine import spacing_of
from .surface import padded_crop, structure_boxes, surface_from_box

#: Half-width (in largest-spacing voxels) of the band refined against the surface mesh.
BAND_VOXELS = 2.0
#: Within this many voxels the value is fully the moving-least-squares surface distance;
#: from there it blends linearly into the distance-transform value at the band's edge.
MLS_FULL_VOXELS = 0.75
#: The fine tier covers the structure's bounding box plus this margin (mm; at least 3 voxels).
FINE_MARGIN_MM = 8.0
#: Fine tier: distance from a voxel centre to the iso-surface = distance to the nearest centre of
#: the other side minus this many (smallest-spacing) voxels: half a voxel across a flat face, less
#: across a curved one where some centre lies close to it; calibrated on spheres and ellipsoids.
SURFACE_OFFSET_VOXELS = 0.25
#: Target block size (mm) of the coarse tier for points beyond the fine box.
COARSE_SPACING_MM = 3.0
#: Coarse tier: block-centre distances plus this many (mean) block sizes. Occupied blocks stick out
#: of the structure (one inside voxel fills a block), so the raw distance falls short.
COARSE_OFFSET_BLOCKS = 0.25
#: The coarse grid extends at most this many blocks beyond the image; farther points are clamped
#: onto it and the clamping distance is added (an upper bound, exact along the axes).
COARSE_MAX_EXTENSION = 24
#: Points per chunk of the all-structure coarse tier (bounds its temporary memory).
CHUNK_POINTS = 1 << 18
#: Nearest surface vertices used by the moving-least-squares distance.
NEIGHBOURS = 12
#: Occupancy at most this (or at least 1 - this) is unambiguous: the distance's sign must agree.
SIGN_GUARD = 0.25
#: Magnitude (mm) given to the rare near points whose side the guard corrects.
GUARD_MM = 1e-3


def default_threads() -> int:
    """Threads per call (distance transform, KD-tree): at most 2, the budget of one worker."""
    return max(1, min(2, os.cpu_count() or 1))


def _edt_both_sides(inside: np.ndarray, spacing, threads: int) -> np.ndarray:
    """Distance (mm, float32) from every voxel centre to the nearest voxel centre of the other side."""
    try:
        import edt
    except ImportError:  # the fast `edt` package is optional (extra "fast"); scipy is exact too
        from scipy.ndimage import distance_transform_edt

        out = distance_transform_edt(~inside, sampling=spacing).astype(np.float32)
        out[inside] = distance_transform_edt(inside, sampling=spacing)[inside]
        return out
    # multi-label mode: each voxel's distance to the nearest voxel of the other label, both sides at once
    two_labels = inside.view(np.uint8) + np.uint8(1)
    return edt.edt(two_labels, anisotropy=tuple(float(s) for s in spacing), parallel=threads)


def edt_outside(outside: np.ndarray, spacing, threads: int | None = None) -> np.ndarray:
    """Distance (mm, float32) from every True voxel centre to the nearest False one (the ``edt``
    package when installed, else scipy; ``threads`` default :func:`default_threads`)."""
    threads = default_threads() if threads is None else max(1, int(threads))
    try:
        import edt
    except ImportError:
        from scipy.ndimage import distance_transform_edt

        return distance_transform_edt(outside, sampling=spacing).astype(np.float32)
    return edt.edt(outside, anisotropy=tuple(float(s) for s in spacing), parallel=threads)


def trilinear(grid: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``grid`` (I, J, K) or (I, J, K, C) at continuous indices ``q``
    (N, 3), clamped to the grid. Every spatial axis needs >= 2 samples. Returns float32 (N,) or (N, C).
    """
    shape = np.asarray(grid.shape[:3], dtype=np.int64)
    q = np.clip(q, 0.0, shape - 1)
    base = np.minimum(q.astype(np.int64), shape - 2)
    frac = (q - base).astype(np.float32)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    flat = grid.reshape(int(np.prod(shape)), -1)
    if flat.dtype == np.float32:
        take = flat.__getitem__
    else:  # e.g. a uint8 mask: convert the gathered corners only (differences must not wrap around)
        def take(ix):
            return flat[ix].astype(np.float32)
    index = base @ strides
    fx, fy, fz = (frac[:, a : a + 1] for a in range(3))

    def lerp_into(a, b, t):  # a += (b - a) * t, in place (large (N, C) temporaries are the cost here)
        b -= a
        b *= t
        a += b
        return a

    def plane(offset):  # bilinear in (j, k) at i = base_i + offset
        i = index + offset * strides[0]
        low = lerp_into(take(i), take(i + 1), fz)
        i += strides[1]
        high = lerp_into(take(i), take(i + 1), fz)
        return lerp_into(low, high, fy)

    out = lerp_into(plane(0), plane(1), fx)
    return out[:, 0] if grid.ndim == 3 else out


def _in_box(ijk_columns, lo, hi) -> np.ndarray:
    """Indices of points with ``lo <= ijk <= hi`` on every axis (axis by axis: cheap for few hits)."""
    i, j, k = ijk_columns
    idx = np.flatnonzero((i >= lo[0]) & (i <= hi[0]))
    for column, a in ((j, 1), (k, 2)):
        c = column[idx]
        idx = idx[(c >= lo[a]) & (c <= hi[a])]
    return idx


class _CoarseGrid:
    """Blocks of about ``COARSE_SPACING_MM`` over the image and the query points (voxel-index box)."""

    def __init__(self, ijk: np.ndarray, image_shape, spacing: np.ndarray):
        self.spacing = spacing
        self.factor = np.maximum(1, np.round(COARSE_SPACING_MM / spacing)).astype(np.int64)
        shape = np.asarray(image_shape, dtype=np.int64)
        cap = COARSE_MAX_EXTENSION * self.factor
        lo = np.maximum(np.minimum(0, np.floor(ijk.min(axis=0)).astype(np.int64)), -cap)
        hi = np.minimum(np.maximum(shape - 1, np.ceil(ijk.max(axis=0)).astype(np.int64)), shape - 1 + cap)
        self.lo = lo
        self.shape = np.maximum(2, -(-(hi - lo + 1) // self.factor))

    def occupancy_edt(self, box_mask: np.ndarray, box_lo: np.ndarray, threads: int) -> np.ndarray:
        """Distance (mm) from each block centre to the nearest block holding a voxel of the mask."""
        f = self.factor
        a0 = (box_lo - self.lo) // f
        a1 = (box_lo + np.asarray(box_mask.shape) - 1 - self.lo) // f
        first = self.lo + a0 * f - box_lo
        part = padded_crop(box_mask, first, first + (a1 - a0 + 1) * f - 1)
        nb = a1 - a0 + 1
        part = part.reshape(nb[0], f[0], nb[1], f[1], nb[2], f[2]).any(axis=(1, 3, 5))
        occupied = np.zeros(tuple(self.shape), dtype=bool)
        occupied[a0[0] : a1[0] + 1, a0[1] : a1[1] + 1, a0[2] : a1[2] + 1] = part
        return edt_outside(~occupied, self.spacing * f, threads)

    def evaluate(self, distance_grids: np.ndarray, ijk: np.ndarray) -> np.ndarray:
        """(N, C) outside distances (mm) at voxel indices from (I, J, K, C) block-centre grids."""
        q = (ijk - self.lo - 0.5 * (self.factor - 1)) / self.factor
        clamped = np.clip(q, 0.0, self.shape - 1)
        beyond_mm = np.linalg.norm((q - clamped) * (self.factor * self.spacing), axis=1).astype(np.float32)
        offset = np.float32(COARSE_OFFSET_BLOCKS * float(np.mean(self.factor * self.spacing)))
        return trilinear(distance_grids, clamped) + (beyond_mm + offset)[:, None]


class _FineField:
    """Signed distance (mm) to one structure near it: fine distance transform + surface refinement."""

    def __init__(self, box_mask: np.ndarray, box_lo: np.ndarray, mesh, ijk_to_ras: np.ndarray, threads: int):
        from scipy.spatial import cKDTree

        spacing = spacing_of(ijk_to_ras)
        self.spacing = spacing
        self.threads = threads
        voxel = float(spacing.max())
        self.band_mm = BAND_VOXELS * voxel
        self.full_mm = MLS_FULL_VOXELS * voxel
        margin = np.ceil(max(FINE_MARGIN_MM, 3.0 * voxel) / spacing).astype(np.int64)
        self.lo = np.asarray(box_lo, dtype=np.int64) - margin
        mask = padded_crop(box_mask, -margin, np.asarray(box_mask.shape) - 1 + margin)
        self.hi = self.lo + np.asarray(mask.shape) - 1
        self.mask = mask.view(np.uint8)
        sdf = _edt_both_sides(mask, spacing, threads).astype(np.float32, copy=False)
        sdf -= np.float32(SURFACE_OFFSET_VOXELS * spacing.min())
        self.sdf = np.negative(sdf, out=sdf, where=mask)  # in place: CT-sized crops are large
        self.mesh = mesh
        self.tree = None if mesh is None else cKDTree(mesh.vertices)

    def evaluate(self, local_ijk: np.ndarray, ras: np.ndarray) -> np.ndarray:
        d = trilinear(self.sdf, local_ijk)
        band = np.flatnonzero(np.abs(d) < self.band_mm)
        if band.size:
            d[band] = self._near(local_ijk[band], ras[band], d[band])
        return d

    def _near(self, local_ijk: np.ndarray, ras: np.ndarray, d_grid: np.ndarray) -> np.ndarray:
        value = d_grid.copy()
        weight = np.clip((self.band_mm - np.abs(d_grid)) / (self.band_mm - self.full_mm), 0.0, 1.0)
        refine = np.flatnonzero(weight > 0)
        if refine.size and self.tree is not None:
            w = weight[refine]
            value[refine] = w * self._mls_distance(ras[refine]) + (1.0 - w) * d_grid[refine]
        # where the label map is unambiguous (the occupancy near 0 or 1, e.g. at voxel centres) its
        # side wins over the smooth surface; rare (~0.1 % of near points on a 3 mm heart)
        occupancy = trilinear(self.mask, local_ijk)
        value[(occupancy >= 1.0 - SIGN_GUARD) & (value >= 0)] = -GUARD_MM
        value[(occupancy <= SIGN_GUARD) & (value <= 0)] = GUARD_MM
        return value

    def _mls_distance(self, ras: np.ndarray) -> np.ndarray:
        """Signed implicit moving-least-squares distance (mm) to the mesh vertices' tangent planes."""
        k = min(NEIGHBOURS, len(self.mesh.vertices))
        dist, nearest = self.tree.query(ras, k=k, workers=self.threads)
        if k == 1:
            dist, nearest = dist[:, None], nearest[:, None]
        offsets = ras[:, None, :] - self.mesh.vertices[nearest]
        plane = np.einsum("nkc,nkc->nk", offsets, self.mesh.vertex_normals[nearest])
        radius2 = np.maximum(dist[:, -1:] ** 2, 1e-12)
        weights = np.square(np.clip(1.0 - dist**2 / radius2, 0.0, None)) + 1e-12
        signed = (weights * plane).sum(axis=1) / weights.sum(axis=1)
        return (np.sign(signed) * np.minimum(np.abs(signed), dist[:, 0])).astype(np.float32)


def _ras_to_ijk(points: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS mm -> continuous voxel indices (same as geometry.ras_to_ijk_points, column-wise: faster
    than a (N, 3) @ (3, 3) product for large N)."""
    inv = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    out = np.empty_like(points)
    for a in range(3):
        out[:, a] = points[:, 0] * inv[a, 0] + points[:, 1] * inv[a, 1] + points[:, 2] * inv[a, 2] + inv[a, 3]
    return out


def signed_distances_mm(label_map, points_ras, labels, meshes=None, threads: int | None = None) -> np.ndarray:
    """Signed distance in mm (negative inside) from each point to each listed structure.

    ``label_map`` is a :class:`~HeartCompletionLib.io.labelmap.LabelMap`; ``points_ras`` (N, 3) RAS mm
    anywhere (inside or outside the image); ``labels`` the structures' label values. Returns
    float32 (N, len(labels)); a label that does not occur in the map gets a NaN column (no surface,
    no distance). ``meshes`` may hold surfaces from
    :func:`HeartCompletionLib.geometry.surface.structure_surfaces` to avoid extracting them again;
    ``threads`` (default :func:`default_threads`) is used by the distance transforms and KD-trees.
    """
    points = np.asarray(points_ras, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{label_map.source}: query points must be an (N, 3) array of RAS mm, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{label_map.source}: query points contain NaN or infinite coordinates")
    labels = [int(v) for v in labels]
    threads = default_threads() if threads is None else max(1, int(threads))
    out = np.full((len(points), len(labels)), np.nan, dtype=np.float32)
    boxes = structure_boxes(label_map.labels, labels)
    columns = [c for c, v in enumerate(labels) if v in boxes]
    if len(points) == 0 or not columns:
        return out
    spacing = spacing_of(label_map.ijk_to_ras)
    ijk = _ras_to_ijk(points, label_map.ijk_to_ras)

    # far tier for every point and structure at once; the fine tier overwrites what it covers
    coarse = _CoarseGrid(ijk, label_map.shape, spacing)
    grids = np.stack([coarse.occupancy_edt(*boxes[labels[c]], threads) for c in columns], axis=-1)
    for start in range(0, len(points), CHUNK_POINTS):  # chunks bound the (N, C) temporaries
        stop = start + CHUNK_POINTS
        out[start:stop, columns] = coarse.evaluate(grids, ijk[start:stop])
    del grids

    ijk_columns = [np.ascontiguousarray(ijk[:, a]) for a in range(3)]
    for c in columns:
        box_mask, box_lo = boxes[labels[c]]
        mesh = meshes.get(labels[c]) if meshes is not None else None
        if mesh is None:
            mesh = surface_from_box(box_mask, box_lo, label_map.ijk_to_ras)
        fine = _FineField(box_mask, box_lo, mesh, label_map.ijk_to_ras, threads)
        idx = _in_box(ijk_columns, fine.lo, fine.hi)
        if idx.size:
            out[idx, c] = fine.evaluate(ijk[idx] - fine.lo, points[idx])
    return out
