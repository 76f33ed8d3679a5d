"""A label convention defines what a dataset annotates (issue 11, item 1).

With ``heart-prepare --label_map CONV`` the annotated structures default to those the convention
names (a sidecar and ``--annotated`` still win); the same rule decides in ``heart-eval`` which
structures of a case are hidden and scored. Real ACDC files when ``../shared/data/real`` exists,
synthetic files always.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from heart_training.data.prepare_cli import main as prepare_main

from HeartCompletionLib.model.registry import BUNDLED_MODELS_DIR

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
SMALL = ["--num_surface", "1500", "--num_volume", "800", "--num_near", "800", "--min_surface_per_structure", "100",
         "--workers", "1", "--quiet"]
ACDC_CONVENTION = {"1": "RV", "2": "Myocardium", "3": "LV"}
NO_VOXELS = "annotated but has no voxels"


def _manifest(folder: Path) -> dict:
    return {Path(e["source"]).name: e for e in json.loads((folder / "manifest.json").read_text())["cases"]}


def _write_acdc_like(path: Path, with_rv: bool = True) -> None:
    """A short-axis-like stack in ACDC numbering: 1 RV, 2 myocardium, 3 LV cavity (10 mm slices)."""
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.labelmap_files import write_label_map

    i, j = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    r = np.hypot(i - 24, j - 22)
    plane = np.zeros((48, 48), dtype=np.int16)
    plane[r < 12] = 2
    plane[r < 8] = 3
    if with_rv:
        plane[(np.hypot(i - 24, j - 38) < 8) & (r >= 12)] = 1
    labels = np.zeros((48, 48, 8), dtype=np.int16)
    labels[:, :, 1:7] = plane[:, :, None]
    write_label_map(LabelMap(labels, np.diag([1.5, 1.5, 10.0, 1.0])), path)


def test_convention_names_the_annotated_structures_synthetic(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_acdc_like(raw / "p1_ED.nii.gz")
    _write_acdc_like(raw / "p2_ED.nii.gz", with_rv=False)  # RV named by the convention but absent here
    (tmp_path / "acdc.json").write_text(json.dumps(ACDC_CONVENTION))
    out = tmp_path / "out"
    assert prepare_main(["--input_dir", str(raw), "--output_dir", str(out), "--label_map",
                         str(tmp_path / "acdc.json"), *SMALL]) == 0
    cases = _manifest(out)
    assert cases["p1_ED.nii.gz"]["annotated"] == ["Myocardium", "LV", "RV"]
    assert not [w for w in cases["p1_ED.nii.gz"]["warnings"] if NO_VOXELS in w]
    # a structure the convention names but the file lacks is warned about (and stored as not annotated)
    assert cases["p2_ED.nii.gz"]["annotated"] == ["Myocardium", "LV"]
    warned = [w for w in cases["p2_ED.nii.gz"]["warnings"] if NO_VOXELS in w]
    assert len(warned) == 1 and "RV" in warned[0] and "p2_ED.nii.gz" in warned[0]
    # the arrays agree with the manifest: NaN distances for everything not annotated
    from heart_training.data.case_format import load_case

    case = load_case(out / "p1_ED.npz", keys=["annotated", "near_sdf"])
    assert case["annotated"].tolist() == [True, False, True, False, True] + [False] * 5
    assert np.isnan(case["near_sdf"][:, ~case["annotated"]]).all()
    assert np.isfinite(case["near_sdf"][:, case["annotated"]]).all()


def test_sidecar_and_annotated_option_still_override_the_convention(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_acdc_like(raw / "a.nii.gz")
    _write_acdc_like(raw / "b.nii.gz")
    (raw / "a.json").write_text(json.dumps({"annotated": ["LV"]}))
    out = tmp_path / "out"
    conv = tmp_path / "acdc.json"
    conv.write_text(json.dumps(ACDC_CONVENTION))
    assert prepare_main(["--input_dir", str(raw), "--output_dir", str(out), "--label_map", str(conv),
                         "--annotated", "LV", "RV", *SMALL]) == 0
    cases = _manifest(out)
    assert cases["a.nii.gz"]["annotated"] == ["LV"]  # sidecar wins
    assert cases["b.nii.gz"]["annotated"] == ["LV", "RV"]  # then --annotated
    assert any("Myocardium" in w and "not annotated" in w for w in cases["b.nii.gz"]["warnings"])


def test_without_convention_every_structure_is_annotated_as_before(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_acdc_like(raw / "c.nii.gz")
    out = tmp_path / "out"
    assert prepare_main(["--input_dir", str(raw), "--output_dir", str(out), *SMALL]) == 0
    entry = _manifest(out)["c.nii.gz"]
    assert entry["annotated"] == ["Myocardium", "LA", "LV"]  # values 1, 2, 3 read as the table's own
    # the seven structures the table has but the file lacks are each warned about (the old rule)
    assert sum(NO_VOXELS in w for w in entry["warnings"]) == 7


def test_real_acdc_prepares_with_its_three_structures_only(tmp_path):
    folder = REAL / "acdc_cmr"
    if not folder.is_dir():
        pytest.skip(f"no real ACDC label maps: {folder} is absent (see ../shared/data/real/README.md)")
    raw = tmp_path / "acdc"
    raw.mkdir()
    files = sorted(folder.glob("*.nii.gz"))[:4]  # ED + ES of two patients
    for path in files:
        shutil.copy(path, raw / path.name)
    out = tmp_path / "prepared"
    assert prepare_main(["--input_dir", str(raw), "--output_dir", str(out), "--label_map",
                         str(folder / "labels.json"), *SMALL]) == 0
    cases = _manifest(out)
    assert sorted(cases) == sorted(p.name for p in files)
    for name, entry in cases.items():
        assert entry["status"] == "ok", entry
        assert entry["annotated"] == ["Myocardium", "LV", "RV"], name
        assert not [w for w in entry["warnings"] if NO_VOXELS in w], entry["warnings"]
    assert prepare_main(["--check", str(out), "--quiet", "--min_surface", "1000", "--min_volume", "500",
                         "--min_near", "500", "--min_samples_per_structure", "50"]) == 0


@pytest.mark.slow
def test_heart_eval_hides_and_scores_only_what_the_convention_names(tmp_path):
    """The rule in heart-eval, with the bundled model on a synthetic ACDC-like stack: only RV,
    Myocardium and LV are hidden/scored; a sidecar narrows it further."""
    import csv

    from heart_training.evaluation.evaluate import main as eval_main

    model = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    data = tmp_path / "data"
    data.mkdir()
    _write_acdc_like(data / "p1_ED.nii.gz")
    conv = tmp_path / "acdc.json"
    conv.write_text(json.dumps(ACDC_CONVENTION))
    out = tmp_path / "eval"
    args = ["--checkpoint", str(model), "--data_dir", str(data), "--convention", str(conv), "--no_baseline",
            "--scenarios", "missing_*", "full", "--device", "cpu", "--figure_cases", "0", "--quiet"]
    assert eval_main([*args, "--output_dir", str(out)]) == 0
    with open(out / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    scored = {(r["scenario"], r["structure"]) for r in rows}
    assert {s for s, _ in scored} == {"missing_Myocardium", "missing_LV", "missing_RV", "full"}
    assert {n for _, n in scored} == {"Myocardium", "LV", "RV"}
    for row in rows:  # no structure outside the convention is ever given or hidden
        assert set(row["inputs"].split(";")) <= {"Myocardium", "LV", "RV"}

    (data / "p1_ED.json").write_text(json.dumps({"annotated": ["Myocardium", "LV"]}))
    out2 = tmp_path / "eval2"
    assert eval_main([*args, "--output_dir", str(out2)]) == 0
    with open(out2 / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["scenario"] for r in rows} == {"missing_Myocardium", "missing_LV", "full"}
    assert {r["structure"] for r in rows} == {"Myocardium", "LV"}


@pytest.mark.slow
def test_heart_eval_reads_a_split_folder_with_the_convention_it_was_prepared_with(tmp_path, capsys):
    """A split folder prepared with --label_map is scored without repeating it (the convention is
    recorded in each prepared case): ACDC-like values 1/2/3 are read as RV/Myocardium/LV, for the
    scored cases and for the baseline's training cases alike."""
    import csv

    from heart_training.data.split import main as split_main
    from heart_training.evaluation.evaluate import main as eval_main

    raw = tmp_path / "raw"
    raw.mkdir()
    for patient in ("p1", "p2", "p3"):
        _write_acdc_like(raw / f"{patient}_ED.nii.gz")
    conv = tmp_path / "acdc.json"
    conv.write_text(json.dumps(ACDC_CONVENTION))
    data = tmp_path / "prepared"
    assert prepare_main(["--input_dir", str(raw), "--output_dir", str(data), "--label_map", str(conv), *SMALL]) == 0
    assert split_main(["--data_dir", str(data), "--val_fraction", "0.3", "--test_fraction", "0.3"]) == 0
    model = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    capsys.readouterr()
    out = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(model), "--data_dir", str(data), "--split", "test", "--scenarios",
                      "missing_LV", "--device", "cpu", "--figure_cases", "0", "--quiet", "--output_dir", str(out)]) == 0
    assert f"the convention heart-prepare used: {conv.resolve()}" in capsys.readouterr().err
    with open(out / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["method"], r["structure"]) for r in rows} == {("model", "LV"), ("baseline", "LV")}
    baseline = next(r for r in rows if r["method"] == "baseline")
    assert float(baseline["dice"]) > 0.9  # identical stacks: the nearest training patient's LV fits
    assert set(baseline["inputs"].split(";")) == {"Myocardium", "RV"}
    # the split CSVs without their prepared files (e.g. copied from a cluster): the convention is
    # unknown, and heart-eval says so instead of silently reading ACDC's 1/2/3 as Myocardium/LA/LV
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.csv", "val.csv", "test.csv"):
        (bare / name).write_bytes((data / name).read_bytes())
    capsys.readouterr()
    eval_main(["--checkpoint", str(model), "--data_dir", str(bare), "--split", "test", "--scenarios", "missing_LV",
               "--device", "cpu", "--figure_cases", "0", "--quiet", "--no_baseline", "--output_dir",
               str(tmp_path / "eval_bare")])
    err = capsys.readouterr().err
    assert "prepared case file(s) of the split cannot be read" in err and "pass --convention" in err
    assert str(bare) in err and "heart-prepare used" not in err
