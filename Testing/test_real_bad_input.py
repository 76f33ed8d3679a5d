"""Messy real files (issue 11, "Bad input"): each works correctly or stops with a message naming
the file and the problem. One test per case the real files of ``../shared/data/real`` exercise
(skipped with the reason when the folder is absent):

| case | real file | behaviour |
|---|---|---|
| sform code 0, qform set | platipy ``04D1_heart_envelope`` | the qform is used: same grid as ``04D1_label`` (codes 1/1) |
| qform code 0, sform set (code 2) | TotalSegmentator ``chestct_heart_envelope`` | the sform is used, no warning |
| both codes 0 | an ACDC stack with its codes zeroed | read with voxel sizes, a warning naming the file, kept in the manifest |
| float label image | platipy ``04D1_heart_envelope`` (float32 0/1) | read as integer labels; non-integer floats refused naming the file |
| 10 mm / 2.5 mm slices | ACDC stacks; DeepCAC CT masks | ACDC prepares and passes ``--check``; DeepCAC (no structure of the table in its convention) stops naming the file |
| single-structure maps | an LA of the 2018 challenge; the platipy LAD | prepare with that one structure annotated, ``--check`` passes |
| cut at both ends | ACDC stacks (myocardium and LV on the first and last slice) | ``truncated`` flags them; training drops their targets near both cuts |
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from heart_training.data.prepare_cli import main as prepare_main

from HeartCompletionLib.io.labelmap_files import LabelMapError, read_label_map

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
QUIET = ["--workers", "1", "--quiet"]
SMALL_CHECK = ["--quiet"]  # --check with its default limits: the cases are prepared with the default counts
FEW = ["--num_surface", "20000", "--num_volume", "5000", "--num_near", "5000"]  # where no --check follows


def _real(*parts: str) -> Path:
    path = REAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"no real file {path}: {REAL} is absent or incomplete (see ../shared/data/real/README.md)")
    return path


def _prepare_one(src: Path, tmp_path: Path, *args: str) -> tuple[int, dict]:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    shutil.copy(src, raw / src.name)
    out = tmp_path / "out"
    code = prepare_main(["--input_dir", str(raw), "--output_dir", str(out), *QUIET, *args])
    (entry,) = json.loads((out / "manifest.json").read_text())["cases"]
    return code, entry


def test_sform_code_zero_uses_the_qform():
    envelope_path = _real("platipy_rtct", "04D1_heart_envelope.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        envelope = read_label_map(envelope_path)
    assert not [w for w in caught if "sform" in str(w.message)]
    label = read_label_map(_real("platipy_rtct", "04D1_label.nii.gz"))  # sform and qform code 1
    assert envelope.same_geometry(label)
    # PROVENANCE.md: LPS origin (-123.05, -107.49, -598.0) -> RAS (123.05, 107.49, -598.0)
    assert np.allclose(envelope.ijk_to_ras[:3, 3], [123.047, 107.492, -598.0], atol=0.01)
    assert np.allclose(np.diag(envelope.ijk_to_ras)[:3], [-0.9765625, -0.9765625, 3.0])


def test_qform_code_zero_uses_the_sform():
    import nibabel as nib

    path = _real("totalseg_chestct", "chestct_heart_envelope.nii.gz")
    header = nib.load(str(path)).header
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) == 2  # what this test is about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        envelope = read_label_map(path)
    assert not [w for w in caught if "sform" in str(w.message)]
    assert np.allclose(envelope.ijk_to_ras, header.get_sform())


def test_both_codes_zero_read_with_voxel_sizes_and_a_warning_naming_the_file(tmp_path):
    import nibabel as nib

    src = _real("acdc_cmr", "patient001_ED_label.nii.gz")
    img = nib.load(str(src))
    zeroed = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header.copy())
    zeroed.set_sform(None, code=0)
    zeroed.set_qform(None, code=0)
    path = tmp_path / "zeroed" / "patient001_ED_label.nii.gz"
    path.parent.mkdir()
    nib.save(zeroed, str(path))
    with pytest.warns(UserWarning, match="neither sform nor qform is set") as caught:
        label_map = read_label_map(path, convention=_real("acdc_cmr", "labels.json"))
    assert str(path) in str(caught[0].message)
    assert np.allclose(label_map.spacing_mm, [1.5625, 1.5625, 10.0])  # voxel sizes kept
    code, entry = _prepare_one(path, tmp_path, "--label_map", str(_real("acdc_cmr", "labels.json")), *FEW)
    assert code == 0 and entry["status"] == "ok"
    assert any("neither sform nor qform" in w and str(path.name) in w for w in entry["warnings"])


def test_float_label_image(tmp_path):
    import nibabel as nib

    path = _real("platipy_rtct", "04D1_heart_envelope.nii.gz")
    assert np.dtype(nib.load(str(path)).get_data_dtype()) == np.float32
    envelope = read_label_map(path)
    assert envelope.labels.dtype.kind == "i" and envelope.present_labels() == [1]
    assert int((envelope.labels == 1).sum()) == 274821  # PROVENANCE.md's voxel count
    assert envelope.metadata["original_dtype"] == "float32"
    # a float image that is not integer-valued (an intensity or resampled-with-interpolation image)
    img = nib.load(str(path))
    blurred = np.asarray(img.dataobj, dtype=np.float32) * 0.7
    bad = tmp_path / "04D1_resampled.nii.gz"
    nib.save(nib.Nifti1Image(blurred, img.affine, img.header.copy()), str(bad))
    with pytest.raises(LabelMapError, match="float image .* non-integer values") as info:
        read_label_map(bad)
    assert str(info.value).startswith(str(bad))


@pytest.mark.slow
def test_ten_mm_slices_prepare_and_pass_check(tmp_path):
    src = _real("acdc_cmr", "patient001_ED_label.nii.gz")
    code, entry = _prepare_one(src, tmp_path, "--label_map", str(_real("acdc_cmr", "labels.json")))
    assert code == 0 and entry["annotated"] == ["Myocardium", "LV", "RV"]
    assert prepare_main(["--check", str(tmp_path / "out"), *SMALL_CHECK]) == 0


@pytest.mark.slow
def test_two_and_a_half_mm_ct_without_table_structures_stops_naming_the_file(tmp_path, capsys):
    src = _real("deepcac_ct", "0187_msk.nrrd")
    code, entry = _prepare_one(src, tmp_path, "--label_map", str(_real("deepcac_ct", "labels.json")))
    assert code == 1 and entry["status"] == "failed"
    assert entry["reason"].startswith(str(tmp_path / "raw" / src.name)) and "no voxel of any structure" in entry["reason"]
    assert "0187_msk" in capsys.readouterr().err


@pytest.mark.parametrize("folder, name, convention, structure", [
    ("la2018_lgemri", "06SR5RBREL16DQ6M8LWS_LA_label.nii.gz", True, "LA"),
    ("platipy_rtct", "04D1_label.nii.gz", False, "Coronary"),  # value 9 = the table's Coronary
])
def test_single_structure_maps(tmp_path, folder, name, convention, structure):
    src = _real(folder, name)
    args = ["--label_map", str(_real(folder, "labels.json"))] if convention else []
    code, entry = _prepare_one(src, tmp_path, *args)
    assert code == 0 and entry["annotated"] == [structure]
    if convention:  # the convention names only that structure: nothing else is claimed
        assert not [w for w in entry["warnings"] if "no voxels" in w]
    assert prepare_main(["--check", str(tmp_path / "out"), *SMALL_CHECK]) == 0


def test_structures_cut_at_both_ends_of_a_stack(tmp_path):
    from heart_training.config import DataConfig, MaskConfig
    from heart_training.data.dataset import CaseRef, HeartCaseDataset, distance_to_image_border_mm

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.structures.table import StructureTable

    src = _real("acdc_cmr", "patient002_ED_label.nii.gz")
    data = read_label_map(src, convention=_real("acdc_cmr", "labels.json"))
    first, last = set(np.unique(data.labels[:, :, 0])), set(np.unique(data.labels[:, :, -1]))
    assert {1, 3} <= first & last  # Myocardium and LV on the first and the last slice
    code, entry = _prepare_one(src, tmp_path, "--label_map", str(_real("acdc_cmr", "labels.json")), *FEW)
    assert code == 0 and set(entry["truncated"]) >= {"Myocardium", "LV"}

    table = StructureTable.default()
    ref = CaseRef("acdc", tmp_path / "out" / "patient002_ED_label.npz", "patient002_ED_label")
    mask_cfg = MaskConfig(kind="annotated", truncated="near_cut", truncation_margin_mm=3.0)
    ds = HeartCaseDataset([ref], table, Normalization(100.0), DataConfig(num_volume_queries=4000,
                          num_near_queries=4000, num_surface_queries=0), mask_cfg, None)
    case = ds.load(0)
    sample = ds[(0, 1)]
    queries_mm = sample["queries"].numpy().astype(np.float64) * 100.0 + sample["centre_mm"].numpy()
    border = distance_to_image_border_mm(queries_mm, case["meta"], case["origin_mm"])
    # z of each query in the stack (voxel units): beyond the first or the last slice on either end
    affine = np.asarray(case["meta"]["ijk_to_ras"])
    k = np.linalg.solve(affine[:3, :3], (queries_mm + case["origin_mm"] - affine[:3, 3]).T).T[:, 2]
    below, above = k < -0.5, k > data.shape[2] - 0.5
    assert below.sum() > 20 and above.sum() > 20  # queries reach past both ends
    valid = sample["target_mask"].numpy()
    for name in ("Myocardium", "LV"):
        s = table.by_name(name).index
        assert valid[:, s].any()
        assert not valid[below, s].any() and not valid[above, s].any()  # no target past either cut
        assert np.all(border[valid[:, s]] > 3.0)  # kept targets are farther than the margin from the border
