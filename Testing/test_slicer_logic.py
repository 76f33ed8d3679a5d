"""The "Complete heart" module's logic on a real MRML scene (``slicer-core``, no GUI).

A synthetic heart minus some structures is imported into a segmentation the way Slicer does
it (label-map volume -> segments), the segments are renamed in mixed conventions, and the
module's glue (``HeartCompletionModule.segments``, ``.results`` and
``HeartCompletionLib.inference.completion_process``) runs end to end with the tiny checkpoint trained by the
training fixtures. ``Testing/test_slicer_module_file.py`` drives the module's logic on top of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from HeartCompletionModule import results, segments  # noqa: E402

from HeartCompletionLib.errors import ExitCode  # noqa: E402
from HeartCompletionLib.geometry.affine import make_ijk_to_ras, rotation_matrix  # noqa: E402
from HeartCompletionLib.inference import completion_process  # noqa: E402
from HeartCompletionLib.io.labelmap import LabelMap  # noqa: E402
from HeartCompletionLib.structures.segment_mapping import (  # noqa: E402
    default_structures_to_complete,
    map_segments,
    parse_terminology_entry,
    segment_labels,
    terminology_entry,
)
from HeartCompletionLib.structures.table import StructureTable  # noqa: E402

TABLE = StructureTable.default()
DROPPED = ("PA", "LAA", "Coronary")  # what the user has not segmented
TOTALSEG_RV = (
    "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
    "~SCT^53085002^Right ventricle~^^~Anatomic codes - DICOM master list~^^~^^"
)
# Segment names as users (and other tools) write them; RV is known only by its terminology.
NAMES = {
    "Myocardium": "heart_myocardium",
    "LA": "left atrium",
    "LV": "left ventricle",
    "RA": "RA blood pool",
    "RV": "Segment_5",
    "Aorta": "Ao",
    "PV": "pulmonary veins",
}


@pytest.fixture()
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    segments.ensure_segmentation_converters()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


@pytest.fixture(scope="module")
def heart():
    """An oblique, anisotropic synthetic heart (all ten structures)."""
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    return synthetic_label_map(seed=4, spacing_mm=(2.6, 3.0, 3.4), direction=rotation_matrix((1, 1, 0.3), 0.5))


def add_volume(scene, label_map: LabelMap, name="reference", labelmap=True):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(label_map.labels.transpose(2, 1, 0)).astype(np.int16))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(label_map.ijk_to_ras))
    return node


def partial_segmentation(scene, heart: LabelMap):
    """Segmentation as a user has it: imported from a label map, renamed, one by terminology
    only, plus an unrelated "Tumor"; reference geometry = the image. Returns (node, volume)."""
    partial = np.where(np.isin(heart.labels, [TABLE.by_name(n).label for n in DROPPED]), 0, heart.labels)
    tumor_label = 99
    partial[tuple(np.array(partial.shape) // 5)] = tumor_label  # a one-voxel "Tumor" outside the heart
    node, volume = segments.segmentation_from_label_map(LabelMap(partial.astype(np.int16), heart.ijk_to_ras))
    segmentation = node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = segment.GetLabelValue()
        if value == tumor_label:
            segment.SetName("Tumor")
            continue
        name = TABLE.by_label(value).name
        segment.SetName(NAMES[name])
        if name == "RV":
            segment.SetTerminology(TOTALSEG_RV)
    return node, volume


def snapshot(node, shape, ijk_to_ras):
    return {
        info.segment_id: (info.name, segments.segment_mask(node, info.segment_id, shape, ijk_to_ras))
        for info in segments.segment_infos(node)
    }


# --- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing, angle", [((1.0, 1.0, 1.0), 0.0), ((0.7, 1.3, 2.5), 0.6)])
def test_label_map_round_trip_exact_geometry(scene, spacing, angle):
    """Segments written on a grid read back voxel-exactly on it, for identity and oblique,
    anisotropic, axis-flipped grids; with and without a reference volume."""
    direction = rotation_matrix((1, 2, 3), angle) @ np.diag([1.0, -1.0, 1.0])
    ijk_to_ras = make_ijk_to_ras(spacing, (12.0, -30.0, 7.5), direction)
    labels = np.zeros((24, 30, 20), np.int16)
    labels[4:12, 5:20, 3:9] = 3
    labels[12:20, 8:25, 6:15] = 2
    labels[2:5, 22:28, 1:4] = 6
    truth = LabelMap(labels, ijk_to_ras)
    volume = add_volume(scene, truth)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    results.add_result_segments(node, truth, [3, 2, 6], TABLE, show_surfaces=False)
    mapping = segment_labels(map_segments(segments.segment_infos(node), TABLE))
    for reference in (volume, None):
        back = segments.segmentation_to_label_map(node, mapping, reference)
        assert back.shape == truth.shape
        np.testing.assert_allclose(back.ijk_to_ras, ijk_to_ras, atol=1e-6)
        np.testing.assert_array_equal(back.labels, labels)


def test_overlapping_segments_later_wins_and_the_overlap_is_counted(scene):
    """Two overlapping segments (Slicer keeps them in separate layers, each a crop of the grid):
    the later one wins where they overlap, as in Slicer's own export, and the overlap is counted."""
    ijk_to_ras = make_ijk_to_ras((0.8, 1.1, 1.6), (5.0, -12.0, 3.0), rotation_matrix((1, 0, 1), 0.3))
    first = np.zeros((30, 26, 22), np.int16)
    first[4:18, 5:20, 3:15] = 3
    second = np.zeros_like(first)
    second[12:27, 10:24, 8:20] = 2
    volume = add_volume(scene, LabelMap(np.zeros_like(first), ijk_to_ras))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    results.add_result_segments(node, LabelMap(first, ijk_to_ras), [3], TABLE, show_surfaces=False)
    results.add_result_segments(node, LabelMap(second, ijk_to_ras), [2], TABLE, show_surfaces=False)
    mapping = segment_labels(map_segments(segments.segment_infos(node), TABLE))
    back = segments.segmentation_to_label_map(node, mapping, volume)
    np.testing.assert_array_equal(back.labels, np.where(second > 0, second, first))
    assert back.metadata["overlap_voxels"] == np.count_nonzero((first > 0) & (second > 0)) > 0


def test_segments_sharing_a_layer_and_overlapping_another_keep_the_later_wins_rule(scene):
    """Segments A and C share a layer, B (between them in the segmentation's order) has its own
    and overlaps both: B wins over A, C over B, however the layers are read; the overlaps are
    counted; the same labels laid out in VTK's order (``vtk_order``, what the panel writes)."""
    ijk_to_ras = make_ijk_to_ras((0.9, 1.2, 1.5), (4.0, -8.0, 2.0), rotation_matrix((0, 1, 1), 0.4))
    shape = (30, 26, 22)
    volume = add_volume(scene, LabelMap(np.zeros(shape, np.int16), ijk_to_ras))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    shared = np.zeros(shape, np.uint8)
    shared[2:12, 3:20, 2:18] = 1  # A
    shared[18:28, 3:20, 2:18] = 2  # C
    own = np.zeros(shape, np.uint8)
    own[8:22, 6:16, 5:15] = 1  # B: over A's and C's edges
    segmentation = node.GetSegmentation()
    images = [segments.oriented_image_from_array(values, ijk_to_ras) for values in (shared, own)]
    for name, image, value in (("LV", images[0], 1), ("RV", images[1], 1), ("LA", images[0], 2)):  # A, B, C
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetLabelValue(value)
        segment.AddRepresentation(segments.BINARY_LABELMAP, image)
        assert segmentation.AddSegment(segment)
    assert segmentation.GetNumberOfLayers() == 2
    a, b, c = (TABLE.by_name(n).label for n in ("LV", "RV", "LA"))
    expected = np.zeros(shape, np.int16)
    expected[shared == 1] = a
    expected[own == 1] = b
    expected[shared == 2] = c
    mapping = segment_labels(map_segments(segments.segment_infos(node), TABLE))
    for vtk_order in (False, True):
        back = segments.segmentation_to_label_map(node, mapping, volume, vtk_order=vtk_order)
        np.testing.assert_array_equal(back.labels, expected)
        assert back.labels.flags.c_contiguous != vtk_order
        assert back.metadata["overlap_voxels"] == np.count_nonzero((own == 1) & (shared > 0)) > 0


def test_padded_geometry_without_reference(scene, heart):
    """No reference geometry: the grid is the segments' box padded by the margin, in mm."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    lv_only = LabelMap(np.where(heart.labels == 3, 3, 0).astype(np.int16), heart.ijk_to_ras)
    results.add_result_segments(node, lv_only, [3], TABLE, show_surfaces=False)
    shape, ijk_to_ras = segments.reference_geometry(node, margin_mm=30.0)
    mapping = segment_labels(map_segments(segments.segment_infos(node), TABLE))
    back = segments.segmentation_to_label_map(node, mapping, margin_mm=30.0)
    assert back.shape == shape
    assert np.count_nonzero(back.labels == 3) == np.count_nonzero(heart.labels == 3)
    # the LV's bounding box sits at least 30 mm inside the padded grid on every side
    ijk = np.argwhere(back.labels == 3)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    assert np.all(ijk.min(0) * spacing >= 30.0 - spacing)
    assert np.all((np.array(shape) - 1 - ijk.max(0)) * spacing >= 30.0 - spacing)


def test_segment_mask_resamples_onto_an_oblique_reference(scene):
    """Segments stored on an axis-aligned 1 mm grid, read on an oblique 1.7 x 1.3 x 2.1 mm grid:
    nearest-neighbour in physical space (checked against numpy on the voxel centres)."""
    source_ijk_to_ras = make_ijk_to_ras((1.0, 1.0, 1.0), (-20.0, -25.0, -15.0))
    labels = np.zeros((40, 50, 30), np.int16)
    ijk = np.argwhere(np.ones(labels.shape, bool))
    centre = np.array([20.0, 25.0, 15.0])
    labels.reshape(-1)[np.linalg.norm((ijk - centre) / [12.0, 16.0, 9.0], axis=1) <= 1.0] = 3
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    (segment_id,) = results.add_result_segments(node, LabelMap(labels, source_ijk_to_ras), [3], TABLE, show_surfaces=False).added
    target = make_ijk_to_ras((1.7, 1.3, 2.1), (-22.0, -18.0, -20.0), rotation_matrix((0.2, 1.0, 0.5), 0.45))
    shape = (30, 40, 20)
    mask = segments.segment_mask(node, segment_id, shape, target)
    from HeartCompletionLib.geometry.affine import ijk_to_ras_points, ras_to_ijk_points

    centres = ijk_to_ras_points(np.argwhere(np.ones(shape, bool)), target)
    source_index = np.floor(ras_to_ijk_points(centres, source_ijk_to_ras) + 0.5).astype(int)  # VTK's rounding
    inside = np.all((source_index >= 0) & (source_index < labels.shape), axis=1)
    expected = np.zeros(len(centres), bool)
    expected[inside] = labels[tuple(source_index[inside].T)] == 3
    expected = expected.reshape(shape)
    assert expected.sum() > 1000
    np.testing.assert_array_equal(mask, expected)


def test_results_land_in_the_segmentation_geometry(scene):
    """A completion computed on another grid (oblique 2 mm reference volume) is stored on the
    segmentation's own 1 mm grid, nearest neighbour in physical space."""
    own = make_ijk_to_ras((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = add_volume(scene, LabelMap(np.zeros((40, 40, 40), np.int16), own), "own", labelmap=False)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    other = make_ijk_to_ras((2.0, 1.5, 2.5), (5.0, 3.0, 4.0), rotation_matrix((1, 0, 0), 0.3))
    labels = np.zeros((15, 20, 12), np.int16)
    labels[3:10, 4:15, 2:9] = 3
    (segment_id,) = results.add_result_segments(node, LabelMap(labels, other), [3], TABLE, show_surfaces=False).added
    layer = node.GetBinaryLabelmapInternalRepresentation(segment_id)
    _, layer_ijk_to_ras = segments.array_from_oriented_image(layer)
    np.testing.assert_allclose(layer_ijk_to_ras[:3, :3], own[:3, :3], atol=1e-9)
    mask = segments.segment_mask(node, segment_id, (40, 40, 40), own)
    from HeartCompletionLib.geometry.affine import ijk_to_ras_points, ras_to_ijk_points

    centres = ijk_to_ras_points(np.argwhere(np.ones((40, 40, 40), bool)), own)
    index = np.floor(ras_to_ijk_points(centres, other) + 0.5).astype(int)  # VTK's rounding
    inside = np.all((index >= 0) & (index < labels.shape), axis=1)
    expected = np.zeros(len(centres), bool)
    expected[inside] = labels[tuple(index[inside].T)] == 3
    assert expected.sum() > 500
    np.testing.assert_array_equal(mask.reshape(-1), expected)


def test_a_result_cropped_to_its_labels_lands_as_the_whole_one(scene, heart):
    """``heart-complete --crop_output`` (the panel's hand-over): the box around the result's labels
    gives the same segments as the whole grid, also in a segmentation without a reference geometry
    of its own, and a replaced segment loses its voxels outside the box."""
    from HeartCompletionLib.io.labelmap import crop_to_labels

    lv = TABLE.by_name("LV").label
    labels = np.where(np.isin(heart.labels, [lv, TABLE.by_name("LAA").label]), heart.labels, 0).astype(np.int16)
    whole = LabelMap(labels, heart.ijk_to_ras)
    box = crop_to_labels(whole)
    assert np.prod(box.shape) < np.prod(whole.shape) / 4
    grid = (heart.shape, heart.ijk_to_ras)

    def imported(result, keep_geometry):
        partial = np.where(heart.labels == lv, 0, heart.labels).astype(np.int16)
        partial[2, 2, 2] = lv  # an old LV voxel far outside the result's box: a replaced LV must lose it
        node, _volume = segments.segmentation_from_label_map(LabelMap(partial, heart.ijk_to_ras), table=TABLE)
        if not keep_geometry:
            name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
            node.GetSegmentation().SetConversionParameter(name, "")
            assert segments.segmentation_geometry(node) is None
        lv_id = next(i.segment_id for i in segments.segment_infos(node) if i.name == TABLE.by_name("LV").name)
        results.add_result_segments(node, result, [lv, TABLE.by_name("LAA").label], TABLE, {lv: lv_id},
                                    show_surfaces=False)
        return {i.name: segments.segment_mask(node, i.segment_id, *grid) for i in segments.segment_infos(node)}

    for keep_geometry in (True, False):
        expected = imported(whole, keep_geometry)
        got = imported(box, keep_geometry)
        assert expected.keys() == got.keys()
        for name, mask in expected.items():
            np.testing.assert_array_equal(got[name], mask, err_msg=name)
        assert not got[TABLE.by_name("LV").name][2, 2, 2]
        np.testing.assert_array_equal(got[TABLE.by_name("LV").name], labels == lv)
        slicer.mrmlScene.Clear(0)


def test_new_segments_share_one_new_layer_and_the_given_keep_their_surfaces(scene, heart):
    """On the segmentation's lattice the new structures go into one new layer covering their box:
    the given segments' layer is not written and their 3D surfaces stay as they were, the new
    segments hold exactly the result's voxels (a negative value in the result becomes none) and get
    surfaces, a structure without voxels still gets its (empty) styled segment, the next Apply
    reads both layers, and undo takes the new layer away."""
    from HeartCompletionLib.io.labelmap import crop_to_labels

    aorta, laa, coronary = (TABLE.by_name(n).label for n in ("Aorta", "LAA", "Coronary"))
    given = np.where(np.isin(heart.labels, [aorta, laa, coronary]), 0, heart.labels).astype(np.int16)
    node, _volume = segments.segmentation_from_label_map(LabelMap(given, heart.ijk_to_ras), table=TABLE)
    segmentation = node.GetSegmentation()
    node.CreateClosedSurfaceRepresentation()
    given_ids = [i.segment_id for i in segments.segment_infos(node)]
    surface_of = {sid: segmentation.GetSegment(sid).GetRepresentation(segments.CLOSED_SURFACE) for sid in given_ids}
    made = {sid: (surface.GetAddressAsString("vtkPolyData"), surface.GetMTime()) for sid, surface in surface_of.items()}
    assert segmentation.GetNumberOfLayers() == 1
    result = np.where(np.isin(heart.labels, [aorta, laa]), heart.labels, 0).astype(np.int16)
    result[tuple(np.argwhere(result == aorta)[0])] = -1  # not a structure: no voxel of any segment
    undo = results.add_result_segments(node, crop_to_labels(LabelMap(result, heart.ijk_to_ras)),
                                       [aorta, laa, coronary], TABLE, show_surfaces=True)

    assert [segmentation.GetSegment(s).GetName() for s in undo.added] == ["Aorta", "LAA", "Coronary"]
    assert segmentation.GetNumberOfLayers() == 2
    new_layers = {segmentation.GetLayerIndex(s) for s in undo.added}
    assert len(new_layers) == 1 and new_layers != {segmentation.GetLayerIndex(given_ids[0])}
    for sid in given_ids:  # the given segments' surfaces were left as they were
        surface = segmentation.GetSegment(sid).GetRepresentation(segments.CLOSED_SURFACE)
        assert (surface.GetAddressAsString("vtkPolyData"), surface.GetMTime()) == made[sid]
    for sid, label in zip(undo.added, (aorta, laa, coronary)):
        mask = segments.segment_mask(node, sid, heart.shape, heart.ijk_to_ras)
        np.testing.assert_array_equal(mask, result == label)
        segment = segmentation.GetSegment(sid)
        assert parse_terminology_entry(segment.GetTerminology()) == parse_terminology_entry(
            terminology_entry(TABLE.by_label(label)))
        surface = segment.GetRepresentation(segments.CLOSED_SURFACE)
        assert (surface is not None and surface.GetNumberOfPolys() > 0) == (label != coronary)
    mapping = segment_labels(map_segments(segments.segment_infos(node), TABLE))
    back = segments.segmentation_to_label_map(node, mapping)  # the next Apply reads both layers
    np.testing.assert_array_equal(back.labels, np.where(result > 0, result, given))

    undo.undo()
    assert segmentation.GetNumberOfLayers() == 1
    assert [i.segment_id for i in segments.segment_infos(node)] == given_ids


def test_replacing_a_segment_of_an_earlier_completions_layer(scene, heart):
    """A second completion that replaces a segment the first one added (it lives in that
    completion's own layer, shared with another new segment): only that segment changes, and
    undo brings it back."""
    from HeartCompletionLib.io.labelmap import crop_to_labels

    aorta, laa = TABLE.by_name("Aorta").label, TABLE.by_name("LAA").label
    given = np.where(np.isin(heart.labels, [aorta, laa]), 0, heart.labels).astype(np.int16)
    node, _volume = segments.segmentation_from_label_map(LabelMap(given, heart.ijk_to_ras), table=TABLE)
    first = np.where(np.isin(heart.labels, [aorta, laa]), heart.labels, 0).astype(np.int16)
    aorta_id = results.add_result_segments(node, crop_to_labels(LabelMap(first, heart.ijk_to_ras)), [aorta, laa],
                                           TABLE, show_surfaces=False).added[0]
    grid = (heart.shape, heart.ijk_to_ras)
    before = {i.name: segments.segment_mask(node, i.segment_id, *grid) for i in segments.segment_infos(node)}
    second = np.where(np.roll(first == aorta, 2, axis=0), aorta, 0).astype(np.int16)  # a moved aorta
    undo = results.add_result_segments(node, crop_to_labels(LabelMap(second, heart.ijk_to_ras)), [aorta], TABLE,
                                       {aorta: aorta_id}, show_surfaces=False)
    after = {i.name: segments.segment_mask(node, i.segment_id, *grid) for i in segments.segment_infos(node)}
    assert not undo.added and list(undo.replaced) == [aorta_id]
    np.testing.assert_array_equal(after["Aorta"], second == aorta)
    assert not np.array_equal(after["Aorta"], before["Aorta"])
    for name, mask in before.items():
        if name != "Aorta":
            np.testing.assert_array_equal(after[name], mask, err_msg=name)
    undo.undo()
    for info in segments.segment_infos(node):
        np.testing.assert_array_equal(segments.segment_mask(node, info.segment_id, *grid), before[info.name],
                                      err_msg=info.name)


# --- mapping -----------------------------------------------------------------------------------


def test_segment_mapping_mixed_conventions(scene, heart):
    node, _ = partial_segmentation(scene, heart)
    mappings = map_segments(segments.segment_infos(node), TABLE)
    found = {m.segment.name: (m.structure.name if m.structure else None, m.matched_by) for m in mappings}
    assert found["left ventricle"] == ("LV", "name")
    assert found["heart_myocardium"] == ("Myocardium", "name")
    assert found["Segment_5"] == ("RV", "terminology")
    assert found["Tumor"] == (None, "none")
    assert [s.name for s in default_structures_to_complete(mappings, TABLE)] == list(DROPPED)


# --- export ------------------------------------------------------------------------------------


def mesh_header(path: Path) -> bytes:
    """The part of a mesh file where a coordinate-system tag lives: STL's 80-byte header, or the
    text lines before the data of OBJ, PLY and legacy VTK."""
    data = path.read_bytes()
    if path.suffix == ".stl":
        return data[:80]
    if path.suffix == ".obj":
        return b"\n".join(line for line in data.splitlines() if line.startswith(b"#"))
    end = data.find(b"end_header") if path.suffix == ".ply" else data.find(b"POINTS")
    return data[:end]


@pytest.mark.parametrize("file_format", ["STL", "OBJ", "PLY", "VTK"])
def test_exported_meshes_say_they_are_ras(scene, heart, tmp_path, file_format):
    """Slicer reads a mesh without ``SPACE=RAS`` as LPS and shows it mirrored, so the panel's mesh
    export must write the tag (read back from the file here), and the vertices must be RAS mm."""
    import vtk

    from HeartCompletionLib.geometry.affine import ijk_to_ras_points

    node, _ = partial_segmentation(scene, heart)
    meshes = results.export_structure_meshes(node, tmp_path, TABLE, file_format)
    assert sorted(p.name for p in meshes) == sorted(f"{n}.{file_format.lower()}" for n in NAMES)  # no Tumor
    for path in meshes:
        assert b"SPACE=RAS" in mesh_header(path), path.name
    readers = {"STL": vtk.vtkSTLReader, "OBJ": vtk.vtkOBJReader, "PLY": vtk.vtkPLYReader, "VTK": vtk.vtkPolyDataReader}
    reader = readers[file_format]()
    reader.SetFileName(str(tmp_path / f"LV.{file_format.lower()}"))
    reader.Update()
    bounds = np.array(reader.GetOutput().GetBounds()).reshape(3, 2)  # RAS mm: not mirrored
    lv_ras = ijk_to_ras_points(np.argwhere(heart.labels == TABLE.by_name("LV").label), heart.ijk_to_ras)
    tolerance = heart.spacing_mm.max()
    np.testing.assert_allclose(bounds[:, 0], lv_ras.min(0), atol=tolerance)
    np.testing.assert_allclose(bounds[:, 1], lv_ras.max(0), atol=tolerance)


def test_a_long_segment_name_keeps_the_stl_tag(scene, heart, tmp_path):
    node, _ = partial_segmentation(scene, heart)
    (segment_id,) = [i.segment_id for i in segments.segment_infos(node) if i.name == "left ventricle"]
    (path,) = results.export_meshes(node, tmp_path, [segment_id], "STL", file_names={segment_id: "LV" * 60})
    assert path.read_bytes()[:80].rstrip().endswith(b"SPACE=RAS")
    with pytest.raises(ValueError, match="mesh format"):
        results.export_meshes(node, tmp_path, [segment_id], "XYZ")


# --- end to end ----------------------------------------------------------------------------------


def test_complete_segmentation_end_to_end(scene, heart, tiny_checkpoint, tmp_path):
    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.io.labelmap_files import read_label_map

    node, volume = partial_segmentation(scene, heart)
    mappings = map_segments(segments.segment_infos(node), TABLE)
    before = snapshot(node, heart.shape, heart.ijk_to_ras)
    input_map = segments.segmentation_to_label_map(node, segment_labels(mappings), volume)
    assert not np.any(input_map.labels > len(TABLE)), "the unmapped Tumor must not reach the model"

    result, undo = results.complete_segmentation(node, mappings, tiny_checkpoint, device="cpu", show_surfaces=True)
    direct = complete_label_map(input_map, tiny_checkpoint, device="cpu")
    assert sorted(result.completed_labels) == sorted(TABLE.by_name(n).label for n in DROPPED)
    segmentation = node.GetSegmentation()
    assert len(undo.added) == len(DROPPED)
    for segment_id in undo.added:
        segment = segmentation.GetSegment(segment_id)
        structure = TABLE.by_name(segment.GetName())
        assert structure.name in DROPPED
        np.testing.assert_allclose(segment.GetColor(), structure.color_float, atol=1e-6)
        entry = parse_terminology_entry(segments.segment_terminology(segment))
        assert (entry.type.code, entry.category.code) == (structure.snomed_code, "123037004")
        mask = segments.segment_mask(node, segment_id, heart.shape, heart.ijk_to_ras)
        np.testing.assert_array_equal(mask, direct.label_map.labels == structure.label)
    assert any(np.any(direct.label_map.labels == v) for v in result.completed_labels), "the model predicted nothing"
    after = snapshot(node, heart.shape, heart.ijk_to_ras)
    for segment_id, (name, mask) in before.items():
        assert after[segment_id][0] == name
        np.testing.assert_array_equal(after[segment_id][1], mask)
    assert node.GetSegmentation().ContainsRepresentation(segments.CLOSED_SURFACE)

    # export: NIfTI with table values, .seg.nrrd with names, one mesh per segment
    nifti = results.export_label_map(node, tmp_path / "heart.nii.gz", TABLE, volume)
    exported = read_label_map(nifti)
    np.testing.assert_allclose(exported.ijk_to_ras, heart.ijk_to_ras, atol=1e-4)
    expected = np.where(np.isin(direct.label_map.labels, result.completed_labels), direct.label_map.labels, input_map.labels)
    np.testing.assert_array_equal(exported.labels, expected)
    seg_path = results.write_seg_nrrd(node, tmp_path / "heart.seg.nrrd")
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_path))
    assert storage.ReadData(reread)
    names = {reread.GetSegmentation().GetNthSegment(i).GetName() for i in range(reread.GetSegmentation().GetNumberOfSegments())}
    assert names == {info.name for info in segments.segment_infos(node)}
    meshes = results.export_structure_meshes(node, tmp_path / "meshes", TABLE, "STL")
    present = [s.name for s in TABLE if np.any(exported.labels == s.label)]
    assert sorted(p.name for p in meshes) == sorted(f"{n}.stl" for n in present)  # no Tumor.stl
    assert not [p for p in (tmp_path / "meshes").iterdir() if p.name.startswith(".")]
    import vtk

    reader = vtk.vtkSTLReader()
    reader.SetFileName(str(tmp_path / "meshes" / "LV.stl"))
    reader.Update()
    bounds = np.array(reader.GetOutput().GetBounds()).reshape(3, 2)  # RAS mm
    from HeartCompletionLib.geometry.affine import ijk_to_ras_points

    lv_ras = ijk_to_ras_points(np.argwhere(exported.labels == TABLE.by_name("LV").label), exported.ijk_to_ras)
    tolerance = exported.spacing_mm.max()
    np.testing.assert_allclose(bounds[:, 0], lv_ras.min(0), atol=tolerance)
    np.testing.assert_allclose(bounds[:, 1], lv_ras.max(0), atol=tolerance)

    undo.undo()
    assert [info.segment_id for info in segments.segment_infos(node)] == list(before)


def test_replace_overwrites_only_the_ticked_segment(scene, heart, tiny_checkpoint):
    node, volume = partial_segmentation(scene, heart)
    mappings = map_segments(segments.segment_infos(node), TABLE)
    before = snapshot(node, heart.shape, heart.ijk_to_ras)
    result, undo = results.complete_segmentation(
        node, mappings, tiny_checkpoint, structures=["LV"], replace=True, device="cpu", reference_volume_node=volume,
        show_surfaces=False,
    )
    lv_id = next(m.segment.segment_id for m in mappings if m.structure is not None and m.structure.name == "LV")
    assert undo.added == [] and list(undo.replaced) == [lv_id]
    after = snapshot(node, heart.shape, heart.ijk_to_ras)
    assert after[lv_id][0] == "left ventricle"  # name kept
    np.testing.assert_array_equal(after[lv_id][1], result.label_map.labels == TABLE.by_name("LV").label)
    for segment_id, (_name, mask) in before.items():
        if segment_id != lv_id:
            np.testing.assert_array_equal(after[segment_id][1], mask)
    undo.undo()
    np.testing.assert_array_equal(snapshot(node, heart.shape, heart.ijk_to_ras)[lv_id][1], before[lv_id][1])


def test_background_process_matches_in_process(scene, heart, tiny_checkpoint, tmp_path):
    """The path the module takes: input file (the box around the given structures, with its grid)
    -> completion_process in a subprocess (progress lines polled) -> output file (the box around the
    result's labels) -> segments; same voxels as the in-process call on the whole input map."""
    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map

    node, volume = partial_segmentation(scene, heart)
    mappings = map_segments(segments.segment_infos(node), TABLE)
    input_map = segments.segmentation_to_label_map(node, segment_labels(mappings), volume)
    input_path = write_label_map(input_map, tmp_path / "input.nrrd", box_only=True)  # as the panel hands it over
    output_path = tmp_path / "output.nrrd"
    process = completion_process.CompletionProcess(  # the result as the box around its labels, as the panel asks
        completion_process.build_command(tiny_checkpoint, input_path, output_path, device="cpu", crop_output=True)
    )
    events = process.wait(timeout_s=300)
    assert process.returncode == 0, [e.message for e in events]
    fractions = [e.fraction for e in events if e.kind == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    (result_event,) = [e for e in events if e.kind == "result"]
    completed = result_event.payload["completed_labels"]
    assert sorted(completed) == sorted(TABLE.by_name(n).label for n in DROPPED)

    output = read_label_map(output_path)
    assert np.prod(output.shape) < np.prod(input_map.shape), "the result was not cropped to its labels"
    undo = results.import_completion_result(node, mappings, output, completed, TABLE, show_surfaces=False)
    direct = complete_label_map(input_map, tiny_checkpoint, device="cpu")
    for segment_id in undo.added:
        label = TABLE.by_name(node.GetSegmentation().GetSegment(segment_id).GetName()).label
        mask = segments.segment_mask(node, segment_id, heart.shape, heart.ijk_to_ras)
        np.testing.assert_array_equal(mask, direct.label_map.labels == label)


def test_process_reports_bad_input(tmp_path, tiny_checkpoint):
    missing = tmp_path / "nothing.nrrd"
    command = completion_process.build_command(tiny_checkpoint, missing, tmp_path / "out.nrrd")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_child_env())
    assert done.returncode == ExitCode.BAD_INPUT
    errors = [completion_process.parse_line(line) for line in done.stdout.splitlines()]
    assert any(e.kind == "error" and "nothing.nrrd" in e.message for e in errors)
    assert not (tmp_path / "out.nrrd").exists()


def test_cancel_terminates_the_process(tmp_path):
    script = "import time\nprint('HC-PROGRESS 0.1 working', flush=True)\ntime.sleep(60)\n"
    process = completion_process.CompletionProcess([sys.executable, "-c", script])
    for _ in range(200):
        if any(e.kind == "progress" for e in process.poll()):
            break
        import time

        time.sleep(0.05)
    process.cancel(timeout_s=5)
    events = process.wait(timeout_s=10)
    assert process.returncode is not None and process.returncode != 0
    assert events[-1].kind == "exit"


def test_terminology_entry_survives_seg_nrrd(scene, tmp_path):
    """Our terminology strings go through Slicer's .seg.nrrd writer/reader unchanged."""
    labels = np.zeros((8, 8, 8), np.int16)
    labels[2:5, 2:5, 2:5] = TABLE.by_name("LAA").label
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    results.add_result_segments(node, LabelMap(labels, np.eye(4)), [8], TABLE, show_surfaces=False)
    path = results.write_seg_nrrd(node, tmp_path / "one.seg.nrrd")
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(reread)
    segment = reread.GetSegmentation().GetNthSegment(0)
    assert segments.segment_terminology(segment) == terminology_entry(TABLE.by_name("LAA"))
    # written through atomic_io: the usual permissions, no temporary left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.seg.nrrd"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="seg.nrrd"):
        results.write_seg_nrrd(node, tmp_path / "one.nrrd")


def _child_env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_a_crop_or_pad_of_the_grid_is_placed_exactly_as_vtk_resamples_it(scene):
    """Segments on a crop of the reference grid (what importing a label map makes) are placed by
    their integer offset instead of being resampled: the same mask as VTK's nearest neighbour."""
    grid = make_ijk_to_ras(spacing_mm=(0.7, 1.3, 2.5), direction=rotation_matrix((1, 2, 0.5), 0.6), origin_ras=(5, -3, 8))
    rng = np.random.default_rng(0)
    mask = rng.random((14, 9, 11)) > 0.5
    for shift in [(3, -2, 5), (-4, 0, 30), (20, 20, 20)]:  # inside, cut by the border, outside
        crop = grid.copy()
        crop[:3, 3] = grid[:3, :3] @ np.array(shift, dtype=float) + grid[:3, 3]
        assert np.array_equal(segments.lattice_offset(crop, grid), shift)
        placed = segments.resample_mask(mask, crop, (16, 12, 32), grid)
        nudged = crop.copy()
        nudged[:3, 3] += grid[:3, :3] @ np.array([1e-3, 0, 0])  # not on the lattice: VTK resamples
        assert segments.lattice_offset(nudged, grid) is None
        np.testing.assert_array_equal(placed, segments.resample_mask(mask, nudged, (16, 12, 32), grid))
    half = grid.copy()
    half[:3, 3] += grid[:3, :3] @ np.array([0.5, 0, 0])
    other = grid.copy()
    other[:3, 0] *= 2
    assert segments.lattice_offset(half, grid) is None and segments.lattice_offset(other, grid) is None


def test_segmentation_from_label_map_names_segments_and_keeps_the_voxels(scene, heart):
    node, volume = segments.segmentation_from_label_map(heart, "whole", TABLE)
    names = sorted(info.name for info in segments.segment_infos(node))
    assert names == sorted(s.name for s in TABLE if np.any(heart.labels == s.label))
    shape, ijk_to_ras = segments.reference_geometry(node, volume)
    assert shape == heart.shape and np.allclose(ijk_to_ras, heart.ijk_to_ras, atol=1e-6)
    mapping = {info.segment_id: TABLE.by_name(info.name).label for info in segments.segment_infos(node)}
    np.testing.assert_array_equal(segments.segmentation_to_label_map(node, mapping, volume).labels, heart.labels)


def test_lattice_overlap_clips_a_box_to_the_grid():
    on_grid, in_box = segments.lattice_overlap((-2, 3, 8), (5, 4, 4), (10, 10, 10))
    assert on_grid == (slice(0, 3), slice(3, 7), slice(8, 10)) and in_box == (slice(2, 5), slice(0, 4), slice(0, 2))
    assert segments.lattice_overlap((10, 0, 0), (5, 4, 4), (10, 10, 10)) is None  # beyond the last voxel
    assert segments.lattice_overlap((-5, 0, 0), (5, 4, 4), (10, 10, 10)) is None  # ends before the first
