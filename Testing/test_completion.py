"""Completion (HeartCompletionLib.inference.completion) and mesh export (HeartCompletionLib.io.meshes).

Real parts only: the session's tiny checkpoint (``tiny_checkpoint``, a model trained on synthetic
hearts in this session), synthetic hearts rasterised into real grids of several geometries,
real mesh files read back with VTK's readers. Grids are 2.5 mm so each completion takes a second
or two on a busy 2-core machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from HeartCompletionLib.geometry.affine import image_corners_ras, ras_to_ijk_points, rotation_matrix, voxel_centers_ras
from HeartCompletionLib.inference.completion import (
    CompletionCancelled,
    CompletionError,
    complete_label_map,
    complete_masks,
)
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.synthetic import synthetic_heart, synthetic_label_map

DROPPED = (4, 6, 7)  # RA, Aorta, PA: large structures the tiny model predicts reliably
GEOMETRIES = {  # the isotropic RAS grid is the reference (``completed_iso``)
    "anisotropic": {"spacing_mm": (2.0, 2.2, 3.5)},
    "flipped": {"spacing_mm": 2.5, "flip_axes": (0, 1)},
    "oblique": {"spacing_mm": (2.5, 2.75, 2.25), "direction": rotation_matrix([1.0, 2.0, 3.0], 0.45)},
}


def partial(label_map: LabelMap, dropped=DROPPED) -> LabelMap:
    labels = label_map.labels.copy()
    labels[np.isin(labels, dropped)] = 0
    return LabelMap(labels, label_map.ijk_to_ras.copy(), source=label_map.source)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    return load_inference_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def heart():
    return synthetic_heart(seed=0)


@pytest.fixture(scope="module")
def completed_iso(checkpoint, heart):
    truth = synthetic_label_map(heart=heart, spacing_mm=2.5)
    source = partial(truth)
    before = source.labels.copy()
    result = complete_label_map(source, checkpoint, device="cpu")
    assert np.array_equal(source.labels, before), "the input label map was modified"
    return truth, source, result


def test_completes_every_missing_structure_and_keeps_given(completed_iso):
    truth, source, result = completed_iso
    out = result.label_map.labels
    assert result.completed_labels == list(DROPPED)
    assert result.given_labels == sorted(set(truth.present_labels()) - set(DROPPED))
    for lab in DROPPED:
        assert (out == lab).sum() > 50, f"label {lab} is (almost) empty"
    given = source.labels > 0
    assert np.array_equal(out[given], source.labels[given]), "a given voxel changed"
    # predicted voxels only where the input was background, and only requested labels appear there
    changed = out != source.labels
    assert not (changed & given).any()
    assert set(np.unique(out[changed]).tolist()) <= set(DROPPED)
    assert result.label_map.same_geometry(source) and out.dtype == source.labels.dtype
    g = result.grid
    assert g["queries"] < g["region_voxels"], "the hierarchical decode evaluated every voxel"
    assert set(result.timings) >= {"surface_s", "encode_s", "decode_s", "fusion_s", "total_s"}


def resampled_labels(target: LabelMap, source: LabelMap):
    """``source`` labels at ``target``'s voxel centres (nearest neighbour in RAS mm) and the mask
    of target voxels whose centre lies inside ``source``'s grid."""
    centres = voxel_centers_ras(target.shape, target.ijk_to_ras).reshape(-1, 3)
    ijk = np.rint(ras_to_ijk_points(centres, source.ijk_to_ras)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(source.shape)), axis=1)
    values = np.zeros(len(centres), dtype=source.labels.dtype)
    values[inside] = source.labels[tuple(ijk[inside].T)]
    return values.reshape(target.shape), inside.reshape(target.shape)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_output_geometry_equals_input_geometry(name, checkpoint, heart, completed_iso):
    truth = synthetic_label_map(heart=heart, **GEOMETRIES[name])
    source = partial(truth)
    result = complete_label_map(source, checkpoint, device="cpu")
    out = result.label_map
    assert out.shape == source.shape
    np.testing.assert_allclose(out.ijk_to_ras, source.ijk_to_ras, atol=1e-9)
    given = source.labels > 0
    assert np.array_equal(out.labels[given], source.labels[given])
    # the same heart in any grid: predictions land at the same physical place (mm) as in the
    # isotropic RAS grid. Rasterising the *truth* into these grids already costs ~0.05 Dice after
    # resampling; an axis/flip error would give ~0.
    reference = completed_iso[2].label_map
    values, inside = resampled_labels(reference, out)
    assert inside.mean() > 0.95
    for lab in DROPPED:
        d = dice(values[inside] == lab, reference.labels[inside] == lab)
        assert d >= 0.75, f"{name}: label {lab}: Dice {d:.3f} against the isotropic result"


def test_same_heart_in_two_orientations_gives_the_same_physical_result(checkpoint, heart, completed_iso):
    """LPS-style flips and an axis permutation keep the voxel centres: compare voxel by voxel in RAS."""
    ras_result = completed_iso[2]
    permuted = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # i->A, j->R, k->I
    other = partial(synthetic_label_map(heart=heart, spacing_mm=2.5, direction=permuted, flip_axes=(1,)))
    result = complete_label_map(other, checkpoint, device="cpu")
    a = ras_result.label_map
    b_vals, inside = resampled_labels(a, result.label_map)
    assert inside.mean() > 0.95
    # the two inputs hold the same voxels (same centres in RAS), so any difference is the code's
    same_input = resampled_labels(completed_iso[1], other)[0][inside] == completed_iso[1].labels[inside]
    assert same_input.mean() > 0.999
    for lab in DROPPED:
        d = dice(a.labels[inside] == lab, b_vals[inside] == lab)
        assert d >= 0.98, f"label {lab}: Dice {d:.3f} between orientations"


def test_hierarchical_decode_agrees_with_dense_decode(checkpoint, completed_iso):
    _, source, hier = completed_iso
    dense = complete_label_map(source, checkpoint, device="cpu", hierarchical=False)
    lo, hi = hier.grid["region_lo_vox"], hier.grid["region_hi_vox"]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    equal = (hier.label_map.labels[box] == dense.label_map.labels[box]).mean()
    assert equal >= 0.99, f"only {equal:.4f} of the region's voxels agree"
    assert hier.grid["queries"] < 0.6 * dense.grid["queries"], hier.grid
    for lab in DROPPED:
        assert dice(hier.label_map.labels == lab, dense.label_map.labels == lab) >= 0.97


def test_deterministic_for_a_seed(checkpoint, completed_iso):
    _, source, first = completed_iso
    again = complete_label_map(source, checkpoint, device="cpu", seed=0)
    assert np.array_equal(first.label_map.labels, again.label_map.labels)
    np.testing.assert_allclose(first.centre_mm, again.centre_mm)


def test_small_islands_of_predicted_structures_are_removed(checkpoint, completed_iso):
    from scipy import ndimage

    _, source, cleaned = completed_iso
    raw = complete_label_map(source, checkpoint, device="cpu", seed=0, min_island_fraction=0.0)
    given = source.labels > 0
    # given voxels are identical; cleaning only ever turns predicted voxels into background
    assert np.array_equal(raw.label_map.labels[given], cleaned.label_map.labels[given])
    changed = raw.label_map.labels != cleaned.label_map.labels
    assert (cleaned.label_map.labels[changed] == 0).all() and np.isin(raw.label_map.labels[changed], DROPPED).all()
    for lab in DROPPED:
        pieces, count = ndimage.label(cleaned.label_map.labels == lab, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(pieces.ravel())[1:]
        assert count >= 1 and sizes.min() >= 0.05 * sizes.max(), (lab, sizes)
        raw_pieces = ndimage.label(raw.label_map.labels == lab, structure=np.ones((3, 3, 3), bool))[1]
        assert raw_pieces >= count
    removed = int(changed.sum())
    assert (removed > 0) == any("small disconnected pieces" in m for m in cleaned.messages)


def test_island_removal_respects_where_and_zero_fraction():
    from HeartCompletionLib.inference.islands import remove_small_islands

    labels = np.zeros((10, 10, 10), dtype=np.int16)
    labels[0:5, 0:5, 0:5] = 7
    labels[8, 8, 8] = 7
    labels[8, 0, 8] = 7
    untouched = labels.copy()
    assert remove_small_islands(labels, [7], min_fraction=0.0) == {} and np.array_equal(labels, untouched)
    where = np.zeros(labels.shape, bool)
    where[8, 8, 8] = True  # only this stray voxel may go (e.g. the other one was given)
    assert remove_small_islands(labels, [7], min_fraction=0.05, where=where) == {7: 1}
    assert labels[8, 8, 8] == 0 and labels[8, 0, 8] == 7 and (labels == 7).sum() == 126


def test_detached_pieces_are_removed_by_physical_distance():
    """A structure with a piece touching the heart and one far away (the held-out RA failure of the
    study): the far piece goes, the attached one and every other label stay. Distances are in mm, so
    an anisotropic grid gives the same answer; a piece near a piece of its own structure stays."""
    from HeartCompletionLib.inference.islands import remove_detached_pieces

    for spacing in ((1.0, 1.0, 1.0), (1.0, 2.0, 0.5)):
        shape = tuple(int(round(80 / s)) for s in spacing)  # 80 mm cube
        labels = np.zeros(shape, dtype=np.int16)

        boxes = (((0, 0, 0), (20, 20, 20), 1),     # another structure (given or predicted)
                 ((20, 0, 0), (30, 10, 10), 4),    # the structure, touching it
                 ((60, 60, 60), (70, 70, 70), 4),  # a detached piece of it, > 50 mm from everything
                 ((34, 0, 0), (38, 4, 4), 4))      # 4 mm from its own attached piece: kept
        for lo_mm, hi_mm, value in boxes:
            labels[tuple(slice(int(round(a / s)), int(round(b / s))) for a, b, s in zip(lo_mm, hi_mm, spacing))] = value
        before = labels.copy()
        removed = remove_detached_pieces(labels, [4], spacing, max_gap_mm=15.0)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        assert removed[4] * voxel_ml == pytest.approx(1.0, rel=0.05), spacing  # the 10 x 10 x 10 mm piece
        far = tuple(slice(int(round(60 / s)), int(round(70 / s))) for s in spacing)
        assert (labels[far] == 0).all()
        assert np.array_equal(labels[labels != before], np.zeros(int((labels != before).sum()), np.int16))
        assert (labels == 1).sum() == (before == 1).sum()  # other labels untouched
        assert remove_detached_pieces(labels, [4], spacing, max_gap_mm=0.0) == {}
    with pytest.raises(CompletionError, match="max_detached_mm"):
        complete_label_map(np.zeros((4, 4, 4), np.int16), "unused.safetensors", max_detached_mm=-1.0)


@pytest.mark.parametrize("backend", ["scipy", "cc3d"])
def test_pieces_are_the_same_with_either_backend(monkeypatch, backend):
    """Connected pieces (26-connected) come from the optional cc3d package when installed, else
    scipy: both give the partition of a direct reference (scipy's label with the full 3x3x3
    structure), whatever their numbering, on a mask with pieces touching at faces, edges, corners."""
    import sys

    from scipy import ndimage

    from HeartCompletionLib.inference.islands import label_pieces

    if backend == "cc3d":
        pytest.importorskip("cc3d", reason="the optional cc3d package (extra fast) is not installed")
    else:
        monkeypatch.setitem(sys.modules, "cc3d", None)  # makes `import cc3d` raise ImportError
    mask = np.random.default_rng(11).random((30, 24, 17)) < 0.1  # sparse: many pieces
    pieces, count = label_pieces(mask)
    reference, ref_count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    assert count == ref_count > 10 and pieces.shape == mask.shape
    assert np.array_equal(pieces > 0, mask)
    pairs = np.unique(np.stack([pieces[mask].astype(np.int64), reference[mask]]), axis=1)
    assert pairs.shape[1] == count  # one to one: every piece of one is exactly one piece of the other


def test_presence_bits_match_a_direct_reference():
    """The per-block label bits the detached-piece rule works on, against a loop over the blocks:
    sizes that are not whole blocks, several slabs and a partial last one, labels up to 63."""
    from HeartCompletionLib.inference.islands import _presence_bits

    rng = np.random.default_rng(5)
    for high, shape, block in ((31, (13, 7, 9), (3, 2, 4)), (63, (8, 10, 5), (2, 5, 1))):
        labels = rng.integers(0, high + 1, size=shape).astype(np.int16)
        labels[rng.random(shape) < 0.7] = 0  # mostly background: some blocks hold few labels
        bits = _presence_bits(labels, block, slab_blocks=2)
        expected = np.zeros(tuple(-(-n // b) for n, b in zip(shape, block)), dtype=np.uint64)
        for index in np.ndindex(*expected.shape):
            part = labels[tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, block))]
            for value in np.unique(part):
                expected[index] |= np.uint64(1) << np.uint64(value)
        assert np.array_equal(bits, expected), (shape, block)
    with pytest.raises(ValueError, match="0..63"):
        _presence_bits(np.full((2, 2, 2), 64, dtype=np.int16), (1, 1, 1))


def test_progress_increases_and_cancel_stops(checkpoint, completed_iso):
    _, source, _ = completed_iso
    fractions, messages = [], []
    complete_label_map(source, checkpoint, device="cpu", structures=["Aorta"],
                       progress=lambda f, m: (fractions.append(f), messages.append(m)))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) >= 5
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions
    assert any("decod" in m for m in messages)

    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 4  # cancel in the middle (after sampling/encoding started)

    before = source.labels.copy()
    with pytest.raises(CompletionCancelled):
        complete_label_map(source, checkpoint, device="cpu", cancel=cancel)
    assert np.array_equal(source.labels, before)


def test_requested_subset_replace_and_signed_distances(checkpoint, completed_iso):
    truth, source, full = completed_iso
    only = complete_label_map(source, checkpoint, device="cpu", structures=["aorta"], return_signed_distance=True)
    assert only.completed_labels == [6]
    assert set(np.unique(only.label_map.labels).tolist()) <= set(source.present_labels()) | {0, 6}
    sdf = only.signed_distance_mm[6]
    inside = only.label_map.labels == 6
    assert sdf.shape == source.shape and np.all(sdf[inside] < 0)
    # voxels that RA/PA took in the full run are not given to the aorta here (it never sees more)
    assert (inside & (full.label_map.labels == 6)).sum() >= 0.9 * inside.sum()

    # replace: the LV is re-predicted (the other given structures stay exactly)
    replaced = complete_label_map(source, checkpoint, device="cpu", structures=["LV"], replace=True)
    assert replaced.completed_labels == [3]
    keep = (source.labels > 0) & (source.labels != 3)
    assert np.array_equal(replaced.label_map.labels[keep], source.labels[keep])
    assert dice(replaced.label_map.labels == 3, truth.labels == 3) > 0.5


def test_masks_input_never_overlaps_given_masks(checkpoint, completed_iso):
    _, source, reference = completed_iso
    masks = {lab: source.labels == lab for lab in source.present_labels()}
    # an overlapping, slightly dilated LA (segments in Slicer may overlap)
    from scipy.ndimage import binary_dilation

    masks[2] = binary_dilation(masks[2], iterations=2)
    result = complete_masks(masks, source.ijk_to_ras, checkpoint, device="cpu")
    union = np.any(list(masks.values()), axis=0)
    for lab in DROPPED:
        predicted = result.predicted_mask(lab)
        assert predicted.any() and not (predicted & union).any()
    with pytest.raises(KeyError):
        result.predicted_mask(3)


def test_clear_errors(checkpoint, completed_iso):
    _, source, _ = completed_iso
    empty = LabelMap(np.zeros((8, 8, 8), np.int16), np.eye(4), source="empty.nii.gz")
    with pytest.raises(CompletionError, match="empty.nii.gz.*no structure"):
        complete_label_map(empty, checkpoint, device="cpu")
    with pytest.raises(CompletionError, match="unknown structure"):
        complete_label_map(source, checkpoint, device="cpu", structures=["spleen"])
    bad = LabelMap(np.full((8, 8, 8), 42, np.int16), np.eye(4), source="bad.nrrd")
    with pytest.raises(CompletionError, match="bad.nrrd.*42"):
        complete_label_map(bad, checkpoint, device="cpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(CompletionError, match="CUDA"):
            complete_label_map(source, checkpoint, device="cuda")
    nothing = complete_label_map(source, checkpoint, device="cpu", structures=["LV"])
    assert nothing.completed_labels == [] and np.array_equal(nothing.label_map.labels, source.labels)


# --- meshes ------------------------------------------------------------------------------------
def _read_with_vtk(path):
    vtk = pytest.importorskip("vtk")
    reader = {".stl": vtk.vtkSTLReader, ".obj": vtk.vtkOBJReader, ".ply": vtk.vtkPLYReader,
              ".vtk": vtk.vtkPolyDataReader}[path.suffix]()
    reader.SetFileName(str(path))
    reader.Update()
    poly = reader.GetOutput()
    from vtk.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64), poly.GetNumberOfCells()


@pytest.mark.parametrize("fmt", ["stl", "obj", "ply", "vtk"])
def test_meshes_written_readable_in_ras_mm(fmt, completed_iso, tmp_path):
    from HeartCompletionLib.io.meshes import structure_meshes, write_structure_meshes

    _, _, result = completed_iso
    lm = result.label_map
    # a flipped grid: RAS vertices must come out the same physical place
    paths = write_structure_meshes(lm, tmp_path, "case 01", fmt=fmt, smoothing_iterations=5 if fmt == "stl" else 0)
    names = sorted(p.name for p in paths)
    assert len(paths) == len(lm.present_labels()) and f"case_01_Aorta.{fmt}" in names
    corners = image_corners_ras(lm.shape, lm.ijk_to_ras)
    low, high = corners.min(axis=0) - 2.5, corners.max(axis=0) + 2.5
    raw = structure_meshes(lm, labels=[6])[6]
    for path in paths:
        assert b"SPACE=RAS" in path.read_bytes()[:400]
        points, cells = _read_with_vtk(path)
        assert cells > 100 and np.all(points >= low) and np.all(points <= high), path.name
    aorta_points, aorta_cells = _read_with_vtk(tmp_path / f"case_01_Aorta.{fmt}")
    assert aorta_cells == len(raw[1])
    # the mesh wraps the aorta's voxels: same RAS bounding box within about half a voxel (2.5 mm)
    idx = np.argwhere(lm.labels == 6)
    centres = idx @ lm.ijk_to_ras[:3, :3].T + lm.ijk_to_ras[:3, 3]
    assert np.abs(aorta_points.min(axis=0) - centres.min(axis=0)).max() < 2.5
    assert np.abs(aorta_points.max(axis=0) - centres.max(axis=0)).max() < 2.5
    if fmt != "stl":  # unsmoothed: the file holds exactly the extracted vertices (float32)
        np.testing.assert_allclose(np.sort(aorta_points, axis=0), np.sort(raw[0], axis=0), atol=1e-3)


def test_mesh_writer_refuses_unknown_format_and_writes_atomically(tmp_path):
    from HeartCompletionLib.io.meshes import write_mesh

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
    with pytest.raises(ValueError, match="unknown mesh format"):
        write_mesh(tmp_path / "m.xyz", v, np.array([[0, 1, 2]]))
    write_mesh(tmp_path / "m.ply", v, np.array([[0, 1, 2]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ply"]  # no temporary file left
