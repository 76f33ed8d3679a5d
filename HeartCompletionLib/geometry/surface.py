"""Surface extraction and area-uniform surface sampling of label-map structures, in RAS mm.

A structure's surface is the 0.5 iso-surface of its binary mask (marching cubes on the cropped,
zero-padded mask), mapped to RAS millimetres through the image's full IJK->RAS matrix. That
iso-surface is the same one :mod:`HeartCompletionLib.geometry.signed_distance` measures distances to, so
surface samples and signed distances agree.

Normals are *outward* whatever the matrix: oblique and axis-flipping (det < 0) matrices reverse
the triangle winding, so every normal here is oriented by the gradient of the (slightly smoothed)
mask occupancy, never by the winding. Vertex normals come from that gradient (transformed as a
covector, ``A^-T g``), so they are smooth (close to the normal of the underlying anatomy, not of
the voxel staircase); face normals are flipped where they disagree with their vertices.

>>> import numpy as np
>>> from HeartCompletionLib.geometry.affine import make_ijk_to_ras
>>> ball = np.linalg.norm(np.indices((21, 21, 21)) - 10.0, axis=0) <= 6.0
>>> mesh = extract_surface(ball, make_ijk_to_ras(spacing_mm=(2.0, 2.0, 2.0)))
>>> points, normals = sample_surface(mesh, 1000, np.random.default_rng(0))
>>> radius_mm = np.linalg.norm(points - 20.0, axis=1)
>>> bool(abs(radius_mm.mean() - 13.0) < 1.0), bool(np.all(np.sum(normals * (points - 20.0), axis=1) > 0))
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .affine import ijk_to_ras_points, spacing_of, validate_ijk_to_ras

#: Gaussian smoothing (in units of the largest voxel spacing) of the occupancy whose gradient
#: gives the vertex normals: enough to hide the voxel staircase, small enough for thin vessels.
NORMAL_SMOOTHING_VOXELS = 1.0


@dataclass
class SurfaceMesh:
    """A closed triangle mesh in RAS mm.

    ``vertices`` (V, 3) mm; ``faces`` (F, 3) vertex indices, wound so that the right-hand rule
    gives the outward normal; ``face_normals`` (F, 3) outward unit vectors; ``face_areas`` (F,)
    mm^2; ``vertex_normals`` (V, 3) outward unit vectors from the smoothed mask gradient.
    """

    vertices: np.ndarray
    faces: np.ndarray
    face_normals: np.ndarray
    face_areas: np.ndarray
    vertex_normals: np.ndarray | None = None

    @property
    def area_mm2(self) -> float:
        return float(self.face_areas.sum())


def mask_bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lo, hi)`` inclusive voxel-index bounds of the True voxels, or None for an empty mask."""
    lows, highs = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        lows.append(hits[0])
        highs.append(hits[-1])
    return np.array(lows), np.array(highs)


def padded_crop(mask: np.ndarray, lo, hi) -> np.ndarray:
    """``mask[lo:hi+1]`` per axis (inclusive), zero where the box leaves the image (any lo/hi)."""
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    out = np.zeros(tuple(hi - lo + 1), dtype=bool)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, np.asarray(mask.shape) - 1)
    if np.any(src_hi < src_lo):
        return out
    dst = tuple(slice(a - b, c - b + 1) for a, b, c in zip(src_lo, lo, src_hi))
    out[dst] = mask[tuple(slice(a, c + 1) for a, c in zip(src_lo, src_hi))]
    return out


def _check_mask(mask, ijk_to_ras, source: str) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{source}: a structure mask must be 3-D, got shape {mask.shape}")
    if mask.dtype != bool:
        mask = mask != 0
    return mask, validate_ijk_to_ras(ijk_to_ras, source)


def outward_normals_at(smoothed: np.ndarray, points_local_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) in RAS at continuous indices into the ``smoothed`` occupancy.

    The occupancy decreases outwards, so outward is ``-grad``; the gradient (central differences
    of the trilinear interpolant, half a voxel each way) is a covector, hence ``A^-T``, which
    stays right for flipped and oblique matrices. Zero rows where the gradient vanishes.
    """
    from scipy.ndimage import map_coordinates

    g_ijk = np.empty((len(points_local_ijk), 3))
    for axis in range(3):
        step = np.zeros(3)
        step[axis] = 0.5
        plus = map_coordinates(smoothed, (points_local_ijk + step).T, order=1, mode="nearest")
        minus = map_coordinates(smoothed, (points_local_ijk - step).T, order=1, mode="nearest")
        g_ijk[:, axis] = plus - minus
    a_inv_t = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]).T
    out = -(g_ijk @ a_inv_t.T)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 1e-12)


def structure_boxes(labels: np.ndarray, values) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{label: (box_mask, lo)}``: each listed label's tight bounding-box mask and its first voxel
    index, found in one pass over the volume (labels that do not occur are left out)."""
    from scipy.ndimage import find_objects

    values = [int(v) for v in values]
    wanted = [v for v in values if v > 0]
    if not wanted or labels.size == 0:
        return {}
    top = max(wanted)
    # find_objects wants non-negative integers; values above the largest wanted one are irrelevant
    slices = find_objects(np.clip(labels, 0, top + 1) if labels.min() < 0 else labels, max_label=top)
    boxes = {}
    for value in wanted:
        box = slices[value - 1]
        if box is not None:
            boxes[value] = (labels[box] == value, np.array([s.start for s in box], dtype=np.int64))
    return boxes


def extract_surface(mask, ijk_to_ras, source: str = "mask") -> SurfaceMesh:
    """Marching-cubes surface (level 0.5) of a binary mask, in RAS mm with outward normals.

    ``mask`` is a 3-D array (True/non-zero inside) on the grid of ``ijk_to_ras`` (4x4, voxel
    indices -> RAS mm). The mask is cropped to its bounding box and zero-padded, so a structure
    that touches the image border gets a closed surface there (the field-of-view cut). Raises
    ``ValueError`` (naming ``source``) for an empty or non-3-D mask or an invalid matrix.
    """
    mask, matrix = _check_mask(mask, ijk_to_ras, source)
    box = mask_bounding_box(mask)
    if box is None:
        raise ValueError(f"{source}: empty mask (no voxel set), there is no surface to extract")
    return surface_from_box(padded_crop(mask, box[0], box[1]), box[0], matrix)


def surface_from_box(box_mask: np.ndarray, lo, ijk_to_ras: np.ndarray) -> SurfaceMesh:
    """:func:`extract_surface` of a mask given as its bounding-box crop (``box_mask``, bool) whose
    first voxel has index ``lo`` in the grid of ``ijk_to_ras``."""
    from scipy.ndimage import gaussian_filter
    from skimage.measure import marching_cubes

    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = spacing_of(matrix)
    sigma_vox = NORMAL_SMOOTHING_VOXELS * spacing.max() / spacing
    pad = 2 + int(np.ceil(3.0 * sigma_vox.max()))  # room for the smoothing kernel around the surface
    crop = np.pad(box_mask.astype(np.float32), pad)
    origin = np.asarray(lo, dtype=np.int64) - pad

    verts_local, faces, _, _ = marching_cubes(crop, level=0.5, allow_degenerate=False)
    faces = faces.astype(np.int64)
    vertices = ijk_to_ras_points(verts_local + origin, matrix)
    smoothed = gaussian_filter(crop, sigma=sigma_vox, mode="constant", truncate=3.0)
    vertex_normals = outward_normals_at(smoothed, verts_local, matrix)

    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    keep = double_area > 1e-12
    faces, cross, double_area = faces[keep], cross[keep], double_area[keep]
    face_normals = cross / double_area[:, None]
    # orient every face by the mask gradient (its vertices' normals), not by the winding
    flip = np.einsum("ij,ij->i", face_normals, vertex_normals[faces].sum(axis=1)) < 0
    face_normals[flip] *= -1.0
    faces[flip] = faces[flip][:, ::-1]
    # a vertex whose smoothed gradient vanished (tiny structures) borrows its faces' normal
    bad = ~np.any(vertex_normals != 0, axis=1)
    if bad.any():
        acc = np.zeros_like(vertex_normals)
        np.add.at(acc, faces.ravel(), np.repeat(face_normals * double_area[:, None], 3, axis=0))
        acc_norm = np.linalg.norm(acc, axis=1, keepdims=True)
        fixed = np.divide(acc, acc_norm, out=np.zeros_like(acc), where=acc_norm > 0)
        vertex_normals[bad] = fixed[bad]
    return SurfaceMesh(vertices, faces, face_normals, 0.5 * double_area, vertex_normals)


def sample_surface(mesh: SurfaceMesh, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area on the mesh and their outward unit normals, float32 (n, 3) mm.

    Normals are the barycentric blend of the smooth vertex normals (falling back to the face
    normal where the blend degenerates or disagrees with the face's outward side).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"number of surface samples must be >= 0, got {n}")
    if len(mesh.faces) == 0:
        raise ValueError("cannot sample a mesh without faces")
    cdf = np.cumsum(mesh.face_areas, dtype=np.float64)
    face = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    face = np.minimum(face, len(cdf) - 1)
    # uniform barycentric coordinates (square-root trick)
    r1, r2 = np.sqrt(rng.random(n)), rng.random(n)
    bary = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)
    corners = mesh.faces[face]
    points = np.einsum("ij,ijk->ik", bary, mesh.vertices[corners])
    face_n = mesh.face_normals[face]
    if mesh.vertex_normals is None:
        normals = face_n
    else:
        normals = np.einsum("ij,ijk->ik", bary, mesh.vertex_normals[corners])
        length = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = np.divide(normals, length, out=np.zeros_like(normals), where=length > 1e-6)
        bad = np.einsum("ij,ij->i", normals, face_n) <= 0.0
        normals[bad] = face_n[bad]
    return points.astype(np.float32), normals.astype(np.float32)


def allocate_counts(areas, n_total: int, min_per_structure: int) -> np.ndarray:
    """Split ``n_total`` samples proportionally to ``areas`` with a floor per entry.

    The floor is capped so the floors fit (``n_total // len(areas)``); the rounding remainder
    goes to the largest fractional shares, so the counts always sum to ``n_total``.
    """
    areas = np.asarray(areas, dtype=np.float64)
    floor = min(int(min_per_structure), int(n_total) // len(areas))
    remaining = int(n_total) - floor * len(areas)
    share = remaining * areas / areas.sum()
    counts = floor + np.floor(share).astype(np.int64)
    leftover = int(n_total) - int(counts.sum())
    if leftover > 0:
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        counts[order[:leftover]] += 1
    return counts


def structure_surfaces(label_map, labels) -> dict[int, SurfaceMesh]:
    """``{label: SurfaceMesh}`` for the listed labels that occur in ``label_map`` (others skipped).

    Pass the result as ``meshes=`` to :func:`sample_structure_surfaces` and
    :func:`HeartCompletionLib.geometry.signed_distance.signed_distances_mm` to extract each surface once.
    """
    boxes = structure_boxes(label_map.labels, labels)
    return {value: surface_from_box(box, lo, label_map.ijk_to_ras) for value, (box, lo) in boxes.items()}


#: completion samples the input surfaces at about this voxel size: finer label maps (CT at
#: 0.35-0.5 mm) are block-averaged by whole factors first (see :func:`coarse_structure_surfaces`)
COARSE_SURFACE_MM = 1.0


def block_factors(spacing, target_mm: float = COARSE_SURFACE_MM) -> np.ndarray:
    """Whole block sizes per axis that keep blocks at most ``target_mm`` (1 where the voxel is larger)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    return np.maximum(1, np.floor(target_mm / spacing + 1e-6)).astype(np.int64)


def block_matrix(ijk_to_ras: np.ndarray, factors, lo=(0, 0, 0)) -> np.ndarray:
    """The ijk -> RAS matrix of the grid of ``factors``-sized blocks whose first block starts at
    voxel ``lo``: each block's index maps to the RAS mm of its centre.

    >>> block_matrix(np.diag([0.5, 0.5, 0.5, 1.0]), np.array([2, 2, 2]))[:3, 3].tolist()
    [0.25, 0.25, 0.25]
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    f = np.asarray(factors, dtype=np.float64)
    out = matrix.copy()
    out[:3, :3] = matrix[:3, :3] * f[None, :]
    out[:3, 3] = matrix[:3, :3] @ (np.asarray(lo, dtype=np.float64) + (f - 1) / 2.0) + matrix[:3, 3]
    return out


def block_mean(mask: np.ndarray, factors) -> np.ndarray:
    """Occupancy fraction (float32) of each ``factors`` block of a binary mask (zero-padded to whole blocks)."""
    f = np.asarray(factors, dtype=np.int64)
    padded_shape = -(-np.asarray(mask.shape) // f) * f
    counts = np.zeros(tuple(padded_shape), dtype=np.uint16)
    counts[tuple(slice(0, n) for n in mask.shape)] = mask
    for axis, k in enumerate(f):  # strided sums axis by axis (each pass shrinks the array)
        if k > 1:
            parts = [counts[(slice(None),) * axis + (slice(j, None, int(k)),)] for j in range(int(k))]
            total = parts[0] + parts[1]
            for part in parts[2:]:
                total += part
            counts = total
    return counts.astype(np.float32) / np.float32(np.prod(f))


def coarse_structure_surfaces(label_map, labels, target_mm: float = COARSE_SURFACE_MM) -> dict[int, SurfaceMesh]:
    """:func:`structure_surfaces` of a label map finer than ``target_mm``: each structure's mask is
    block-averaged by whole factors (:func:`block_factors`) and its surface is the 0.5 level of the
    occupancy fraction (the partial-volume surface, sub-voxel accurate at the coarse size), in RAS
    mm. Several times fewer voxels at CT resolution; the same as :func:`structure_surfaces` for a
    map of voxels >= ``target_mm / 2``."""
    matrix = np.asarray(label_map.ijk_to_ras, dtype=np.float64)
    factors = block_factors(spacing_of(matrix), target_mm)
    if np.all(factors == 1):
        return structure_surfaces(label_map, labels)
    meshes = {}
    for value, (box, lo) in structure_boxes(label_map.labels, labels).items():
        meshes[value] = surface_from_box(block_mean(box, factors), np.zeros(3, dtype=np.int64),
                                         block_matrix(matrix, factors, lo))
    return meshes


def sample_structure_surfaces(
    label_map, labels, n_total: int, rng: np.random.Generator, min_per_structure: int = 256, meshes=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform samples over several structures of a label map.

    Returns ``(points (n_total, 3) float32 mm, normals (n_total, 3) float32 outward,
    label_values (n_total,) int16)``; each structure gets samples in proportion to its surface
    area, at least ``min_per_structure`` (capped so the floors fit in ``n_total``). Labels that do
    not occur in the map get no samples; a ``ValueError`` (naming the map's source) is raised when
    none of them occurs. ``meshes`` may hold surfaces from :func:`structure_surfaces`.
    """
    labels = [int(v) for v in labels]
    if meshes is None:
        meshes = structure_surfaces(label_map, labels)
    present = [v for v in labels if v in meshes]
    if not present:
        raise ValueError(f"{label_map.source}: none of the labels {labels} occurs in the label map")
    counts = allocate_counts([meshes[v].area_mm2 for v in present], n_total, min_per_structure)
    points, normals, values = [], [], []
    for label, count in zip(present, counts):
        p, nrm = sample_surface(meshes[label], int(count), rng)
        points.append(p)
        normals.append(nrm)
        values.append(np.full(int(count), label, dtype=np.int16))
    return np.concatenate(points), np.concatenate(normals), np.concatenate(values)
