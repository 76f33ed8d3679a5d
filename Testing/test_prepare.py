"""heart-prepare and heart-prepare --check on real files: synthetic hearts written as NIfTI/NRRD,
converted through the CLI and the library, checked against the label maps they came from."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from heart_training.data import dataset_check, prepare, prepare_cli
from heart_training.data.case_format import REQUIRED_KEYS, load_case, save_case
from scipy.spatial import cKDTree

from HeartCompletionLib.geometry.affine import ijk_to_ras_points, ras_to_ijk_points, rotation_matrix
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_heart, synthetic_label_map
from HeartCompletionLib.structures.table import StructureTable

SPACING = 2.0
SMALL = ["--num_surface", "6000", "--num_volume", "6000", "--num_near", "6000", "--min_surface_per_structure", "200"]
SMALL_OPTIONS = prepare.PrepareOptions(num_surface=6000, num_volume=6000, num_near=6000, min_surface_per_structure=200)
CHECK_SMALL = ["--min_surface", "1000", "--min_volume", "1000", "--min_near", "1000"]
TABLE = StructureTable.default()
REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_synthetic_cases(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        truncate = "LAA" if seed == 1 else None
        label_map = synthetic_label_map(seed=seed, spacing_mm=SPACING, truncate=truncate)
        suffix = {2: ".nrrd", 3: ".seg.nrrd"}.get(seed, ".nii.gz")
        paths.append(write_label_map(label_map, folder / f"case_{seed:03d}{suffix}"))
    return paths


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labelmaps")
    _write_synthetic_cases(folder, 4)
    return folder


@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory) -> Path:
    """The uninterrupted reference run (2 workers: the parallel path)."""
    out = tmp_path_factory.mktemp("prepared")
    assert prepare_cli.main(["--input_dir", str(synth_dir), "--output_dir", str(out), "--workers", "2", "--quiet", *SMALL]) == 0
    return out


def test_case_has_the_design_keys_dtypes_and_manifest(prepared, synth_dir):
    cases = sorted(prepared.glob("*.npz"))
    assert [c.stem for c in cases] == ["case_000", "case_001", "case_002", "case_003"]
    K = len(TABLE)
    for path in cases:
        case = load_case(path)
        for key, (dtype, _) in REQUIRED_KEYS.items():
            if key != "meta":
                assert case[key].dtype == np.dtype(dtype), key
        assert case["origin_mm"].shape == (3,)
        assert case["surface_points"].shape == (6000, 3) and case["surface_labels"].shape == (6000,)
        assert case["volume_sdf"].shape == (6000, K) and case["near_sdf"].shape == (6000, K)
        assert case["annotated"].all() and np.isfinite(case["volume_sdf"]).all()
        assert np.bincount(case["surface_labels"], minlength=K).min() >= 200  # the floor per structure
        # near points grouped by the structure they were drawn around, each within its offset of it
        # (+ the surface sampling error): the trainer's balanced queries rely on the grouping
        near = load_case(path, optional=("near_labels", "near_offset_mm"))
        assert np.all(np.diff(near["near_labels"]) >= 0) and set(near["near_labels"]) == set(range(K))
        own = np.abs(near["near_sdf"][np.arange(6000), near["near_labels"]])
        assert np.median(own - near["near_offset_mm"]) < 0.5 * SPACING
        meta = case["meta"]
        assert meta["table"] == TABLE.names and meta["spacing_mm"] == pytest.approx([SPACING] * 3)
        assert meta["point_counts"] == {"surface": 6000, "volume": 6000, "near": 6000}
        assert Path(meta["source"]).parent == synth_dir.resolve()
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["summary"] == {"cases": 4, "ok": 4, "failed": 0, "with_warnings": manifest["summary"]["with_warnings"]}
    by_case = {e["case"]: e for e in manifest["cases"]}
    assert "LAA" in by_case["case_001"]["truncated"] and "LAA" not in by_case["case_000"]["truncated"]
    assert load_case(prepared / "case_001.npz")["truncated"][TABLE.by_name("LAA").index]
    assert "case_001,ok" in (prepared / "manifest.csv").read_text()


def test_points_are_mm_at_the_label_maps_physical_place(prepared, synth_dir):
    """surface_points + origin_mm lie on the voxel boundary of their own structure (RAS mm)."""
    case = load_case(prepared / "case_002.npz", optional=("near_labels", "near_offset_mm"))  # .nrrd, LPS on disk
    label_map = read_label_map(synth_dir / "case_002.nrrd")
    surface = case["surface_points"] + case["origin_mm"]
    for k in range(len(TABLE)):
        # marching cubes at 0.5 puts samples between an inside and an outside voxel centre:
        # within a voxel of both (a shifted origin or a voxel-unit slip moves them by many mm)
        samples = surface[case["surface_labels"] == k]
        ijk = np.argwhere(label_map.labels == k + 1)
        lo, hi = np.maximum(ijk.min(axis=0) - 2, 0), ijk.max(axis=0) + 3
        crop = label_map.labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == k + 1
        centres = ijk_to_ras_points(np.argwhere(np.ones_like(crop)) + lo, label_map.ijk_to_ras)
        gap_in, _ = cKDTree(centres[crop.ravel()]).query(samples)
        gap_out, _ = cKDTree(centres[~crop.ravel()]).query(samples)
        assert gap_in.max() <= SPACING and gap_out.max() <= SPACING, TABLE[k].name
        assert gap_in.mean() < 0.7 * SPACING and gap_out.mean() < 0.7 * SPACING, TABLE[k].name
    own = np.abs(case["near_sdf"][np.arange(6000), case["near_labels"]])
    assert 0.3 < np.median(own) < 4.0  # mm: offsets of sigma 1 and 4 mm, not voxels or metres
    close = case["near_offset_mm"] < 8.0  # within the fine tier of the distance computation
    assert np.all(own[close] <= case["near_offset_mm"][close] + SPACING / 2 + 0.05)  # |d| <= |offset|


def test_sign_agrees_with_the_label_map_at_volume_and_near_points(prepared, synth_dir):
    case = load_case(prepared / "case_000.npz")
    label_map = read_label_map(synth_dir / "case_000.nii.gz")
    for points_key, sdf_key in (("volume_points", "volume_sdf"), ("near_points", "near_sdf")):
        ras = case[points_key] + case["origin_mm"]
        ijk = np.rint(ras_to_ijk_points(ras, label_map.ijk_to_ras)).astype(int)
        inside_grid = np.all((ijk >= 0) & (ijk < np.array(label_map.shape)), axis=1)
        labels = np.zeros(len(ijk), dtype=int)
        labels[inside_grid] = label_map.labels[tuple(ijk[inside_grid].T)]
        checked = 0
        for k in range(len(TABLE)):
            sdf = case[sdf_key][:, k]
            away = np.abs(sdf) > SPACING  # the sign right at the boundary depends on the iso-surface
            agree = (sdf[away] < 0) == (labels[away] == k + 1)
            assert agree.mean() >= 0.995, (points_key, TABLE[k].name)
            checked += away.sum()
        assert checked > 0.8 * 6000 * len(TABLE)
        if points_key == "volume_points":
            assert (case[sdf_key] > 0).all(axis=1).mean() > 0.3  # the padded box is mostly background
        else:
            assert (case[sdf_key] < 0).any(axis=1).mean() > 0.3  # near points straddle the surfaces


def test_check_passes_on_a_fresh_dataset(prepared, capsys):
    assert prepare_cli.main(["--check", str(prepared), "--quiet", *CHECK_SMALL]) == 0
    assert "4 of 4 cases pass" in capsys.readouterr().out
    # the default minimum counts (>= 100k surface samples, DESIGN.md) reject these small cases
    assert prepare_cli.main(["--check", str(prepared), "--quiet"]) == 1


def _rewrite(source: Path, target: Path, change) -> Path:
    case = load_case(source, optional=("near_labels", "near_offset_mm"))
    meta = case.pop("meta")
    change(case)
    if "table" in case:  # a change of the metadata
        meta["table"] = case.pop("table")
    return save_case(target, case, meta)


def test_check_catches_wrong_units_and_nan_mismatch(prepared, tmp_path, capsys):
    source = prepared / "case_000.npz"
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(source, bad / "good.npz")

    def divide(case):  # "normalised" distances next to mm points
        case["volume_sdf"] /= 100
        case["near_sdf"] /= 100

    def voxels(case):  # distances in voxels of the 2 mm grid
        case["volume_sdf"] /= SPACING
        case["near_sdf"] /= SPACING

    def unannotate(case):  # LV declared not annotated but its distances kept
        case["annotated"][TABLE.by_name("LV").index] = False

    def nan_in_annotated(case):
        case["near_sdf"][:10, TABLE.by_name("PA").index] = np.nan

    def points_in_metres(case):
        for key in ("surface_points", "volume_points", "near_points"):
            case[key] /= 1000

    def near_not_relative(case):  # near points stored in scanner RAS instead of relative to origin_mm
        case["near_points"] += case["origin_mm"] + np.array([0.0, 0.0, 30.0])

    def volume_not_relative(case):
        case["volume_points"] += case["origin_mm"] + np.array([0.0, 0.0, 30.0])

    def other_table(case):  # same K, another structure order: must not be mixed into one dataset
        case["table"] = TABLE.names[::-1]

    for name, change in [("divided", divide), ("voxels", voxels), ("unannotated", unannotate),
                         ("nan", nan_in_annotated), ("metres", points_in_metres), ("other_table", other_table),
                         ("near_frame", near_not_relative), ("volume_frame", volume_not_relative)]:
        _rewrite(source, bad / f"{name}.npz", change)
    (bad / "corrupt.npz").write_bytes(b"not a zip file")

    results = dataset_check.check_dataset(bad, dataset_check.CheckLimits(1000, 1000, 1000), progress=False)
    problems = {Path(p).stem: " | ".join(v) for p, v in results.items()}
    assert problems["good"] == ""
    assert "wrong units" in problems["divided"] and "different units" in problems["divided"]
    assert "different units" in problems["voxels"]
    assert "LV] is not annotated but holds" in problems["unannotated"]
    assert "PA] is annotated but holds 10 NaN" in problems["nan"]
    assert "not a heart in mm" in problems["metres"]
    assert "unreadable" in problems["corrupt"]
    assert "differs from the rest of the dataset" in problems["other_table"]
    assert "not drawn around the surface" in problems["near_frame"]
    assert "outside the box of the volume points" in problems["volume_frame"]
    assert prepare_cli.main(["--check", str(bad), "--quiet", *CHECK_SMALL]) == 1
    out = capsys.readouterr().out
    for name in ("divided", "voxels", "unannotated", "nan", "metres", "corrupt", "other_table", "near_frame", "volume_frame"):
        assert f"FAIL {bad / name}.npz" in out  # every offending case is named
    assert "FAIL " + str(bad / "good.npz") not in out


def _same_case(a: Path, b: Path) -> None:
    ca, cb = load_case(a, optional=("near_labels",)), load_case(b, optional=("near_labels",))
    for key in ca:
        if key == "meta":
            strip = lambda m: {k: v for k, v in m.items() if k != "timings"}  # noqa: E731
            assert strip(ca[key]) == strip(cb[key])
        else:
            assert np.array_equal(ca[key], cb[key], equal_nan=True), key


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_result(synth_dir, prepared, tmp_path):
    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "heart_training.data.prepare_cli", "--input_dir", str(synth_dir), "--output_dir", str(out),
               "--workers", "1", "--quiet", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = sorted(out.glob("*.npz"))
    assert 1 <= len(first) < 4, "the kill must land mid-run"
    kept_mtime = {p.name: p.stat().st_mtime_ns for p in first}
    (out / "case_003.npz.leftover.tmp").write_bytes(b"half a file")  # as a kill inside save_case leaves

    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert not list(out.rglob("*.tmp"))
    for name, mtime in kept_mtime.items():
        assert (out / name).stat().st_mtime_ns == mtime  # kept, not prepared again
    manifest = json.loads((out / "manifest.json").read_text())
    assert {e["case"] for e in manifest["cases"] if e.get("resumed")} == {p.stem for p in first}
    for path in sorted(prepared.glob("*.npz")):
        _same_case(path, out / path.name)
    # other options are not mixed into a resumed dataset: that case is prepared again
    changed = [*SMALL[:-1], "150"]
    assert prepare_cli.main(["--input_dir", str(synth_dir), "--output_dir", str(out), "--quiet", *changed]) == 0
    assert load_case(out / "case_000.npz")["meta"]["options"]["min_surface_per_structure"] == 150


GEOMETRIES = {
    "iso_ras": dict(spacing_mm=1.5),
    "lps_flipped": dict(spacing_mm=1.5, flip_axes=(0, 1)),
    "aniso": dict(spacing_mm=(0.6, 0.6, 1.5)),
    "oblique": dict(spacing_mm=1.5, direction=rotation_matrix([1.0, 1.0, 0.3], 0.5)),
}


@pytest.mark.slow
def test_geometry_invariance(tmp_path):
    """One heart in four geometries: the same physical surface samples and origin."""
    heart = synthetic_heart(seed=5)
    # dense enough that two independent samplings of one surface are < 1 mm apart (Chamfer)
    options = prepare.PrepareOptions(num_surface=40_000, num_volume=2000, num_near=2000, min_surface_per_structure=800)
    cases = {}
    for name, geometry in GEOMETRIES.items():
        label_map = synthetic_label_map(heart=heart, **geometry)
        path = write_label_map(label_map, tmp_path / f"{name}{'.nrrd' if name == 'lps_flipped' else '.nii.gz'}")
        prepare.prepare_case(path, tmp_path / f"{name}.npz", options)
        cases[name] = load_case(tmp_path / f"{name}.npz")
    reference = cases["iso_ras"]
    for name, case in cases.items():
        # the box comes from the surface samples, so origins agree up to the voxelisation
        assert np.abs(case["origin_mm"] - reference["origin_mm"]).max() < 1.0, name
        for k in range(len(TABLE)):
            in_a, in_b = reference["surface_labels"] == k, case["surface_labels"] == k
            a = reference["surface_points"][in_a] + reference["origin_mm"]
            b = case["surface_points"][in_b] + case["origin_mm"]
            (gap_ab, near_b), (gap_ba, near_a) = cKDTree(b).query(a), cKDTree(a).query(b)
            chamfer = 0.5 * (gap_ab.mean() + gap_ba.mean())
            assert chamfer < 1.0, (name, TABLE[k].name, chamfer)
            # point-to-plane: free of the sampling density, so a half-voxel shift would show
            to_plane = 0.5 * (np.abs(np.sum((a - b[near_b]) * case["surface_normals"][in_b][near_b], axis=1)).mean()
                              + np.abs(np.sum((b - a[near_a]) * reference["surface_normals"][in_a][near_a], axis=1)).mean())
            assert to_plane < 0.4, (name, TABLE[k].name, to_plane)


def _case_folder(root: Path) -> dict[str, Path]:
    """Good and bad label maps side by side (the bad ones named by their problem)."""
    import nibabel as nib

    root.mkdir()
    good = synthetic_label_map(seed=7, spacing_mm=SPACING)
    files = {"good": write_label_map(good, root / "good.nii.gz")}
    affine = good.ijk_to_ras
    floats = good.labels.astype(np.float32) + np.float32(0.3)
    nib.save(nib.Nifti1Image(floats, affine), root / "float_image.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([good.labels] * 2, axis=-1), affine), root / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), affine), root / "empty.nii.gz")
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(300))
    odd = good.labels.copy()
    odd[:2, :2, :2] = 42  # a value outside the table: warned about and ignored
    odd[odd == TABLE.by_name("LAA").label] = 0
    odd[40, 40, 2] = TABLE.by_name("LAA").label  # a one-voxel LAA: kept, with a warning
    files["odd"] = write_label_map(LabelMap(odd, affine), root / "sub" / "odd.nii.gz")
    (root / "sub" / "partial.json").write_text(json.dumps({"annotated": ["LV", "Myocardium", "Aorta"]}))
    files["partial"] = write_label_map(good, root / "sub" / "partial.nii.gz")  # all ten labelled, three claimed
    files["unwritable"] = write_label_map(good, root / "unwritable.nii.gz")
    for name in ("float_image", "four_d", "empty", "corrupt"):
        files[name] = root / f"{name}.nii.gz"
    return files


def test_bad_inputs_fail_alone_and_leave_no_half_files(tmp_path, capsys):
    files = _case_folder(tmp_path / "in")
    before = {p: _sha(p) for p in (tmp_path / "in").rglob("*") if p.is_file()}
    out = tmp_path / "out"
    (out / "unwritable.npz").mkdir(parents=True)  # the output path cannot become a file
    assert prepare_cli.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--workers", "1", "--quiet", *SMALL]) == 1
    err = capsys.readouterr().err
    manifest = {e["case"]: e for e in json.loads((out / "manifest.json").read_text())["cases"]}
    assert {k for k, e in manifest.items() if e["status"] == "ok"} == {"good", "sub/odd", "sub/partial"}
    expectations = {
        "float_image": "non-integer values", "four_d": "4-D", "empty": "no voxel of any structure",
        "corrupt": "cannot read", "unwritable": "cannot write",
    }
    for case, phrase in expectations.items():
        reason = manifest[case]["reason"]
        assert phrase in reason and (str(files[case]) in reason or str(out / f"{case}.npz") in reason), reason
        assert f"FAILED {case}:" in err
        assert not (out / f"{case}.npz").is_file()
    warnings_odd = " | ".join(manifest["sub/odd"]["warnings"])
    assert "[42]" in warnings_odd and "LAA has only 1 voxels" in warnings_odd
    partial = load_case(out / "sub" / "partial.npz")
    assert [TABLE[k].name for k in np.flatnonzero(partial["annotated"])] == ["Myocardium", "LV", "Aorta"]
    assert np.isnan(partial["near_sdf"][:, ~partial["annotated"]]).all()
    assert sum("voxels but is not annotated" in w for w in manifest["sub/partial"]["warnings"]) == 7
    assert not list(out.rglob("*.tmp"))
    assert before == {p: _sha(p) for p in (tmp_path / "in").rglob("*") if p.is_file()}  # input untouched
    assert prepare_cli.main(["--check", str(out), "--quiet", *CHECK_SMALL, "--min_samples_per_structure", "1"]) == 0


def test_disk_full_mid_case_leaves_nothing_half_written(tmp_path):
    """A file-size limit makes the .npz write fail part-way (EFBIG, as ENOSPC would)."""
    source = tmp_path / "in"
    _write_synthetic_cases(source, 1)
    out = tmp_path / "out"
    limit = 60_000  # bytes: manifests fit, a case does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "heart_training.data.prepare_cli", "--input_dir", str(source), "--output_dir", str(out),
         "--quiet", *SMALL], env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=small_files,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot write the case" in result.stderr and str(out / "case_000.npz") in result.stderr
    assert not list(out.rglob("*.npz")) and not list(out.rglob("*.tmp"))


def test_annotated_but_absent_and_cli_errors(tmp_path, capsys):
    label_map = synthetic_label_map(seed=9, spacing_mm=SPACING)
    labels = label_map.labels.copy()
    labels[labels == TABLE.by_name("Coronary").label] = 0
    path = write_label_map(LabelMap(labels, label_map.ijk_to_ras), tmp_path / "no_coronary.nii.gz")
    entry = prepare.prepare_case(path, tmp_path / "out" / "c.npz", SMALL_OPTIONS)
    assert "Coronary" not in entry["annotated"] and any("Coronary is annotated but has no voxels" in w for w in entry["warnings"])
    case = load_case(tmp_path / "out" / "c.npz")
    assert not case["annotated"][TABLE.by_name("Coronary").index]
    assert np.isnan(case["volume_sdf"][:, TABLE.by_name("Coronary").index]).all()
    # --structures narrows what is processed; another numbering via --label_map
    entry = prepare.prepare_case(path, tmp_path / "out" / "two.npz", prepare.PrepareOptions(
        num_surface=2000, num_volume=1000, num_near=1000, structures=("left ventricle", "Aorta")))
    assert entry["annotated"] == ["LV", "Aorta"] and entry["warnings"] == []
    mmwhs_values = np.array([0, 205, 420, 500, 550, 600, 820, 850, 0, 0, 0], dtype=np.int16)
    mmwhs = tmp_path / "mmwhs"
    write_label_map(LabelMap(mmwhs_values[label_map.labels], label_map.ijk_to_ras), mmwhs / "heart.nii.gz")
    assert prepare_cli.main(["--input_dir", str(mmwhs), "--output_dir", str(tmp_path / "mm"), "--quiet", "--label_map", "mmwhs",
                         "--annotated", "Myocardium", "LA", "LV", "RA", "RV", "Aorta", "PA", *SMALL]) == 0
    converted = load_case(tmp_path / "mm" / "heart.npz")
    assert converted["annotated"].tolist() == [True] * 7 + [False] * 3 and not converted["meta"]["warnings"]
    assert np.array_equal(np.bincount(converted["surface_labels"], minlength=10) > 0, converted["annotated"])
    # unknown structure names and missing folders are refused up front, naming the problem
    assert prepare_cli.main(["--input_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--annotated", "Spleen"]) == 2
    assert "Spleen" in capsys.readouterr().err
    assert prepare_cli.main(["--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_cli.main(["--help"])
    assert "--num_surface" in capsys.readouterr().out


@pytest.mark.slow
def test_real_cases_convert_and_pass_check(shared_real_cases, tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for path in shared_real_cases[:3]:
        os.symlink(path, folder / path.name)
    out = tmp_path / "out"
    assert prepare_cli.main(["--input_dir", str(folder), "--output_dir", str(out), "--quiet", *SMALL]) == 0
    assert prepare_cli.main(["--check", str(out), "--quiet", *CHECK_SMALL]) == 0
