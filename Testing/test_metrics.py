"""Metrics against values known by hand, evaluation scenarios, and the nearest-case baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from heart_training.evaluation.baseline import NearestCaseBaseline, describe_label_map
from heart_training.evaluation.scenarios import case_scenario, resolve_scenarios, scenario_names
from scipy import ndimage
from scipy.spatial import cKDTree

from HeartCompletionLib.geometry.affine import ijk_to_ras_points, make_ijk_to_ras
from HeartCompletionLib.geometry.metrics import (
    assd_mm,
    dice,
    hd95_mm,
    structure_metrics,
    summarize,
    surface_distances_mm,
    volume_error_percent,
)
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.structures.table import StructureTable


@pytest.fixture(params=["scipy", "edt"])
def distance_backend(request, monkeypatch):
    """Run a test with each distance transform (scipy's, and the optional edt package's)."""
    import HeartCompletionLib.geometry.metrics as metrics

    if request.param == "edt" and metrics._edt is None:
        pytest.skip("the optional edt package is not installed")
    monkeypatch.setattr(metrics, "DISTANCE_BACKEND", request.param)
    return request.param


FLIP_OBLIQUE = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # det +1, axes swapped/negated


def cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def brute_force_distances(a, b, ijk_to_ras):
    """Boundary-voxel distances by k-d tree on RAS points: an independent check of the EDT path."""
    def border_points(m):
        border = m & ~ndimage.binary_erosion(m, border_value=0)
        return ijk_to_ras_points(np.argwhere(border), ijk_to_ras)

    pa, pb = border_points(a), border_points(b)
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


# --- metric values known by hand -------------------------------------------------------------
@pytest.mark.parametrize(
    "spacing, direction, axis",
    [((1.0, 1.0, 1.0), None, 0), ((0.5, 1.0, 2.0), None, 2), ((0.7, 1.3, 1.6), FLIP_OBLIQUE, 1)],
)
def test_shifted_cubes(spacing, direction, axis, distance_backend):
    shift_vox = 3
    affine = make_ijk_to_ras(spacing, origin_ras=(-20.0, 5.0, 7.0), direction=direction)
    start = [4, 4, 4]
    a = cube((24, 24, 24), start, (10, 10, 10))
    start_b = list(start)
    start_b[axis] += shift_vox
    b = cube((24, 24, 24), start_b, (10, 10, 10))
    # overlap is 7 of 10 slices along the shift: Dice = 2 * 700 / 2000
    assert dice(a, b) == pytest.approx(0.7)
    shift_mm = shift_vox * spacing[axis]
    # the far faces (100 of 488 boundary voxels each way, > 5 %) sit exactly one shift apart
    assert hd95_mm(a, b, affine) == pytest.approx(shift_mm)
    d_ab, d_ba = brute_force_distances(a, b, affine)
    assert d_ab.max() == pytest.approx(shift_mm) and d_ba.max() == pytest.approx(shift_mm)
    assert assd_mm(a, b, affine) == pytest.approx(np.concatenate([d_ab, d_ba]).mean())
    assert 0 < assd_mm(a, b, affine) < shift_mm
    assert volume_error_percent(b, a) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 0.9, 2.5)])
def test_parallel_plates_assd_equals_shift(spacing, distance_backend):
    """One-voxel-thick plates: every boundary voxel is exactly one shift from the other plate."""
    affine = make_ijk_to_ras(spacing)
    a = cube((8, 20, 20), (2, 3, 3), (1, 12, 12))
    b = cube((8, 20, 20), (5, 3, 3), (1, 12, 12))
    assert dice(a, b) == 0.0
    assert assd_mm(a, b, affine) == pytest.approx(3 * spacing[0])
    assert hd95_mm(a, b, affine) == pytest.approx(3 * spacing[0])


def test_concentric_spheres_assd_is_radius_difference(distance_backend):
    spacing = (0.8, 0.8, 1.2)
    shape = (48, 48, 32)
    affine = make_ijk_to_ras(spacing, origin_ras=(-19.0, -19.0, -18.6))
    centres = ijk_to_ras_points(np.argwhere(np.ones(shape, bool)), affine).reshape(*shape, 3)
    radius = np.linalg.norm(centres, axis=-1)
    inner, outer = radius <= 9.0, radius <= 14.0
    # boundary voxels lie within one voxel of the true spheres, so ASSD ~ 5 mm within ~ a voxel
    assert assd_mm(inner, outer, affine) == pytest.approx(5.0, abs=0.8)
    assert hd95_mm(inner, outer, affine) == pytest.approx(5.0, abs=1.3)
    expected = 100.0 * (14.0**3 - 9.0**3) / 9.0**3
    assert volume_error_percent(outer, inner) == pytest.approx(expected, rel=0.08)


def test_distances_do_not_depend_on_voxel_order():
    """The same physical masks stored with a flipped axis give the same distances."""
    affine = make_ijk_to_ras((1.0, 2.0, 1.5))
    a = cube((20, 12, 16), (3, 2, 4), (6, 5, 7))
    b = cube((20, 12, 16), (6, 4, 3), (9, 3, 8))
    flipped = affine @ np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert hd95_mm(a, b, affine) == pytest.approx(hd95_mm(a[::-1], b[::-1], flipped))
    assert assd_mm(a, b, affine) == pytest.approx(assd_mm(a[::-1], b[::-1], flipped))


def test_masks_touching_the_image_border_match_brute_force(distance_backend):
    affine = make_ijk_to_ras((1.5, 1.5, 2.0))
    a = cube((12, 12, 12), (0, 0, 3), (7, 12, 5))
    b = cube((12, 12, 12), (2, 1, 0), (10, 6, 12))
    d_ab, d_ba = surface_distances_mm(a, b, affine)
    ref_ab, ref_ba = brute_force_distances(a, b, affine)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(ref_ab), atol=1e-5)  # edt works in float32
    np.testing.assert_allclose(np.sort(d_ba), np.sort(ref_ba), atol=1e-5)


def test_empty_mask_conventions():
    affine = np.eye(4)
    empty = np.zeros((6, 6, 6), bool)
    full = cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    assert dice(empty, empty) == 1.0
    assert hd95_mm(empty, empty, affine) == 0.0 and assd_mm(empty, empty, affine) == 0.0
    assert volume_error_percent(empty, empty) == 0.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert math.isnan(hd95_mm(full, empty, affine)) and math.isnan(assd_mm(empty, full, affine))
    assert volume_error_percent(empty, full) == -100.0
    assert math.isnan(volume_error_percent(full, empty))
    m = structure_metrics(empty, full, affine)
    assert m["dice"] == 0.0 and math.isnan(m["hd95_mm"]) and m["ref_volume_ml"] == pytest.approx(0.027)
    with pytest.raises(ValueError, match="same grid"):
        dice(full, full[:-1])


def test_summarize_reports_undefined_values():
    stats = summarize([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert stats["n"] == 5 and stats["n_undefined"] == 1
    assert stats["mean"] == pytest.approx(2.5) and stats["median"] == pytest.approx(2.5)
    assert stats["iqr"] == pytest.approx(1.5)
    assert math.isnan(summarize([])["mean"])


# --- scenarios -------------------------------------------------------------------------------
def test_scenarios_give_the_intended_sets():
    table = StructureTable.default()
    everything = list(range(1, 11))
    full = case_scenario("full", table, everything, "c0")
    assert full.input_labels == everything and full.scored_labels == everything and full.replace
    a = case_scenario("subset_A", table, everything, "c0")
    assert a.input_labels == [1, 2, 3, 4, 5] and a.scored_labels == [6, 7, 8, 9, 10] and not a.replace
    b = case_scenario("subset_B", table, everything, "c0")
    assert b.input_labels == [6, 7, 8, 9, 10] and b.scored_labels == [1, 2, 3, 4, 5]
    for s in table:
        m = case_scenario(f"missing_{s.name}", table, everything, "c0")
        assert m.scored_labels == [s.label] and s.label not in m.input_labels and len(m.input_labels) == 9
    # a partially labelled case: only present structures are hidden or scored
    partial = [1, 2, 3, 6]
    assert case_scenario("annotated", table, partial, "c1").scored_labels == partial
    assert case_scenario("subset_A", table, partial, "c1").scored_labels == [6]
    assert case_scenario("subset_B", table, [6, 7], "c1") is None  # no input left


def test_drop_k_is_deterministic_per_case():
    table = StructureTable.default()
    everything = list(range(1, 11))
    draws = {}
    for i in range(40):
        s = case_scenario("drop_k", table, everything, f"case_{i}", seed=3)
        assert 2 <= len(s.scored_labels) <= 5
        assert sorted(s.input_labels + s.scored_labels) == everything
        assert case_scenario("drop_k", table, everything, f"case_{i}", seed=3) == s
        draws[i] = tuple(s.scored_labels)
    assert len(set(draws.values())) > 10  # varies between cases
    assert {len(d) for d in draws.values()} == {2, 3, 4, 5}
    other_seed = [tuple(case_scenario("drop_k", table, everything, f"case_{i}", seed=4).scored_labels) for i in range(40)]
    assert other_seed != list(draws.values())
    # two-structure case: one input stays
    assert len(case_scenario("drop_k", table, [2, 3], "x").input_labels) == 1


def test_resolve_scenarios():
    table = StructureTable.default()
    assert resolve_scenarios(["full,subset_A", "missing_left ventricle"], table) == ["full", "subset_A", "missing_LV"]
    assert resolve_scenarios(["all"], table) == scenario_names(table)
    default = resolve_scenarios(None, table)
    assert "drop_k" in default and "missing_Coronary" in default and "annotated" not in default
    with pytest.raises(ValueError, match="unknown scenario"):
        resolve_scenarios(["half"], table)
    with pytest.raises(ValueError, match="unknown structure"):
        resolve_scenarios(["missing_Spleen"], table)


# --- baseline --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_hearts():
    return [synthetic_label_map(seed=s, spacing_mm=2.0) for s in (0, 1, 2)]


def test_baseline_reproduces_a_training_case(training_hearts):
    baseline = NearestCaseBaseline.from_label_maps(training_hearts, case_ids=["s0", "s1", "s2"])
    case = training_hearts[1]
    hidden = [6, 7, 8]
    given = np.where(np.isin(case.labels, hidden), 0, case.labels)
    partial = LabelMap(given, case.ijk_to_ras)
    result = baseline.complete(partial, input_labels=[1, 2, 3, 4, 5, 9, 10], structures=hidden)
    assert result.case_id == "s1" and result.distance_mm == 0.0
    np.testing.assert_allclose(result.translation_mm, 0.0, atol=1e-9)
    for label in hidden:
        assert dice(result.label_map.labels == label, case.labels == label) == 1.0
    # given voxels are kept exactly
    assert np.array_equal(result.label_map.labels[given > 0], given[given > 0])


def test_baseline_pastes_in_physical_space(training_hearts):
    """A test image of a training heart on another grid (flipped, other spacing) gets that heart's
    structures back at the right physical place."""
    baseline = NearestCaseBaseline.from_label_maps(training_hearts, case_ids=["s0", "s1", "s2"])
    other_grid = synthetic_label_map(seed=2, spacing_mm=(1.5, 2.5, 2.0), flip_axes=(0, 2))
    hidden = [1, 8]
    partial = LabelMap(np.where(np.isin(other_grid.labels, hidden), 0, other_grid.labels), other_grid.ijk_to_ras)
    result = baseline.complete(partial, input_labels=[2, 3, 4, 5, 6, 7, 9, 10], structures=hidden)
    assert result.case_id == "s2"
    assert np.linalg.norm(result.translation_mm) < 1.5  # centroids of voxelisations agree within a voxel
    assert dice(result.label_map.labels == 1, other_grid.labels == 1) > 0.75
    # the test case itself excluded: another heart is used, and its LAA still lands near the LA
    moved = baseline.complete(partial, [2, 3, 4, 5, 6, 7, 9, 10], hidden, exclude=["s2"])
    assert moved.case_id in ("s0", "s1") and moved.distance_mm > 0
    assert (moved.label_map.labels == 8).sum() > 0


def test_descriptor_is_in_millimetres(training_hearts):
    heart = training_hearts[0]
    coarse = describe_label_map(heart, "a")
    fine = describe_label_map(synthetic_label_map(seed=0, spacing_mm=1.0), "b")
    for label in (2, 3):
        a, b = coarse.structures[label], fine.structures[label]
        assert np.linalg.norm(a.centroid_mm - b.centroid_mm) < 1.0
        assert a.volume_mm3 == pytest.approx(b.volume_mm3, rel=0.1)


def test_baseline_recovers_a_pure_translation(training_hearts):
    """The same heart moved by a known offset (origin shifted): t = offset, pasted structures exact."""
    baseline = NearestCaseBaseline.from_label_maps(training_hearts[:2], case_ids=["s0", "s1"])
    heart = training_hearts[0]
    offset = np.array([7.3, -4.1, 12.2])
    moved_affine = heart.ijk_to_ras.copy()
    moved_affine[:3, 3] += offset
    hidden = [7, 8, 10]
    partial = LabelMap(np.where(np.isin(heart.labels, hidden), 0, heart.labels), moved_affine)
    result = baseline.complete(partial, [1, 2, 3, 4, 5, 6, 9], hidden)
    assert result.case_id == "s0" and result.distance_mm == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(result.translation_mm, offset, atol=1e-6)
    assert np.array_equal(result.label_map.labels, heart.labels)


def test_baseline_descriptor_cache(synthetic_heart_files, tmp_path):
    """Descriptors of training files are cached; unchanged files are not read again, changed ones are."""
    from HeartCompletionLib.io.labelmap_files import read_label_map

    reads = []

    def loader(path):
        reads.append(Path(path).name)
        return read_label_map(path)

    files = list(synthetic_heart_files)
    cache = tmp_path / "index.npz"
    first = NearestCaseBaseline.from_paths(files, loader, progress=False, cache_path=cache)
    assert len(reads) == len(files) and cache.is_file()
    copy = tmp_path / files[0].name
    copy.write_bytes(files[0].read_bytes())
    second = NearestCaseBaseline.from_paths([copy, *files[1:]], loader, progress=False, cache_path=cache)
    assert reads[len(files):] == [copy.name]  # only the new file was read
    for a, b in zip(first.cases, second.cases):
        assert a.labels == b.labels
        for label in a.labels:
            np.testing.assert_allclose(a.structures[label].centroid_mm, b.structures[label].centroid_mm)
            np.testing.assert_allclose(a.structures[label].surface_mm, b.structures[label].surface_mm, atol=1e-4)
    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    NearestCaseBaseline.from_paths(files[:1], loader, progress=False, cache_path=cache)
    assert len(reads) == len(files) + 2


@pytest.mark.parametrize("module_name", ["heart_training.evaluation.scenarios", "heart_training.evaluation.baseline"])
def test_training_module_doctests(module_name):
    """The usage examples in the docstrings of training/ modules (outside pytest's doctest paths)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module_name))
    assert result.attempted > 0 and result.failed == 0
