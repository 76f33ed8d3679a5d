import numpy as np
import pytest

from HeartCompletionLib.geometry.affine import (
    LPS_TO_RAS,
    ijk_to_ras_points,
    make_ijk_to_ras,
    ras_to_ijk_points,
    rotation_matrix,
    spacing_of,
)
from HeartCompletionLib.geometry.normalization import Normalization


def test_points_and_distances_share_one_scale():
    norm = Normalization(scale_mm=100.0)
    pts = np.random.default_rng(0).normal(size=(100, 3)) * 40 + [10, -20, 300]
    c = norm.centre_mm(pts)
    pts_n = norm.points_to_network(pts, c)
    # a distance of 7 mm between two points stays 7 mm when both are mapped back
    a, b = pts[0], pts[0] + [7.0, 0, 0]
    da = np.linalg.norm(norm.points_to_network(b, c) - norm.points_to_network(a, c))
    assert da == pytest.approx(norm.distance_to_network(7.0))
    assert np.allclose(norm.points_to_mm(pts_n, c), pts)
    assert np.allclose(pts_n.mean(axis=0), 0, atol=1e-12)


def test_scale_is_fixed_not_per_case():
    norm = Normalization()
    small = np.random.default_rng(1).normal(size=(50, 3)) * 10
    big = small * 3
    # a three times bigger heart is three times bigger in network units
    r_small = np.abs(norm.points_to_network(small, norm.centre_mm(small))).max()
    r_big = np.abs(norm.points_to_network(big, norm.centre_mm(big))).max()
    assert r_big == pytest.approx(3 * r_small)


def test_bad_normalization_refused():
    with pytest.raises(ValueError):
        Normalization(scale_mm=0)
    with pytest.raises(ValueError):
        Normalization(centre_rule="bbox")


def test_ijk_ras_round_trip_oblique_flipped():
    rot = rotation_matrix([1, 2, 3], 0.4) @ np.diag([-1, 1, 1])
    m = make_ijk_to_ras((0.6, 0.6, 1.5), (10, -5, 30), rot)
    assert np.allclose(spacing_of(m), [0.6, 0.6, 1.5])
    ijk = np.random.default_rng(2).uniform(0, 50, size=(20, 3))
    assert np.allclose(ras_to_ijk_points(ijk_to_ras_points(ijk, m), m), ijk)
    assert np.allclose(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


def test_sheared_matrix_refused():
    m = np.eye(4)
    m[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        make_ijk_to_ras(direction=m[:3, :3])
