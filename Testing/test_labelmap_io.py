"""Label-map file I/O: exact round trips, the same physical heart in every geometry and format
(MetaImage included; its own tests are in test_mha_glb.py), NRRD LPS vs NIfTI RAS, Slicer .seg.nrrd (names, terminology, layers, overlaps), bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import warnings

import nibabel as nib
import nrrd
import numpy as np
import pytest
from fixtures_data import structure_centroids_ras

from HeartCompletionLib.geometry.affine import LPS_TO_RAS, make_ijk_to_ras, rotation_matrix
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import (
    GRID_OFFSET_FIELD,
    GRID_SIZES_FIELD,
    SUPPORTED_SUFFIXES,
    LabelMapError,
    read_label_map,
    write_label_map,
)
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.structures.segment_mapping import parse_terminology_entry, terminology_entry
from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()
FORMATS = (".nii.gz", ".nrrd", ".seg.nrrd", ".mha")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def heart_in_geometries(tmp_path_factory, synthetic_heart_in_geometries):
    """One heart (seed 3) in the four geometries, each written in three formats."""
    folder = tmp_path_factory.mktemp("io_geometries")
    return {name: (lm, {fmt: write_label_map(lm, folder / f"{name}{fmt}") for fmt in FORMATS})
            for name, lm in synthetic_heart_in_geometries.items()}


def test_round_trips_exact_and_same_physical_heart_everywhere(heart_in_geometries):
    """Each file reads back exactly (labels and affine), and every geometry/format puts each
    structure in the same physical place: centroids within half a voxel, volumes within a few %."""
    ref = heart_in_geometries["iso_ras"][0]
    ref_c = structure_centroids_ras(ref)
    ref_v = np.bincount(ref.labels.ravel()) * ref.voxel_volume_mm3
    for name, (lm, paths) in heart_in_geometries.items():
        for fmt, path in paths.items():
            before = sha256(path)
            back = read_label_map(path)
            np.testing.assert_array_equal(back.labels, lm.labels, err_msg=f"{name}{fmt}")
            # NIfTI stores the affine as float32 (sub-micrometre); NRRD keeps 17 digits
            atol = 1e-4 if fmt.startswith(".nii") else 1e-12
            np.testing.assert_allclose(back.ijk_to_ras, lm.ijk_to_ras, atol=atol, err_msg=f"{name}{fmt}")
            assert back.source == str(path) and back.metadata["format"] == fmt
            assert sha256(path) == before  # reading never touches the input
            assert back.present_labels() == list(range(1, 11)), f"{name}{fmt}"
            half_voxel = 0.5 * max(back.spacing_mm.max(), ref.spacing_mm.max())
            volumes = np.bincount(back.labels.ravel()) * back.voxel_volume_mm3
            for label, c in structure_centroids_ras(back).items():
                structure = TABLE.by_label(label).name
                assert np.linalg.norm(c - ref_c[label]) < half_voxel, f"{name}{fmt} {structure}"
                vol = volumes[label]
                tol = 0.04 if ref_v[label] > 20_000 else 0.15  # thin/small structures: partial-volume noise
                assert abs(vol / ref_v[label] - 1) < tol, f"{name}{fmt} {structure}: {vol / ref_v[label]:.3f}"


def test_written_headers(heart_in_geometries):
    lm, paths = heart_in_geometries["oblique"]
    img = nib.load(str(paths[".nii.gz"]))
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), lm.ijk_to_ras, atol=1e-4)  # qform agrees with sform
    header = nrrd.read_header(str(paths[".nrrd"]))
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    np.testing.assert_allclose(np.asarray(header["space origin"]), (LPS_TO_RAS @ lm.ijk_to_ras)[:3, 3])
    assert not any(k.startswith("Segment") for k in header)
    # labels above 255 are kept (int16)
    big = LabelMap(np.array([[[0, 300]]], dtype=np.int16).repeat(2, axis=0), np.eye(4))
    for fmt in (".nii", ".nrrd"):
        back = read_label_map(write_label_map(big, lm_path := paths[".nrrd"].with_name(f"big{fmt}")),
                              convention={300: "LV"})
        assert back.labels.max() == 3, lm_path


def test_nrrd_lps_and_nifti_ras_of_the_same_data_agree(tmp_path):
    """Two tools store one label map differently: NIfTI with a RAS affine, NRRD in LPS with the
    array flipped along i and j (as a DICOM/ITK pipeline stores it). Same voxels in RAS."""
    lm = synthetic_label_map(seed=6, spacing_mm=(1.5, 1.6, 2.0), direction=rotation_matrix([0, 0, 1], 0.3))
    nib.save(nib.Nifti1Image(lm.labels.astype(np.uint8), lm.ijk_to_ras), str(tmp_path / "ras.nii.gz"))
    flipped = lm.labels[::-1, ::-1, :]
    n = np.array(lm.shape) - 1
    ijk_to_ras_flipped = lm.ijk_to_ras.copy()  # new voxel (i, j, k) = old (ni - i, nj - j, k)
    ijk_to_ras_flipped[:3, 3] = lm.ijk_to_ras[:3, :3] @ np.array([n[0], n[1], 0]) + lm.ijk_to_ras[:3, 3]
    ijk_to_ras_flipped[:3, :2] *= -1
    ijk_to_lps = LPS_TO_RAS @ ijk_to_ras_flipped
    for space, to_space in (("left-posterior-superior", LPS_TO_RAS), ("LPS", LPS_TO_RAS), ("RAS", np.eye(4)),
                            ("left-anterior-superior", np.diag([-1.0, 1, 1, 1]))):
        m = to_space @ ijk_to_ras_flipped
        nrrd.write(str(tmp_path / "lps.nrrd"), flipped.astype(np.uint8),
                   {"space": space, "space directions": m[:3, :3].T, "space origin": m[:3, 3], "encoding": "gzip"})
        a, b = read_label_map(tmp_path / "ras.nii.gz"), read_label_map(tmp_path / "lps.nrrd")
        assert not a.same_geometry(b)
        ca, cb = structure_centroids_ras(a), structure_centroids_ras(b)
        for label in ca:
            np.testing.assert_allclose(cb[label], ca[label], atol=1e-4, err_msg=space)  # NIfTI float32
        np.testing.assert_allclose(b.ijk_to_ras, ijk_to_ras_flipped, atol=1e-9)  # NRRD: exact
    assert ijk_to_lps[0, 0] > 0  # the LPS file really stores i towards the patient's left


def _write_seg_nrrd(path, data, segments, layered=False):
    header = {"space": "left-posterior-superior", "space origin": [10.0, -5.0, 3.0],
              "space directions": np.diag([-1.0, -1.0, 2.0]), "kinds": ["domain"] * 3, "encoding": "gzip"}
    if layered:
        header["space directions"] = np.vstack([[np.nan] * 3, header["space directions"]])
        header["kinds"] = ["list", "domain", "domain", "domain"]
    for i, seg in enumerate(segments):
        for key, value in seg.items():
            header[f"Segment{i}_{key}"] = value
    nrrd.write(str(path), data, header)


def test_seg_nrrd_names_in_mixed_conventions(tmp_path):
    data = np.zeros((6, 5, 4), dtype=np.uint8)
    data[0], data[1], data[2], data[3], data[4] = 1, 2, 3, 4, 5
    sct = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
    segments = [
        {"ID": "a", "Name": "left ventricle", "LabelValue": "1", "Layer": "0"},
        {"ID": "b", "Name": "heart_myocardium", "LabelValue": "2", "Layer": "0"},
        {"ID": "c", "Name": "Segment_3", "LabelValue": "3", "Layer": "0",  # terminology code only
         "Tags": f"Segmentation.Status:inprogress|TerminologyEntry:{sct}SCT^82471001^Left atrium~^^~x~^^~^^|"},
        {"ID": "d", "Name": "atrial_appendage_left", "LabelValue": "4", "Layer": "0",  # TotalSegmentator LAA
         "Tags": f"TerminologyEntry:{sct}SCT^68786006^Atrial appendage~SCT^7771000^Left~x~^^~^^|"},
        {"ID": "e", "Name": "tumour", "LabelValue": "5", "Layer": "0"},
    ]
    path = tmp_path / "mixed.seg.nrrd"
    _write_seg_nrrd(path, data, segments)
    with pytest.warns(UserWarning, match=r"tumour.*ignored"):
        lm = read_label_map(path)
    expected = {0: "LV", 1: "Myocardium", 2: "LA", 3: "LAA"}
    for i, name in expected.items():
        assert np.all(lm.labels[i] == TABLE.by_name(name).label), name
    assert np.all(lm.labels[4] == 0) and np.all(lm.labels[5] == 0)
    assert [s["structure"] for s in lm.metadata["segments"]] == ["LV", "Myocardium", "LA", "LAA", None]
    np.testing.assert_allclose(lm.ijk_to_ras[:3, 3], [-10.0, 5.0, 3.0])  # LPS origin -> RAS
    # a name that contradicts the terminology code: the code wins, with a warning
    segments[1]["Tags"] = f"TerminologyEntry:{sct}SCT^53085002^Right ventricle~^^~x~^^~^^|"
    _write_seg_nrrd(path, data, segments[:2])
    with pytest.warns(UserWarning, match="terminology says 'RV'"):
        lm = read_label_map(path)
    assert np.all(lm.labels[1] == TABLE.by_name("RV").label)


def test_seg_nrrd_layers_overlap_later_segment_wins(tmp_path):
    data = np.zeros((2, 6, 5, 4), dtype=np.uint8)
    data[0, :4] = 1  # layer 0: LV in i < 4
    data[1, 2:] = 1  # layer 1: myocardium in i >= 2 (overlaps LV at i = 2, 3)
    segments = [{"Name": "LV", "LabelValue": "1", "Layer": "0"}, {"Name": "Myocardium", "LabelValue": "1", "Layer": "1"}]
    path = tmp_path / "layers.seg.nrrd"
    _write_seg_nrrd(path, data, segments, layered=True)
    with pytest.warns(UserWarning, match=r"later layer wins: Myocardium over LV \(40 voxels"):
        lm = read_label_map(path)
    assert lm.shape == (6, 5, 4)
    assert np.all(lm.labels[:2] == 3) and np.all(lm.labels[2:] == 1)
    np.testing.assert_allclose(lm.spacing_mm, [1, 1, 2])
    segments[1]["Layer"] = "5"
    _write_seg_nrrd(path, data, segments, layered=True)
    with pytest.raises(LabelMapError, match="layer 5"):
        read_label_map(path)


def test_written_seg_nrrd_is_readable_by_pynrrd_and_slicerio(heart_in_geometries):
    lm, paths = heart_in_geometries["lps_flipped"]
    path = paths[".seg.nrrd"]
    header = nrrd.read_header(str(path))
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    names = [header[f"Segment{i}_Name"] for i in range(10)]
    assert names == TABLE.names
    lv = names.index("LV")
    assert header[f"Segment{lv}_LabelValue"] == "3" and header[f"Segment{lv}_Layer"] == "0"
    assert [float(c) for c in header[f"Segment{lv}_Color"].split()] == pytest.approx(TABLE.by_name("LV").color_float, abs=1e-5)
    assert "SCT^123037004^Anatomical Structure~SCT^87878005^Left ventricle" in header[f"Segment{lv}_Tags"]
    laa = parse_terminology_entry(header[f"Segment{names.index('LAA')}_Tags"].split("TerminologyEntry:")[1])
    assert laa.type_code == "33626005" and laa.context == parse_terminology_entry(terminology_entry(TABLE[0])).context
    slicerio = pytest.importorskip("slicerio")
    seg = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == set(TABLE.names)
    assert by_name["Myocardium"]["terminology"]["type"][1] == "74281007"
    assert by_name["Myocardium"]["terminology"]["category"][1] == "123037004"
    np.testing.assert_allclose(LPS_TO_RAS @ seg["ijkToLPS"], lm.ijk_to_ras, atol=1e-12)
    np.testing.assert_array_equal(seg["voxels"], lm.labels)


def _slicer():
    try:
        import slicer
    except Exception as exc:  # slicer-core missing or broken: the rest of the I/O tests still run
        pytest.skip(f"slicer-core not importable: {exc}")
    return slicer


def test_slicer_reads_our_seg_nrrd_and_we_read_slicers(tmp_path, heart_in_geometries):
    """Round trip through Slicer's own segmentation storage node (slicer-core, no GUI)."""
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    lm, paths = heart_in_geometries["oblique"]
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(paths[".seg.nrrd"]))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert sorted(segmentation.GetNthSegment(i).GetName() for i in range(10)) == sorted(TABLE.names)
    tag = vtk.reference("")
    assert segmentation.GetSegment("Segment_8").GetTag("TerminologyEntry", tag) and "33626005" in str(tag)

    # Slicer writes a cropped 4-D layered file when segments overlap; we must place it exactly
    segmentation = slicer.vtkSegmentation()
    segmentation.SetSourceRepresentationName("Binary labelmap")
    m = make_ijk_to_ras((1.5, 1.5, 2.0), (10.0, -20.0, 30.0), rotation_matrix([1, 1, 0], 0.2))
    masks = {"left ventricle": np.zeros((20, 22, 24), bool), "heart_myocardium": np.zeros((20, 22, 24), bool)}
    masks["left ventricle"][2:10, 3:12, 4:15] = True
    masks["heart_myocardium"][6:14, 8:18, 10:20] = True
    for name, mask in masks.items():
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*mask.shape)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.transpose(2, 1, 0).ravel()
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, m[r, c])
        image.SetImageToWorldMatrix(matrix)
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.AddRepresentation("Binary labelmap", image)
        segmentation.AddSegment(segment)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetAndObserveSegmentation(segmentation)
    storage.SetFileName(str(tmp_path / "from_slicer.seg.nrrd"))
    assert storage.WriteData(node) == 1
    assert nrrd.read_header(str(tmp_path / "from_slicer.seg.nrrd"))["dimension"] == 4
    with pytest.warns(UserWarning, match="later layer wins"):
        back = read_label_map(tmp_path / "from_slicer.seg.nrrd")
    original = LabelMap(np.where(masks["heart_myocardium"], 1, np.where(masks["left ventricle"], 3, 0)).astype(np.int16), m)
    for label, centroid in structure_centroids_ras(original).items():
        np.testing.assert_allclose(structure_centroids_ras(back)[label], centroid, atol=1e-6)
        assert (back.labels == label).sum() == (original.labels == label).sum()


def test_conventions_unknown_values_and_empty_maps(tmp_path):
    labels = np.zeros((8, 8, 8), dtype=np.int16)
    labels[:2], labels[2:4], labels[4:6] = 500, 205, 42  # MM-WHS LV, myocardium; 42 unknown there
    nib.save(nib.Nifti1Image(labels, np.diag([0.8, 0.8, 1.2, 1])), str(tmp_path / "mmwhs.nii.gz"))
    with pytest.warns(UserWarning, match=r"\[42\]"):
        lm = read_label_map(tmp_path / "mmwhs.nii.gz", convention="mmwhs")
    assert lm.present_labels() == [1, 3] and np.all(lm.labels[:2] == 3) and np.all(lm.labels[4:] == 0)
    with pytest.warns(UserWarning, match="not in the structure table"):
        lm = read_label_map(tmp_path / "mmwhs.nii.gz")  # no convention: 42/205/500 are not table labels
    assert lm.present_labels() == []  # an empty label map is not an error: callers decide
    float_labels = np.zeros((4, 4, 4), dtype=np.float32)
    float_labels[1] = 3.0  # some tools save label maps as float: accepted when values are integers
    nib.save(nib.Nifti1Image(float_labels, np.eye(4)), str(tmp_path / "float.nii"))
    assert read_label_map(tmp_path / "float.nii").present_labels() == [3]
    nib.save(nib.Nifti1Image(labels.clip(0, 3).astype(np.uint8), None), str(tmp_path / "nogeom.nii"))
    with pytest.warns(UserWarning, match="neither sform nor qform"):
        read_label_map(tmp_path / "nogeom.nii")


def _bad_inputs(folder):
    """name -> (path, expected message fragment); each file is broken in one way."""
    cases = {}
    rng = np.random.default_rng(0)
    cases["missing"] = (folder / "nope.nii.gz", "file not found")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n")
    cases["suffix"] = (folder / "image.png", "unsupported file type")
    (folder / "headless.mha").write_bytes(b"ObjectType = Image\n")
    cases["metaimage_header"] = (folder / "headless.mha", "cannot read MetaImage header")
    good = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), np.eye(4)), str(good))
    (folder / "truncated.nii.gz").write_bytes(good.read_bytes()[:60])
    cases["corrupt_gzip"] = (folder / "truncated.nii.gz", "cannot read NIfTI")
    (folder / "garbage.nrrd").write_bytes(b"this is not a nrrd file\n")
    cases["garbage_nrrd"] = (folder / "garbage.nrrd", "cannot read NRRD")
    with gzip.open(folder / "notnifti.nii.gz", "wb") as f:
        f.write(b"\0" * 400)
    cases["zero_header"] = (folder / "notnifti.nii.gz", "cannot read NIfTI")
    nib.save(nib.Nifti1Image(rng.normal(size=(6, 6, 6)).astype(np.float32), np.eye(4)), str(folder / "ct.nii.gz"))
    cases["float"] = (folder / "ct.nii.gz", "non-integer")
    nib.save(nib.Nifti1Image(rng.integers(-1024, 2000, (6, 6, 6)).astype(np.int16), np.eye(4)), str(folder / "hu.nii"))
    cases["negative"] = (folder / "hu.nii", "negative values")
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(folder / "rgb.nii.gz"))
    cases["rgb_nifti"] = (folder / "rgb.nii.gz", "RGB")
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6, 2), np.uint8), np.eye(4)), str(folder / "4d.nii.gz"))
    cases["4d_nifti"] = (folder / "4d.nii.gz", "4-D")
    nrrd.write(str(folder / "4d.nrrd"), np.ones((2, 6, 6, 6), np.uint8), {"kinds": ["list", "domain", "domain", "domain"]})
    cases["4d_nrrd"] = (folder / "4d.nrrd", "without Slicer segment fields")
    nrrd.write(str(folder / "rgb.nrrd"), np.ones((3, 6, 6, 6), np.uint8), {"kinds": ["RGB-color", "domain", "domain", "domain"]})
    cases["rgb_nrrd"] = (folder / "rgb.nrrd", "colour image")
    nrrd.write(str(folder / "scanner.nrrd"), np.ones((6, 6, 6), np.uint8),
               {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": [0, 0, 0]})
    cases["space"] = (folder / "scanner.nrrd", "unsupported NRRD space")
    shear = np.eye(4)
    shear[0, 1] = 0.5
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), shear), str(folder / "shear.nii"))
    cases["sheared"] = (folder / "shear.nii", "not orthogonal")
    return cases


def test_bad_inputs_raise_label_map_error_naming_the_file(tmp_path):
    cases = _bad_inputs(tmp_path)
    hashes = {p: sha256(p) for p, _ in cases.values() if p.exists()}
    for name, (path, fragment) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(LabelMapError) as info:
                read_label_map(path)
        assert str(info.value).startswith(str(path)), name
        assert fragment in str(info.value), f"{name}: {info.value}"
        assert isinstance(info.value, ValueError) and info.value.path == path
    assert {p: sha256(p) for p in hashes} == hashes  # inputs unchanged


def test_writes_are_atomic_and_validated(tmp_path):
    lm = synthetic_label_map(seed=1, spacing_mm=4.0)
    target = tmp_path / "out" / "case.seg.nrrd"
    write_label_map(lm, target)
    before = sha256(target)
    bad = LabelMap(np.full((3, 3, 3), 42, dtype=np.int16), np.eye(4))
    with pytest.raises(LabelMapError, match=r"case.seg.nrrd: label values \[42\]"):
        write_label_map(bad, target)
    assert sha256(target) == before  # the previous file survives a failed write
    with pytest.raises(LabelMapError, match="negative"):
        write_label_map(LabelMap(-np.ones((2, 2, 2), np.int16), np.eye(4)), tmp_path / "neg.nii")
    with pytest.raises(LabelMapError, match="unsupported file type"):
        write_label_map(lm, tmp_path / "case.png")
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(LabelMapError, match="blocker"):
        write_label_map(lm, tmp_path / "blocker" / "case.nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.seg.nrrd"]  # no temp files left
    assert set(SUPPORTED_SUFFIXES) == {".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd"}


def test_nrrd_without_space_fields_and_singleton_dimensions(tmp_path):
    data = np.zeros((5, 6, 7), dtype=np.uint8)
    data[1:3, 2:4, 3:6] = 2
    nrrd.write(str(tmp_path / "nospace.nrrd"), data, {"spacings": [0.5, 0.7, 2.0]})
    with pytest.warns(UserWarning, match="no 'space directions'"):
        lm = read_label_map(tmp_path / "nospace.nrrd")
    np.testing.assert_allclose(lm.spacing_mm, [0.5, 0.7, 2.0])
    nrrd.write(str(tmp_path / "nospacename.nrrd"), data, {"space directions": np.diag([1.0, 1.0, 2.0]),
                                                          "space origin": [5.0, 6.0, 7.0]})
    with pytest.warns(UserWarning, match="assuming left-posterior-superior"):
        lm = read_label_map(tmp_path / "nospacename.nrrd")
    np.testing.assert_allclose(lm.ijk_to_ras[:3, 3], [-5.0, -6.0, 7.0])
    # a .seg.nrrd without segment fields is a plain label map (as Slicer reads it)
    nrrd.write(str(tmp_path / "plain.seg.nrrd"), data, {"space": "RAS", "space directions": np.eye(3),
                                                        "space origin": [0.0, 0.0, 0.0]})
    assert read_label_map(tmp_path / "plain.seg.nrrd").present_labels() == [2]
    # NIfTI with trailing singleton dimensions (x, y, z, 1, 1) is still a 3-D label map
    nib.save(nib.Nifti1Image(data[..., None, None], np.eye(4)), str(tmp_path / "5d.nii.gz"))
    np.testing.assert_array_equal(read_label_map(tmp_path / "5d.nii.gz").labels, data)


def test_nifti_bytes_are_nibabels(tmp_path):
    """The NIfTI writer streams the voxels itself (a tiled transpose to Fortran order): its file is
    byte for byte what nibabel's ``Nifti1Image.to_bytes`` makes of the same image, uncompressed, and
    the same after decompression for .nii.gz, for uint8 and int16 voxels on grids that are not
    whole tiles; nibabel reads the labels and the matrix back."""
    rng = np.random.default_rng(2)
    matrix = make_ijk_to_ras((0.4, 0.45, 0.5), (-30.0, 12.0, 7.5), rotation_matrix((1.0, 2.0, 0.5), 0.4))
    for top, shape in ((12, (37, 70, 5)), (400, (65, 3, 33))):
        labels = rng.integers(0, top, size=shape).astype(np.int16)
        expected_dtype = np.uint8 if top <= 256 else np.int16
        img = nib.Nifti1Image(labels.astype(expected_dtype), matrix)
        img.set_sform(matrix, code=1)
        img.set_qform(matrix, code=1)
        img.header.set_xyzt_units("mm")
        img.header.set_data_dtype(expected_dtype)
        reference = img.to_bytes()
        plain = write_label_map(LabelMap(labels, matrix), tmp_path / f"m{top}.nii")
        assert plain.read_bytes() == reference
        packed = write_label_map(LabelMap(labels, matrix), tmp_path / f"m{top}.nii.gz")
        assert gzip.decompress(packed.read_bytes()) == reference
        back = nib.load(packed)
        assert np.array_equal(np.asanyarray(back.dataobj), labels) and np.allclose(back.affine, matrix)


def test_fortran_order_voxels_become_c_order_in_tiles():
    """What nibabel and pynrrd return (Fortran order) is made C-contiguous tile by tile, cast on the
    way; the values are numpy's own conversion's, on sizes that are not whole tiles."""
    from HeartCompletionLib.io.labelmap_files import c_order

    rng = np.random.default_rng(4)
    fortran = np.asfortranarray(rng.integers(0, 11, size=(45, 33, 7)).astype(np.uint8))
    out = c_order(fortran, np.int16)
    assert out.flags.c_contiguous and out.dtype == np.int16 and np.array_equal(out, fortran)
    already = rng.integers(0, 5, size=(4, 5, 6)).astype(np.int16)
    assert c_order(already) is already  # already C order: no copy
    assert np.array_equal(c_order(np.asfortranarray(already[..., 0])), already[..., 0])  # 2-D: numpy's copy


def test_present_values_match_numpy_unique():
    """Which labels occur, counted slab by slab, against ``np.unique``: uint8 and int16 volumes,
    values above 255, a flat array, an empty one, and negative values (np.unique's own answer)."""
    from HeartCompletionLib.io.labelmap import present_values

    rng = np.random.default_rng(8)
    cases = [rng.integers(0, 11, size=(9, 8, 7)).astype(np.uint8),
             (rng.integers(0, 3, size=(6, 5, 4)) * 200).astype(np.int16),
             rng.integers(0, 5, size=40).astype(np.int16),
             np.zeros((0, 3, 3), dtype=np.int16),
             np.array([[-2, 0], [5, 5]], dtype=np.int16)]
    for labels in cases:
        values = present_values(labels)
        assert values.dtype == labels.dtype and np.array_equal(values, np.unique(labels)), labels.dtype


def test_value_counts_match_numpy_bincount_on_views():
    """Counts per value, a chunk at a time, against ``np.bincount`` of a copy: a contiguous volume
    larger than a chunk, cropped and strided views (counted slab by slab, never copied whole), a
    flat strided view, ``minlength`` above the largest value, and an empty volume."""
    from HeartCompletionLib.io import labelmap
    from HeartCompletionLib.io.labelmap import value_counts

    rng = np.random.default_rng(9)
    big = rng.integers(0, 12, size=(70, 40, 30)).astype(np.int16)
    assert big.size > labelmap._COUNT_CHUNK
    for labels in (big, big[3:60, ::2, 1:], big[::2, ::2, ::2], big[5], big.ravel()[::3]):
        assert np.array_equal(value_counts(labels), np.bincount(labels.ravel())), labels.shape
    assert value_counts(big[:, :, :1].astype(np.uint8), minlength=20).tolist() == \
        np.bincount(big[:, :, 0].ravel(), minlength=20).tolist()
    assert value_counts(np.zeros((0, 4, 4), dtype=np.int16), minlength=3).tolist() == [0, 0, 0]


# --- box_only: the box around the labels, with the grid it belongs to (the Slicer panel's input) ----
def test_a_box_only_nrrd_reads_back_as_the_whole_grid(tmp_path):
    m = make_ijk_to_ras((0.7, 0.8, 1.3), (-20.0, 14.0, 3.0), rotation_matrix((1.0, 2.0, 0.5), 0.4))
    labels = np.zeros((40, 36, 30), np.int16)
    labels[10:25, 8:20, 5:12] = 3
    labels[30, 30, 20] = 7
    lm = LabelMap(labels, m, "heart")
    whole, box = write_label_map(lm, tmp_path / "whole.nrrd"), write_label_map(lm, tmp_path / "box.nrrd", box_only=True)
    back = read_label_map(box)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_allclose(back.ijk_to_ras, m, atol=1e-9)
    assert back.labels.flags.c_contiguous
    # what another reader sees: the box alone, in place (its first voxel is the grid's voxel 10, 8, 5)
    data, header = nrrd.read(str(box))
    assert data.shape == (21, 23, 16) and header[GRID_SIZES_FIELD] == "40 36 30" and header[GRID_OFFSET_FIELD] == "10 8 5"
    origin_ras = (LPS_TO_RAS @ np.append(header["space origin"], 1.0))[:3]
    np.testing.assert_allclose(origin_ras, m[:3, :3] @ [10, 8, 5] + m[:3, 3], atol=1e-9)
    assert box.stat().st_size < whole.stat().st_size
    # nothing to crop: a plain file, no grid fields
    empty = write_label_map(LabelMap(np.zeros((4, 4, 4), np.int16), m, "e"), tmp_path / "empty.nrrd", box_only=True)
    assert GRID_SIZES_FIELD not in nrrd.read_header(str(empty))
    with pytest.raises(LabelMapError, match=r"only a \.nrrd"):
        write_label_map(lm, tmp_path / "box.nii.gz", box_only=True)
    assert not (tmp_path / "box.nii.gz").exists()


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.nrrd", "a.seg.nrrd", "box.nrrd"])
def test_a_label_map_laid_out_i_fastest_writes_the_same_file(tmp_path, name):
    """Labels in VTK's order (a transposed view, what the Slicer panel hands over) and crops of
    them: the same bytes as the C-ordered map, the same box and value counts."""
    from HeartCompletionLib.io.labelmap import labelled_box, value_counts

    m = make_ijk_to_ras((0.7, 0.8, 1.3), (-20.0, 14.0, 3.0), rotation_matrix((1.0, 2.0, 0.5), 0.4))
    labels = np.zeros((40, 36, 30), np.int16)
    labels[10:25, 8:20, 5:12] = 3
    labels[30, 30, 20] = 7
    vtk_order = np.ascontiguousarray(labels.T).T  # [i, j, k] with i fastest
    assert vtk_order.flags.f_contiguous and not vtk_order.flags.c_contiguous
    box_only = name == "box.nrrd"
    files = []
    for order, data in (("c", labels), ("i_fastest", vtk_order)):
        folder = tmp_path / order
        files.append(write_label_map(LabelMap(data, m, "heart"), folder / name, box_only=box_only).read_bytes())
    assert files[0] == files[1]
    for part in (vtk_order, vtk_order[3:38, 2:30, 4:29]):
        c_part = np.ascontiguousarray(part)
        assert [b.tolist() for b in labelled_box(part)] == [b.tolist() for b in labelled_box(c_part)]
        assert value_counts(part).tolist() == value_counts(c_part).tolist()


def test_value_lookup_maps_listed_values_and_clears_the_rest():
    from HeartCompletionLib.io.labelmap import value_lookup

    rng = np.random.default_rng(3)
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        values = rng.integers(-3 if np.dtype(dtype).kind == "i" else 0, 12, size=(9, 8, 7)).astype(dtype)
        table = {1: 5, 4: 2, 11: 9, **({-3: 7} if np.dtype(dtype).kind == "i" else {})}
        expected = np.zeros(values.shape, np.int16)
        for key, value in table.items():
            expected[values == key] = value
        out = value_lookup(values, table)
        assert out.dtype == np.int16 and np.array_equal(out, expected), dtype
        fortran = value_lookup(np.asfortranarray(values), table, np.uint8)
        assert fortran.flags.f_contiguous and np.array_equal(fortran, expected), dtype  # the input's order
    assert not value_lookup(np.arange(4, dtype=np.uint8).reshape(1, 1, 4), {300: 1, -1: 2}).any()  # out of range


@pytest.mark.parametrize("sizes, offset, problem", [
    ("40 36", "10 8 5", "do not place"), ("40 36 30", "30 8 5", "do not place"), ("40 x 30", "10 8 5", "do not place"),
    ("40 36 30", "-1 8 5", "do not place"), ("4000 4000 4000", "0 0 0", "more voxels than the limit"),
    (" ".join(["99999999999999999999"] * 3), "0 0 0", "more voxels than the limit"), ("40 36 30", "", "do not place"),
])
def test_bad_grid_fields_are_refused_with_the_file_named(tmp_path, sizes, offset, problem):
    path = tmp_path / "bad.nrrd"
    write_label_map(LabelMap(np.ones((21, 23, 16), np.int16), np.eye(4), "b"), path)
    data, header = nrrd.read(str(path))
    header[GRID_SIZES_FIELD], header[GRID_OFFSET_FIELD] = sizes, offset
    nrrd.write(str(path), data, header)
    with pytest.raises(LabelMapError, match=problem) as caught:
        read_label_map(path)
    assert "bad.nrrd" in str(caught.value)
