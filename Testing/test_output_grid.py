"""Completing on another grid than the input's (HeartCompletionLib/inference/output_grid.py, ``heart-complete
--extend_mm / --output_spacing / --reference``): a short-axis-like stack of the ventricles comes out
as a whole heart on an isotropic grid, the given voxels carried over and never changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.geometry.affine import direction_of, ijk_to_ras_points, rotation_matrix, spacing_of
from HeartCompletionLib.inference.complete_cli import main
from HeartCompletionLib.inference.completion import complete_label_map
from HeartCompletionLib.inference.output_grid import OutputGridError, box_on_grid, grown_grid, resample_nearest
from HeartCompletionLib.io.labelmap import LabelMap, crop_to_labels
from HeartCompletionLib.io.labelmap_files import read_image_geometry, read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.model.registry import load_model
from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()
VENTRICLES = [TABLE.by_name(n).label for n in ("Myocardium", "LV", "RV")]


def _oblique(shape=(20, 16, 12), spacing=(1.5, 2.0, 9.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5]), 0.4) * np.array(spacing)
    m[:3, 3] = [-30.0, 12.0, 5.0]
    return m


def _stack(seed: int = 3, slice_mm: float = 9.0) -> tuple[LabelMap, LabelMap]:
    """(truth on a 2 mm grid, a short-axis-like stack of its ventricles: 2 x 2 x ``slice_mm`` mm,
    cropped to them)."""
    truth = synthetic_label_map(seed, spacing_mm=2.0)
    shape, m = grown_grid(truth, 0.0, [2.0, 2.0, slice_mm])
    labels = resample_nearest(truth.labels, truth.ijk_to_ras, shape, m)
    labels[~np.isin(labels, VENTRICLES)] = 0
    idx = np.argwhere(labels > 0)
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = m.copy()
    crop[:3, 3] = m[:3, :3] @ lo + m[:3, 3]
    return truth, LabelMap(np.ascontiguousarray(labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]), crop, "stack")


# --- the grids -----------------------------------------------------------------------------------
def test_the_default_grid_is_the_inputs_own():
    labels = np.zeros((20, 16, 12), np.int16)
    labels[5:9, 4:10, 3:6] = 2
    lm = LabelMap(labels, _oblique(), "x")
    shape, m = grown_grid(lm)
    assert shape == lm.shape and np.allclose(m, lm.ijk_to_ras)
    np.testing.assert_array_equal(resample_nearest(labels, m, shape, m), labels)


def test_a_grown_isotropic_grid_keeps_the_axes_and_covers_the_given_box_plus_the_margin():
    labels = np.zeros((20, 16, 12), np.int16)
    labels[5:9, 4:10, 3:6] = 2
    lm = LabelMap(labels, _oblique(), "x")
    shape, m = grown_grid(lm, 25.0, 1.0)
    np.testing.assert_allclose(spacing_of(m), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(direction_of(m), direction_of(lm.ijk_to_ras), atol=1e-9)
    # the given box's faces grown by 25 mm along each input axis, and the input's own extent, are inside
    sp = spacing_of(lm.ijk_to_ras)
    lo, hi = np.array([5, 4, 3]) - 0.5 - 25.0 / sp, np.array([9, 10, 6]) - 0.5 + 25.0 / sp
    lo, hi = np.minimum(lo, -0.5), np.maximum(hi, np.array(lm.shape) - 0.5)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    inside = ijk_to_ras_points(corners, lm.ijk_to_ras) @ np.linalg.inv(m)[:3, :3].T + np.linalg.inv(m)[:3, 3]
    assert np.all(inside >= -0.5 - 1e-6) and np.all(inside <= np.array(shape) - 0.5 + 1e-6)
    assert np.all(np.array(shape) <= np.ceil((hi - lo) * sp) + 1)  # and not much more
    # the given voxels land where they were (nearest neighbour), nowhere else
    out = resample_nearest(labels, lm.ijk_to_ras, shape, m)
    centres = ijk_to_ras_points(np.argwhere(out == 2), m)
    back = np.rint(centres @ np.linalg.inv(lm.ijk_to_ras)[:3, :3].T + np.linalg.inv(lm.ijk_to_ras)[:3, 3]).astype(int)
    assert len(back) and np.all(labels[tuple(back.T)] == 2)
    lo_box, hi_box = box_on_grid([5, 4, 3], [9, 10, 6], lm.ijk_to_ras, shape, m)
    idx = np.argwhere(out == 2)
    assert np.all(idx >= lo_box) and np.all(idx < hi_box)


def test_bad_grids_are_refused_with_the_file_named():
    lm = LabelMap(np.ones((4, 4, 4), np.int16), np.eye(4), "case.nii.gz")
    with pytest.raises(OutputGridError, match=r"case.nii.gz: .*extend_mm"):
        grown_grid(lm, -1.0)
    with pytest.raises(OutputGridError, match=r"case.nii.gz: output spacing"):
        grown_grid(lm, 0.0, [1.0, 0.0, 1.0])
    with pytest.raises(OutputGridError, match=r"case.nii.gz: the output grid .* voxels, more than the limit"):
        grown_grid(lm, 10.0, 0.05, max_voxels=1_000_000)


@pytest.mark.filterwarnings("ignore:.*has no 'space directions'")
def test_reference_geometry_of_nifti_nrrd_and_segmentation_headers(tmp_path):
    lm = synthetic_label_map(seed=1, spacing_mm=3.0, flip_axes=(0,))
    for name in ("ref.nii.gz", "ref.nrrd", "ref.seg.nrrd"):
        write_label_map(lm, tmp_path / name, table=TABLE)
        shape, m = read_image_geometry(tmp_path / name)
        back = read_label_map(tmp_path / name)
        assert shape == back.shape and np.allclose(m, back.ijk_to_ras), name
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\nsizes: 3 3\n\n")
    with pytest.raises(ValueError, match="broken.nrrd"):
        read_image_geometry(tmp_path / "broken.nrrd")


# --- completion on another grid ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    checkpoint, _ = load_model("synthetic-demo", device="cpu")
    return checkpoint


@pytest.mark.slow
def test_a_ventricle_stack_comes_out_as_a_whole_heart_on_an_isotropic_grid(bundled):
    truth, stack = _stack()
    grid = grown_grid(stack, 40.0, 2.0)
    result = complete_label_map(stack, bundled, output_grid=grid, device="cpu")
    out = result.label_map.labels
    assert result.label_map.shape == grid[0] and np.allclose(result.label_map.ijk_to_ras, grid[1])
    carried = resample_nearest(stack.labels, stack.ijk_to_ras, *grid)
    np.testing.assert_array_equal(out[carried > 0], carried[carried > 0])  # given voxels carried, unchanged
    assert set(result.completed_labels) == set(TABLE.labels) - set(VENTRICLES)
    # the atria lie mostly outside the stack's field of view, and the model puts them near the truth
    ref = resample_nearest(truth.labels, truth.ijk_to_ras, *grid)
    lo, hi = box_on_grid([0, 0, 0], stack.shape, stack.ijk_to_ras, *grid)
    outside = np.ones(out.shape, bool)
    outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    for name in ("LA", "RA"):
        lab = TABLE.by_name(name).label
        dice = 2 * ((out == lab) & (ref == lab)).sum() / ((out == lab).sum() + (ref == lab).sum())
        print(name, "Dice against the truth", round(float(dice), 3), "voxels outside the stack",
              int(((out == lab) & outside).sum()))
        assert ((out == lab) & outside).sum() > 0.2 * (out == lab).sum()
        assert dice > 0.5  # measured 0.71 (LA) and 0.66 (RA) at 1.5 mm with this model


@pytest.mark.slow
def test_heart_complete_grid_options(tmp_path, capsys):
    _, stack = _stack(seed=5)
    src = tmp_path / "stack.nii.gz"
    write_label_map(stack, src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "whole.nii.gz"
    code = main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(out), "--extend_mm", "30",
                 "--output_spacing", "2.5", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    done = read_label_map(out)
    np.testing.assert_allclose(spacing_of(done.ijk_to_ras), [2.5, 2.5, 2.5])
    assert set(done.present_labels()) == set(TABLE.labels)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before, "the input was modified"

    # --reference: exactly that image's grid (here a float "CT" in NRRD)
    import nrrd

    ref_shape, ref_m = grown_grid(stack, 20.0, 3.0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ref_m
    nrrd.write(str(tmp_path / "ct.nrrd"), np.random.default_rng(0).normal(size=ref_shape).astype(np.float32),
               {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    out2 = tmp_path / "on_ct.nrrd"
    assert main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(out2), "--reference",
                 str(tmp_path / "ct.nrrd"), "--quiet", "--device", "cpu"]) == 0
    on_ct = read_label_map(out2)
    assert on_ct.shape == ref_shape and np.allclose(on_ct.ijk_to_ras, ref_m)

    # refused before anything is read or written
    capsys.readouterr()
    assert main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(tmp_path / "x.nii.gz"),
                 "--reference", str(tmp_path / "ct.nrrd"), "--extend_mm", "10", "--quiet"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(tmp_path / "x.nii.gz"),
                 "--output_spacing", "1", "2", "--quiet"]) == 2
    assert "one value (isotropic) or three" in capsys.readouterr().err
    assert main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(tmp_path / "x.nii.gz"),
                 "--reference", str(tmp_path / "missing.nrrd"), "--quiet"]) == 2
    assert "missing.nrrd" in capsys.readouterr().err
    # a grid too large for memory: this case fails with its file named, nothing written
    assert main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(tmp_path / "x.nii.gz"),
                 "--output_spacing", "0.02", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "stack.nii.gz" in err and "more than the limit" in err
    assert not (tmp_path / "x.nii.gz").exists()
    assert not list(Path(tmp_path).glob("*.tmp*"))


# --- --crop_output: the box around the labelled voxels, on the same lattice ---------------------------
def _paste(box: LabelMap, shape, ijk_to_ras) -> np.ndarray:
    """``box`` put back on the grid ``(shape, ijk_to_ras)`` by its integer voxel offset (what the
    Slicer panel does with a cropped result); fails if the lattices differ."""
    shift = np.linalg.solve(ijk_to_ras[:3, :3], box.ijk_to_ras[:3, 3] - ijk_to_ras[:3, 3])
    assert np.allclose(box.ijk_to_ras[:3, :3], ijk_to_ras[:3, :3]) and np.allclose(shift, np.rint(shift), atol=1e-6)
    lo = np.rint(shift).astype(int)
    out = np.zeros(shape, dtype=box.labels.dtype)
    out[lo[0]:lo[0] + box.shape[0], lo[1]:lo[1] + box.shape[1], lo[2]:lo[2] + box.shape[2]] = box.labels
    return out


def test_crop_to_labels_keeps_every_voxel_in_place():
    labels = np.zeros((20, 16, 12), np.int16)
    labels[3:9, 5:7, 2:11] = 4
    labels[12, 14, 6] = 9
    lm = LabelMap(labels, _oblique(), "oblique")
    box = crop_to_labels(lm)
    assert box.shape == (10, 10, 9)
    # the same RAS position for the first labelled voxel, and the whole map back by the offset
    assert np.allclose(ijk_to_ras_points(np.zeros((1, 3)), box.ijk_to_ras), ijk_to_ras_points([[3, 5, 2]], lm.ijk_to_ras))
    np.testing.assert_array_equal(_paste(box, lm.shape, lm.ijk_to_ras), labels)
    assert np.shares_memory(box.labels, labels), "a view, no copy"
    # nothing to crop: the map itself (empty, or labels touching every face)
    empty = LabelMap(np.zeros((4, 4, 4), np.int16), np.eye(4), "empty")
    assert crop_to_labels(empty) is empty
    full = LabelMap(np.ones((4, 4, 4), np.int16), np.eye(4), "full")
    assert crop_to_labels(full) is full


def test_heart_complete_crop_output_writes_the_same_result_in_a_box(tmp_path, capsys):
    truth = synthetic_label_map(2, spacing_mm=2.0)
    labels = truth.labels.copy()
    labels[~np.isin(labels, VENTRICLES)] = 0
    # the given ventricles in a grid with room around the heart: the result does not fill it
    src = tmp_path / "ventricles.nrrd"
    write_label_map(LabelMap(np.pad(labels, 12), truth.ijk_to_ras, "ventricles"), src)
    whole, boxed = tmp_path / "whole.nrrd", tmp_path / "boxed.nrrd"
    for out, extra in ((whole, []), (boxed, ["--crop_output"])):
        code = main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(out), "--quiet",
                     "--device", "cpu", "--threads", "1", *extra])
        assert code == 0, capsys.readouterr().err
    whole_map, boxed_map = read_label_map(whole), read_label_map(boxed)
    assert np.prod(boxed_map.shape) < 0.8 * np.prod(whole_map.shape), (boxed_map.shape, whole_map.shape)
    np.testing.assert_array_equal(_paste(boxed_map, whole_map.shape, whole_map.ijk_to_ras), whole_map.labels)
    assert set(boxed_map.present_labels()) == set(TABLE.labels)
