"""MetaImage label maps through SimpleITK (HeartCompletionLib.io.metaimage via labelmap_io) and GLB
meshes through trimesh (HeartCompletionLib.io.meshes): real files written by the libraries
themselves, read back by ours (and the other way round), geometry compared with NIfTI and with
ITK's own index -> physical point transform."""

from __future__ import annotations

import hashlib
import sys
import zlib

import numpy as np
import pytest
import SimpleITK as sitk  # in the test extra (scripts/setup_env.sh installs it): no skip

from HeartCompletionLib.geometry.affine import LPS_TO_RAS, rotation_matrix
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import (
    LabelMapError,
    find_label_maps,
    read_image_geometry,
    read_label_map,
    write_label_map,
)
from HeartCompletionLib.io.synthetic import synthetic_label_map

#: oblique (a rotation about a skew axis, one axis flipped) and anisotropic (0.9 x 1.3 x 2.2 mm)
OBLIQUE = {"spacing_mm": (0.9, 1.3, 2.2), "direction": rotation_matrix([1.0, 2.0, 3.0], 0.45), "flip_axes": (1,)}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def oblique_heart():
    return synthetic_label_map(seed=4, **OBLIQUE)


def sitk_image(label_map: LabelMap):
    """The label map as SimpleITK's own image, built here from first principles (not by our writer):
    ITK's physical space is LPS, its arrays are indexed [k, j, i]."""
    ijk_to_lps = LPS_TO_RAS @ label_map.ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(label_map.labels.astype(np.uint8).transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def test_mha_written_by_simpleitk_reads_like_the_nifti_of_the_same_map(oblique_heart, tmp_path):
    path = tmp_path / "heart.mha"
    image = sitk_image(oblique_heart)
    sitk.WriteImage(image, str(path), True)
    nifti = read_label_map(write_label_map(oblique_heart, tmp_path / "heart.nii.gz"))
    before = sha256(path)
    mha = read_label_map(path)
    assert sha256(path) == before  # reading never touches the input
    np.testing.assert_array_equal(mha.labels, nifti.labels)
    assert mha.labels.dtype == nifti.labels.dtype and mha.labels.flags.c_contiguous
    np.testing.assert_allclose(mha.ijk_to_ras, nifti.ijk_to_ras, atol=1e-4)  # NIfTI keeps float32
    np.testing.assert_allclose(mha.ijk_to_ras, oblique_heart.ijk_to_ras, atol=1e-12)  # MetaImage keeps 17 digits
    assert mha.metadata["format"] == ".mha" and mha.present_labels() == list(range(1, 11))
    # ITK's own transform of voxel indices agrees with ours once LPS is turned into RAS
    corner = np.array(mha.shape) - 1
    for ijk in ([0, 0, 0], corner.tolist(), [3, corner[1] // 2, corner[2]]):
        lps = np.array(image.TransformIndexToPhysicalPoint([int(n) for n in ijk]))
        ras = mha.ijk_to_ras @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    shape, matrix = read_image_geometry(path)
    assert shape == mha.shape
    np.testing.assert_allclose(matrix, mha.ijk_to_ras, atol=1e-12)


def test_mhd_raw_pair_written_by_simpleitk(oblique_heart, tmp_path):
    path = tmp_path / "heart.mhd"
    sitk.WriteImage(sitk_image(oblique_heart), str(path), False)  # uncompressed: heart.mhd + heart.raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heart.mhd", "heart.raw"]
    assert find_label_maps(tmp_path) == [path]  # the data file is not a label map
    back = read_label_map(path)
    np.testing.assert_array_equal(back.labels, oblique_heart.labels)
    np.testing.assert_allclose(back.ijk_to_ras, oblique_heart.ijk_to_ras, atol=1e-12)
    assert read_image_geometry(path)[0] == oblique_heart.shape
    # a truncated data file is refused before ITK reads it, naming the header
    raw = tmp_path / "heart.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(LabelMapError, match="truncated") as info:
        read_label_map(path)
    assert str(info.value).startswith(str(path))
    raw.unlink()
    with pytest.raises(LabelMapError, match="heart.raw") as info:
        read_label_map(path)
    assert str(info.value).startswith(str(path)) and "missing" in str(info.value)


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_our_metaimage_writer_is_read_by_simpleitk_atomically(oblique_heart, tmp_path, suffix):
    path = write_label_map(oblique_heart, tmp_path / "out" / f"case{suffix}")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0), oblique_heart.labels)
    lps = np.array(image.TransformIndexToPhysicalPoint([5, 7, 9]))
    np.testing.assert_allclose(lps * [-1, -1, 1], (oblique_heart.ijk_to_ras @ [5, 7, 9, 1.0])[:3], atol=1e-9)
    back = read_label_map(path)
    np.testing.assert_array_equal(back.labels, oblique_heart.labels)
    np.testing.assert_allclose(back.ijk_to_ras, oblique_heart.ijk_to_ras, atol=1e-12)
    expected = ["case.mha"] if suffix == ".mha" else ["case.mhd", "case.zraw"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected  # no temporaries left
    assert b"ElementDataFile = " + (b"LOCAL" if suffix == ".mha" else b"case.zraw") in path.read_bytes()[:2000]
    # a failed write keeps the previous file
    before = sha256(path)
    with pytest.raises(LabelMapError, match="negative"):
        write_label_map(LabelMap(-np.ones((2, 2, 2), np.int16), np.eye(4)), path)
    assert sha256(path) == before


def test_corrupt_and_hostile_metaimages_raise_label_map_error_naming_the_file(oblique_heart, tmp_path):
    good = tmp_path / "good.mha"
    sitk.WriteImage(sitk_image(oblique_heart), str(good), False)
    data = good.read_bytes()
    header_end = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = data[:header_end]
    cases = {}

    def case(name, content, fragment):
        (tmp_path / name).write_bytes(content)
        cases[name] = fragment

    case("garbage.mha", b"\x00\x01not a metaimage at all" * 10, "cannot read MetaImage header")
    case("truncated.mha", data[: header_end + 5000], "truncated")
    huge = header.replace(b"DimSize = " + " ".join(map(str, oblique_heart.shape)).encode(), b"DimSize = 100000 100000 100000")
    case("huge.mha", huge + b"\0" * 100, "exceeds the limit")
    compressed = zlib.compress(data[header_end:])
    zheader = header.replace(b"CompressedData = False", b"CompressedData = True")
    if b"CompressedData" not in zheader:
        zheader = zheader.replace(b"ElementSpacing", b"CompressedData = True\nElementSpacing")
    case("bad_zlib.mha", zheader + compressed[:50] + b"\xff" * 200 + compressed[250:], "cannot read MetaImage")
    case("zlib_bomb.mha", zheader.replace(b"DimSize = " + " ".join(map(str, oblique_heart.shape)).encode(),
                                          b"DimSize = 2000 2000 200") + compressed[:100], "cannot hold them")
    rgb = sitk.Compose([sitk_image(oblique_heart)] * 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    cases["rgb.mha"] = "not a label map"
    ct = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32))
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    cases["ct.mha"] = "non-integer"
    sitk.WriteImage(sitk.Image([6, 7], sitk.sitkUInt8), str(tmp_path / "slice.mha"))
    cases["slice.mha"] = "3-D"
    hashes = {name: sha256(tmp_path / name) for name in cases}
    for name, fragment in cases.items():
        path = tmp_path / name
        with pytest.raises(LabelMapError) as info:
            read_label_map(path)
        assert str(info.value).startswith(str(path)), name
        assert fragment in str(info.value), f"{name}: {info.value}"
        assert "\n" not in str(info.value), f"{name}: one line, no ITK stack: {info.value}"
    with pytest.raises(LabelMapError, match="garbage.mha"):
        read_image_geometry(tmp_path / "garbage.mha")
    assert {name: sha256(tmp_path / name) for name in cases} == hashes  # inputs unchanged


def test_without_simpleitk_the_message_names_the_file_and_the_install(oblique_heart, tmp_path, monkeypatch):
    path = tmp_path / "heart.mha"
    sitk.WriteImage(sitk_image(oblique_heart), str(path))
    nifti = write_label_map(oblique_heart, tmp_path / "heart.nii.gz")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # what `import SimpleITK` does where it is absent
    for action in (lambda: read_label_map(path), lambda: read_image_geometry(path),
                   lambda: write_label_map(oblique_heart, tmp_path / "again.mha")):
        with pytest.raises(LabelMapError, match=r"pip install SimpleITK") as info:
            action()
        assert str(info.value).startswith(str(path) if "again" not in str(info.value) else str(tmp_path / "again.mha"))
    assert read_label_map(nifti).present_labels() == list(range(1, 11))  # the other formats need no SimpleITK
    assert not (tmp_path / "again.mha").exists()


# --- GLB ---------------------------------------------------------------------------------------


def test_glb_export_loads_back_in_ras_mm(tmp_path):
    import trimesh  # in the test extra: a missing trimesh fails this test

    from HeartCompletionLib.io.meshes import MESH_FORMATS, structure_meshes, write_structure_meshes

    assert "glb" in MESH_FORMATS
    lm = synthetic_label_map(seed=2, **{**OBLIQUE, "spacing_mm": (2.0, 2.4, 2.8)})
    paths = write_structure_meshes(lm, tmp_path, "case 01", fmt="glb", labels=[3, 6])
    assert sorted(p.name for p in paths) == ["case_01_Aorta.glb", "case_01_LV.glb"]
    meshes = structure_meshes(lm, labels=[3, 6])
    for path, label in zip(sorted(paths), (6, 3)):
        scene = trimesh.load(path, force="scene", process=False)
        assert scene.metadata["coordinate_space"] == "RAS" and scene.metadata["units"] == "mm"
        (mesh,) = scene.geometry.values()
        vertices, faces = meshes[label]
        np.testing.assert_allclose(scene.graph[scene.graph.nodes_geometry[0]][0], np.eye(4))  # no transform
        np.testing.assert_allclose(mesh.vertices, vertices, atol=1e-4)  # float32 of the same RAS mm
        np.testing.assert_array_equal(mesh.faces, faces)
        assert mesh.is_watertight and mesh.volume > 0  # closed, normals outwards
        # the vertices wrap the structure's voxel centres in RAS (not LPS, not voxel indices)
        idx = np.argwhere(lm.labels == label)
        centres = idx @ lm.ijk_to_ras[:3, :3].T + lm.ijk_to_ras[:3, 3]
        np.testing.assert_allclose(mesh.vertices.min(axis=0), centres.min(axis=0), atol=2.8)
        np.testing.assert_allclose(mesh.vertices.max(axis=0), centres.max(axis=0), atol=2.8)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporaries


def test_glb_without_trimesh_is_refused_before_any_work(tmp_path, monkeypatch):
    from HeartCompletionLib.io.meshes import check_mesh_format, write_structure_meshes

    monkeypatch.setitem(sys.modules, "trimesh", None)  # what `import trimesh` does where it is absent
    with pytest.raises(ImportError, match="pip install trimesh"):
        check_mesh_format("GLB")
    with pytest.raises(ImportError, match="pip install trimesh"):
        write_structure_meshes(synthetic_label_map(seed=1, spacing_mm=4.0), tmp_path, "c", fmt="glb")
    assert list(tmp_path.iterdir()) == []
    assert check_mesh_format("STL") == "stl"
    with pytest.raises(ValueError, match="unknown mesh format"):
        check_mesh_format("xyz")



def test_heart_complete_refuses_glb_without_trimesh_before_reading(tmp_path, monkeypatch, capsys):
    from HeartCompletionLib.inference.complete_cli import main
    from HeartCompletionLib.io.labelmap_files import write_label_map

    src = tmp_path / "case.nii.gz"
    write_label_map(synthetic_label_map(seed=1, spacing_mm=4.0), src)
    monkeypatch.setitem(sys.modules, "trimesh", None)
    code = main(["--checkpoint", "synthetic-demo", "--input", str(src), "--output", str(tmp_path / "out.nii.gz"),
                 "--meshes", str(tmp_path / "meshes"), "--mesh_format", "glb", "--quiet", "--structures", "LAA"])
    assert code == 2 and "pip install trimesh" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]  # nothing written
