"""Surface extraction/sampling and signed distances in mm, against analytic shapes.

Spheres and ellipsoids are rasterised analytically (voxel centres inside the implicit surface) in
four geometries (isotropic RAS, LPS with flipped axes, anisotropic 0.6 x 0.6 x 1.5 mm, oblique and
flipped); the exact distance to the analytic surface is the reference. Grids stay small (<= ~64^3
voxels-equivalent) so the file runs in seconds on two cores.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy.spatial import cKDTree

from HeartCompletionLib.geometry.affine import make_ijk_to_ras, rotation_matrix, voxel_centers_ras
from HeartCompletionLib.geometry.signed_distance import signed_distances_mm
from HeartCompletionLib.geometry.surface import (
    allocate_counts,
    block_factors,
    block_mean,
    coarse_structure_surfaces,
    extract_surface,
    sample_structure_surfaces,
    sample_surface,
    structure_surfaces,
)
from HeartCompletionLib.io.labelmap import LabelMap

CENTRE = np.array([12.0, -30.0, 45.0])  # RAS mm, away from the origin on purpose
FIELD_MM = 64.0  # physical extent of every test grid (per axis)

# name -> (spacing mm, 3x3 direction). LPS: the first two voxel axes point left/posterior
# (RAS -x, -y), as DICOM/NRRD images do; "oblique" is rotated about a skew axis and flipped.
GEOMETRIES = {
    "ras_1mm": ((1.0, 1.0, 1.0), np.eye(3)),
    "lps_flipped": ((1.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0])),
    "aniso_0.6x0.6x1.5": ((0.6, 0.6, 1.5), np.eye(3)),
    "oblique_flipped": ((1.1, 0.9, 1.0), rotation_matrix([1.0, 2.0, 3.0], 0.6) @ np.diag([1.0, -1.0, 1.0])),
}


class Ellipsoid:
    """Axis-aligned-then-rotated ellipsoid with semi-axes ``radii`` (mm) and the exact distance."""

    def __init__(self, radii, rotation=None, centre=CENTRE):
        self.radii = np.asarray(radii, dtype=np.float64)
        self.rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
        self.centre = np.asarray(centre, dtype=np.float64)

    def local(self, points):
        return (np.asarray(points, dtype=np.float64) - self.centre) @ self.rotation

    def inside(self, points):
        return np.sum((self.local(points) / self.radii) ** 2, axis=-1) <= 1.0

    def closest_local(self, y):
        """Closest surface point (local frame) by bisection on the Lagrange parameter (Eberly)."""
        a2 = self.radii**2
        ay = np.abs(y) + 1e-12
        lo = np.full(len(y), -a2.min() + 1e-12)
        hi = np.full(len(y), np.linalg.norm(ay * self.radii, axis=1) + 1.0)
        for _ in range(80):
            t = 0.5 * (lo + hi)
            f = np.sum((self.radii * ay / (t[:, None] + a2)) ** 2, axis=1) - 1.0
            lo = np.where(f > 0, t, lo)
            hi = np.where(f > 0, hi, t)
        t = 0.5 * (lo + hi)
        return np.sign(y) * (a2 * ay / (t[:, None] + a2))

    def distance(self, points):
        """Exact signed distance (mm, negative inside) for points off the medial axis."""
        y = self.local(points).reshape(-1, 3)
        d = np.linalg.norm(y - self.closest_local(y), axis=1)
        return np.where(self.inside(points).reshape(-1), -d, d)

    def distance_gradient(self, points):
        """Unit gradient (RAS) of the exact signed distance: away from the closest surface point."""
        y = self.local(points).reshape(-1, 3)
        g = y - self.closest_local(y)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        g[self.inside(points).reshape(-1)] *= -1.0
        return g @ self.rotation.T

    def normal(self, points):
        """Outward unit normal (RAS) of the implicit function at (surface) points."""
        g = self.local(points) / self.radii**2
        n = g @ self.rotation.T
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    def surface_points(self, n, rng):
        """Points on the surface (not area-uniform; fine for probing distances)."""
        u = rng.normal(size=(n, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return (u * self.radii) @ self.rotation.T + self.centre


SHAPES = {
    "sphere": Ellipsoid([18.0, 18.0, 18.0]),
    "ellipsoid": Ellipsoid([24.0, 17.0, 12.0], rotation_matrix([0.3, -1.0, 0.5], 0.7)),
}


def grid_for(geometry: str, field_mm: float = FIELD_MM, centre=CENTRE):
    """(shape, ijk_to_ras) of a grid of the named geometry centred on ``centre``."""
    spacing, direction = GEOMETRIES[geometry]
    spacing = np.asarray(spacing)
    shape = tuple(int(np.ceil(field_mm / s)) for s in spacing)
    offset = direction @ ((np.asarray(shape) - 1) / 2.0 * spacing)
    return shape, make_ijk_to_ras(spacing, centre - offset, direction)


def rasterise(shape_obj: Ellipsoid, geometry: str, value: int = 3, field_mm: float = FIELD_MM) -> LabelMap:
    shape, matrix = grid_for(geometry, field_mm)
    inside = shape_obj.inside(voxel_centers_ras(shape, matrix))
    labels = np.zeros(shape, dtype=np.int16)
    labels[inside] = value
    return LabelMap(labels, matrix, source=f"<{geometry}>")


def near_surface_points(shape_obj: Ellipsoid, band_mm: float, n: int, rng) -> np.ndarray:
    on = shape_obj.surface_points(n, rng)
    return on + shape_obj.normal(on) * rng.uniform(-band_mm, band_mm, size=(n, 1))


CASES = [(s, g) for s in SHAPES for g in GEOMETRIES]


@pytest.fixture(scope="module")
def label_maps():
    return {(s, g): rasterise(SHAPES[s], g) for s, g in CASES}


@pytest.mark.parametrize("shape_name,geometry", CASES)
def test_near_surface_error_below_half_voxel(label_maps, shape_name, geometry):
    shape_obj, lm = SHAPES[shape_name], label_maps[(shape_name, geometry)]
    voxel = float(lm.spacing_mm.max())
    pts = near_surface_points(shape_obj, 2.0 * voxel, 4000, np.random.default_rng(1))
    d = signed_distances_mm(lm, pts, [3])[:, 0]
    err = np.abs(d - shape_obj.distance(pts))
    assert d.dtype == np.float32 and d.shape == (len(pts),)
    assert err.mean() < 0.5 * voxel, f"mean near-surface error {err.mean():.3f} mm >= half voxel {0.5 * voxel}"
    assert np.percentile(err, 99) < 1.5 * voxel


@pytest.mark.parametrize("shape_name,geometry", CASES)
def test_sign_agrees_away_from_boundary(label_maps, shape_name, geometry):
    shape_obj, lm = SHAPES[shape_name], label_maps[(shape_name, geometry)]
    voxel = float(lm.spacing_mm.max())
    rng = np.random.default_rng(2)
    # uniform in a box a bit larger than the image (some points beyond it), plus a near band
    pts = np.concatenate([CENTRE + rng.uniform(-40.0, 40.0, size=(6000, 3)),
                          near_surface_points(shape_obj, 3.0 * voxel, 4000, rng)])
    d = signed_distances_mm(lm, pts, [3])[:, 0]
    truth = shape_obj.distance(pts)
    away = np.abs(truth) > voxel
    agree = np.mean(np.sign(d[away]) == np.sign(truth[away]))
    assert agree >= 0.999, f"sign agreement {agree:.5f} < 0.999"
    assert np.all(np.isfinite(d))


def test_far_distances_stay_close(label_maps):
    """Beyond the fine tier the coarse tier errs by about a coarse block at most."""
    shape_obj = SHAPES["sphere"]
    lm = label_maps[("sphere", "ras_1mm")]
    u = np.random.default_rng(3).normal(size=(2000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pts = CENTRE + u * np.random.default_rng(4).uniform(30.0, 120.0, size=(2000, 1))
    d = signed_distances_mm(lm, pts, [3])[:, 0]
    err = np.abs(d - shape_obj.distance(pts))
    assert err.max() < 2.5 and err.mean() < 1.0


def test_points_outside_image_are_outside():
    # a box structure touching the image border: beyond the border nothing is inside
    shape, matrix = grid_for("lps_flipped", 32.0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:10, 5:20, 5:20] = 1
    lm = LabelMap(labels, matrix)
    beyond_ijk = np.array([[-0.6, 10, 10], [-3.0, 10, 10], [-50.0, 12, 12], [-2.0, -5.0, 40.0]])
    beyond = beyond_ijk @ matrix[:3, :3].T + matrix[:3, 3]
    d = signed_distances_mm(lm, beyond, [1])[:, 0]
    assert np.all(d > 0)
    # the structure ends at the border (its face at i = -0.5): 0.1, 2.5 and 49.5 voxels away
    # (flat faces are the worst case of the voxel-centre offset: within a quarter voxel)
    np.testing.assert_allclose(d[:3], [0.1, 2.5, 49.5], atol=0.3)


def test_absent_label_gives_nan_and_bad_points_raise():
    lm = rasterise(SHAPES["sphere"], "ras_1mm")
    d = signed_distances_mm(lm, CENTRE[None], [3, 7])
    assert d[0, 0] < -15.0 and np.isnan(d[0, 1])
    with pytest.raises(ValueError, match="<ras_1mm>.*\\(N, 3\\)"):
        signed_distances_mm(lm, np.zeros((4, 2)), [3])
    with pytest.raises(ValueError, match="NaN"):
        signed_distances_mm(lm, np.array([[0.0, np.nan, 0.0]]), [3])
    assert signed_distances_mm(lm, np.zeros((0, 3)), [3]).shape == (0, 1)
    # threads change the speed, never the values
    pts = near_surface_points(SHAPES["sphere"], 3.0, 2000, np.random.default_rng(14))
    np.testing.assert_array_equal(signed_distances_mm(lm, pts, [3], threads=1), signed_distances_mm(lm, pts, [3], threads=2))


def test_empty_mask_raises():
    shape, matrix = grid_for("ras_1mm", 16.0)
    with pytest.raises(ValueError, match="my structure: empty mask"):
        extract_surface(np.zeros(shape, dtype=bool), matrix, source="my structure")
    with pytest.raises(ValueError, match="3-D"):
        extract_surface(np.ones((4, 4), dtype=bool), matrix)
    lm = LabelMap(np.zeros(shape, dtype=np.uint8), matrix, source="empty.nii.gz")
    with pytest.raises(ValueError, match="empty.nii.gz: none of the labels"):
        sample_structure_surfaces(lm, [1, 2], 100, np.random.default_rng(0))


def test_tiny_structure_still_works():
    shape, matrix = grid_for("oblique_flipped", 24.0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10, 11, 12] = 9  # one voxel
    labels[3:5, 3:5, 3:4] = 2  # four voxels
    lm = LabelMap(labels, matrix)
    pts, nrm, values = sample_structure_surfaces(lm, [9, 2], 200, np.random.default_rng(0), min_per_structure=50)
    assert set(np.unique(values)) == {2, 9} and np.sum(values == 9) >= 50
    centre9 = matrix[:3, :3] @ [10, 11, 12] + matrix[:3, 3]
    # outward: away from the voxel centre
    radial = pts[values == 9] - centre9
    assert np.all(np.sum(radial * nrm[values == 9], axis=1) > 0)
    d = signed_distances_mm(lm, np.stack([centre9, centre9 + [0.0, 0.0, 5.0]]), [9])[:, 0]
    assert d[0] < 0 < d[1] and 3.0 < d[1] < 5.0


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_surface_samples_on_surface_with_outward_normals(label_maps, geometry):
    shape_obj, lm = SHAPES["ellipsoid"], label_maps[("ellipsoid", geometry)]
    if geometry == "oblique_flipped":  # the case where triangle winding would turn normals inwards
        assert np.linalg.det(lm.ijk_to_ras[:3, :3]) < 0
    voxel = float(lm.spacing_mm.max())
    mesh = extract_surface(lm.labels == 3, lm.ijk_to_ras)
    pts, nrm = sample_surface(mesh, 20000, np.random.default_rng(5))
    assert pts.dtype == np.float32 and nrm.shape == (20000, 3)
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=1e-4)
    off = np.abs(shape_obj.distance(pts))
    assert off.mean() < 0.3 * voxel and off.max() < voxel
    dots = np.sum(nrm * shape_obj.normal(pts), axis=1)
    assert np.mean(dots > 0.9) > 0.99, f"only {np.mean(dots > 0.9):.4f} normals within 25 deg"
    assert np.all(dots > 0)
    # face normals agree with the winding after orientation, whatever det(ijk_to_ras)
    tri = mesh.vertices[mesh.faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert np.all(np.sum(cross * mesh.face_normals, axis=1) > 0)
    # closed surface: the divergence theorem gives the enclosed volume (~ analytic volume)
    volume = np.sum(np.sum(tri[:, 0] * mesh.face_normals, axis=1) * mesh.face_areas) / 3.0
    analytic = 4.0 / 3.0 * np.pi * np.prod(shape_obj.radii)
    assert abs(volume / analytic - 1.0) < 0.03


def test_area_uniform_sampling():
    shape_obj, lm = SHAPES["sphere"], rasterise(SHAPES["sphere"], "oblique_flipped")
    mesh = extract_surface(lm.labels == 3, lm.ijk_to_ras)
    assert abs(mesh.area_mm2 / (4 * np.pi * 18.0**2) - 1.0) < 0.1  # staircase adds a few percent
    pts, _ = sample_surface(mesh, 80000, np.random.default_rng(6))
    rel = pts - shape_obj.centre
    octant = (rel[:, 0] > 0) * 4 + (rel[:, 1] > 0) * 2 + (rel[:, 2] > 0)
    counts = np.bincount(octant, minlength=8)
    assert np.all(np.abs(counts / counts.mean() - 1.0) < 0.05), counts
    # polar caps vs equatorial belt of equal area (z in [0.5R, R] vs [-0.25R, 0.25R])
    z = rel[:, 2] / 18.0
    cap, belt = np.sum(z > 0.5), np.sum(np.abs(z) < 0.25)
    assert abs(cap / belt - 1.0) < 0.08


def test_same_shape_two_geometries_same_physical_samples(label_maps):
    a = label_maps[("ellipsoid", "ras_1mm")]
    b = label_maps[("ellipsoid", "oblique_flipped")]
    rng = np.random.default_rng(7)
    pa, _, _ = sample_structure_surfaces(a, [3], 20000, rng)
    pb, _, _ = sample_structure_surfaces(b, [3], 20000, rng)
    chamfer = 0.5 * (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean())
    assert chamfer < 1.0, chamfer
    assert abs(pa.mean(axis=0) - pb.mean(axis=0)).max() < 0.5  # same place in RAS


def test_structure_sampling_proportional_to_area_with_floor():
    shape, matrix = grid_for("aniso_0.6x0.6x1.5", 64.0)
    centres = voxel_centers_ras(shape, matrix)
    labels = np.zeros(shape, dtype=np.int16)
    big = Ellipsoid([14.0, 14.0, 14.0], centre=CENTRE + [-12.0, 0, 0])
    small = Ellipsoid([4.0, 4.0, 4.0], centre=CENTRE + [18.0, 0, 0])
    labels[big.inside(centres)] = 5
    labels[small.inside(centres)] = 1
    lm = LabelMap(labels, matrix)
    meshes = structure_surfaces(lm, [1, 5, 8])
    assert set(meshes) == {1, 5}
    pts, nrm, values = sample_structure_surfaces(lm, [5, 1, 8], 10000, np.random.default_rng(8),
                                                 min_per_structure=2000, meshes=meshes)
    n_small, n_big = np.sum(values == 1), np.sum(values == 5)
    assert n_small + n_big == 10000 and len(pts) == len(nrm) == 10000
    # the floor first, then the rest by area (the encoder-input rule)
    area_share = meshes[1].area_mm2 / (meshes[1].area_mm2 + meshes[5].area_mm2)
    assert abs(n_small - (2000 + 6000 * area_share)) <= 1
    assert values.dtype == np.int16
    # without the floor the split follows the areas
    _, _, values = sample_structure_surfaces(lm, [5, 1], 10000, np.random.default_rng(8), min_per_structure=0)
    assert abs(np.mean(values == 1) - area_share) < 1e-3
    # distances with precomputed meshes are the same as without
    q = np.concatenate([big.surface_points(500, np.random.default_rng(9)), small.surface_points(500, np.random.default_rng(9))])
    np.testing.assert_array_equal(signed_distances_mm(lm, q, [1, 5], meshes=meshes), signed_distances_mm(lm, q, [1, 5]))


def test_allocate_counts_sums_and_floor():
    counts = allocate_counts([1000.0, 10.0, 1.0], 1000, 100)
    assert counts.sum() == 1000 and counts.min() >= 100 and counts[0] > counts[1]
    assert allocate_counts([1.0, 1.0, 1.0], 10, 100).tolist() == [4, 3, 3]


def test_sign_is_the_label_map_at_every_voxel_centre():
    """On a coarse synthetic heart (3 mm voxels: one-voxel-thin coronaries, oblique and flipped
    grid), distances at voxel centres are negative exactly where the label map holds the
    structure, and within ~half a voxel of zero on its boundary voxels (the iso-surface crosses
    the edge to an outside neighbour at its midpoint)."""
    from scipy.ndimage import binary_erosion

    from HeartCompletionLib.io.synthetic import synthetic_label_map

    lm = synthetic_label_map(seed=3, spacing_mm=3.0, direction=rotation_matrix([1.0, 0.0, 1.0], 0.4), flip_axes=(1,))
    labels = lm.present_labels()
    assert len(labels) == 10 and np.linalg.det(lm.ijk_to_ras[:3, :3]) < 0
    pick = np.random.default_rng(10).choice(lm.labels.size, 120_000, replace=False)
    centres = voxel_centers_ras(lm.shape, lm.ijk_to_ras).reshape(-1, 3)[pick]
    d = signed_distances_mm(lm, centres, labels)
    inside = lm.labels.reshape(-1)[pick, None] == np.asarray(labels)[None, :]
    assert np.array_equal(d < 0, inside)
    for c, value in enumerate(labels):
        mask = lm.labels == value
        boundary = (mask & ~binary_erosion(mask)).reshape(-1)[pick]
        assert np.all(np.abs(d[boundary, c]) < 0.75 * 3.0), value


def test_without_edt_package_scipy_gives_the_same(monkeypatch, label_maps):
    """``edt`` is an optional extra: without it the scipy distance transform gives the same field."""
    lm = label_maps[("ellipsoid", "aniso_0.6x0.6x1.5")]
    rng = np.random.default_rng(11)
    pts = np.concatenate([CENTRE + rng.uniform(-45.0, 45.0, size=(3000, 3)),
                          near_surface_points(SHAPES["ellipsoid"], 3.0, 3000, rng)])
    fast = signed_distances_mm(lm, pts, [3])
    monkeypatch.setitem(sys.modules, "edt", None)  # makes `import edt` raise ImportError
    np.testing.assert_allclose(signed_distances_mm(lm, pts, [3]), fast, atol=1e-4)


def test_same_heart_in_two_geometries_gives_the_same_distances():
    """One synthetic heart rasterised on a 2 mm grid and on an oblique, flipped 1.6 x 1.6 x 2.5 mm
    grid: distances at the same physical points agree to a fraction of a voxel."""
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    a = synthetic_label_map(seed=2, spacing_mm=2.0)
    b = synthetic_label_map(seed=2, spacing_mm=(1.6, 1.6, 2.5), direction=rotation_matrix([1.0, 1.0, 0.0], 0.5),
                            flip_axes=(0,))
    labels = list(range(1, 11))
    rng = np.random.default_rng(12)
    surface, _, values = sample_structure_surfaces(a, labels, 10_000, rng, min_per_structure=300)
    q = surface + rng.normal(size=surface.shape) * 2.0
    da, db = signed_distances_mm(a, q, labels), signed_distances_mm(b, q, labels)
    rows = np.arange(len(q))
    own = np.abs(da[rows, values - 1] - db[rows, values - 1])
    assert own.mean() < 0.5 and np.percentile(own, 99) < 2.0, (own.mean(), np.percentile(own, 99))
    away = np.abs(da) > 2.5
    assert np.mean(np.sign(da[away]) == np.sign(db[away])) > 0.999


@pytest.mark.parametrize("geometry", ["ras_1mm", "aniso_0.6x0.6x1.5"])
def test_distance_field_is_continuous_with_unit_slope(label_maps, geometry):
    """Near the surface the tiers and the occupancy sign blend without jumps: finite-difference
    gradients keep a norm near 1 (a jump at the sign change would give norms of several)."""
    shape_obj, lm = SHAPES["ellipsoid"], label_maps[("ellipsoid", geometry)]
    pts = near_surface_points(shape_obj, 4.0, 3000, np.random.default_rng(13))
    h = 0.05
    grad = np.stack([(signed_distances_mm(lm, pts + h * e, [3])[:, 0] - signed_distances_mm(lm, pts - h * e, [3])[:, 0])
                     / (2 * h) for e in np.eye(3)], axis=1)
    norm = np.linalg.norm(grad, axis=1)
    assert 0.9 < norm.mean() < 1.15 and np.percentile(norm, 99) < 2.0, (norm.mean(), np.percentile(norm, 99))
    # and it points along the exact distance gradient (away from the closest surface point)
    cosine = np.sum(grad * shape_obj.distance_gradient(pts), axis=1) / norm
    # (thick 1.5 mm slices leave a little of their staircase in the directions right at the surface)
    assert np.mean(cosine > 0.9) > (0.95 if geometry == "ras_1mm" else 0.9), np.mean(cosine > 0.9)


# --- input surfaces of label maps finer than 1 mm (completion at CT resolution) ------------------
def test_block_mean_is_the_occupancy_of_each_block():
    mask = np.random.default_rng(0).random((13, 10, 7)) > 0.5
    for factors in ([2, 2, 2], [3, 1, 2], [1, 1, 1]):
        f = np.array(factors)
        shape = -(-np.array(mask.shape) // f) * f
        padded = np.zeros(shape)
        padded[:13, :10, :7] = mask
        n = shape // f
        expected = padded.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(block_mean(mask, factors), expected, atol=1e-6)
    assert block_factors([0.4, 0.5, 0.35]).tolist() == [2, 2, 2] and block_factors([0.6, 1.0, 2.0]).tolist() == [1, 1, 1]


@pytest.mark.parametrize("oblique", [False, True])
def test_coarse_surfaces_of_a_fine_ball_lie_on_the_sphere(oblique):
    """A 0.4 x 0.4 x 0.5 mm ball (radius 12 mm): block-averaged to 0.8 x 0.8 x 1.0 mm, its surface
    stays within a fifth of a millimetre of the sphere, outward, with the fine surface's area."""
    spacing = np.array([0.4, 0.4, 0.5])
    shape = (80, 80, 64)
    direction = rotation_matrix(np.array([1.0, 1.0, 0.0]) / np.sqrt(2), 0.5) if oblique else np.eye(3)
    matrix = make_ijk_to_ras(spacing_mm=spacing, direction=direction, origin_ras=(3.0, -2.0, 1.0))
    centre = voxel_centers_ras(shape, matrix).reshape(-1, 3).mean(axis=0)
    inside = np.linalg.norm(voxel_centers_ras(shape, matrix) - centre, axis=-1) <= 12.0
    lm = LabelMap(inside.astype(np.int16), matrix)
    coarse = coarse_structure_surfaces(lm, [1])[1]
    fine = structure_surfaces(lm, [1])[1]
    radius = np.linalg.norm(coarse.vertices - centre, axis=1)
    print("coarse radius mean / max |error| mm", radius.mean().round(3), np.abs(radius - 12.0).max().round(3),
          "vertices coarse / fine", len(coarse.vertices), len(fine.vertices))
    assert np.abs(radius - 12.0).max() < 0.2 and len(coarse.vertices) < 0.4 * len(fine.vertices)
    assert np.all(np.einsum("ij,ij->i", coarse.vertex_normals, coarse.vertices - centre) > 0)
    assert abs(coarse.area_mm2 / (4 * np.pi * 144.0) - 1.0) < 0.05
    # a map whose voxels are already >= half of 1 mm is not touched
    lm2 = LabelMap(inside[::2, ::2, ::2].astype(np.int16), matrix @ np.diag([2.0, 2.0, 2.0, 1.0]))
    a, b = coarse_structure_surfaces(lm2, [1])[1], structure_surfaces(lm2, [1])[1]
    np.testing.assert_array_equal(a.vertices, b.vertices)
