"""``heart-eval`` end to end: the tiny checkpoint trained in this session, real NIfTI label maps,
the split CSVs of the prepared dataset, the nearest-case baseline and every output file."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from heart_training.evaluation.evaluate import EvaluationError, cases_from_csv, find_cases, main
from heart_training.evaluation.report import summarize_rows, write_outputs

from HeartCompletionLib.structures.table import StructureTable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def local_references(html_text: str) -> list[str]:
    """Every src/href of the page that is not a data: URI or an in-page anchor."""
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html_text)
    return [r for r in refs if not r.startswith(("data:", "#"))]


@pytest.fixture(scope="module")
def eval_run(tiny_checkpoint, prepared_synthetic_dataset, tmp_path_factory):
    """One heart-eval run on the prepared dataset's val.csv (both synthetic hearts), baseline from train.csv."""
    label_maps = prepared_synthetic_dataset / "label_maps"
    if not label_maps.is_dir():
        pytest.skip("the prepared dataset fixture fell back to analytic cases (no label maps to score)")
    out = tmp_path_factory.mktemp("eval") / "out"
    rc = main(["--checkpoint", str(tiny_checkpoint), "--data_dir", str(prepared_synthetic_dataset), "--split", "val",
               "--scenarios", "subset_A", "missing_LAA", "--output_dir", str(out), "--figure_cases", "1",
               "--figure_scenarios", "subset_A", "--device", "cpu", "--quiet"])
    assert rc == 0
    return out


def test_heart_eval_writes_every_output(eval_run):
    out = eval_run
    for name in ("metrics.csv", "summary.json", "report.html", "plots/box_subset_A.png", "plots/box_missing_LAA.png"):
        assert (out / name).is_file(), name
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 2 and figures[0].name.endswith("_subset_A.png")
    assert figures[1].name == figures[0].name.replace(".png", "_3d.png")  # the 3-D surface snapshot
    for png in [*figures, *(out / "plots").glob("*.png")]:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"


def test_metrics_csv_has_model_and_baseline(eval_run):
    rows = read_rows(eval_run / "metrics.csv")
    table = StructureTable.default()
    subset_b = {"Aorta", "PA", "LAA", "Coronary", "PV"}
    for method in ("model", "baseline"):
        for case in {r["case"] for r in rows}:
            of = [r for r in rows if r["method"] == method and r["case"] == case]
            assert {r["structure"] for r in of if r["scenario"] == "subset_A"} == subset_b
            assert [r["structure"] for r in of if r["scenario"] == "missing_LAA"] == ["LAA"]
    assert len({r["case"] for r in rows}) == 2
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        assert table.by_name(r["structure"]).label == int(r["label"])
        hd95, assd = float(r["hd95_mm"]), float(r["assd_mm"])
        assert math.isnan(hd95) == math.isnan(assd)
        assert math.isnan(hd95) or (hd95 >= 0.0 and assd >= 0.0)
        assert float(r["ref_volume_ml"]) > 0
    baseline = [r for r in rows if r["method"] == "baseline"]
    # both hearts are in train.csv too: the evaluated case itself must never be pasted back
    assert all(r["baseline_case"] and r["baseline_case"] != r["case"] for r in baseline)
    assert np.mean([float(r["dice"]) for r in baseline]) < 0.999


def test_summary_json_puts_model_and_baseline_side_by_side(eval_run):
    summary = json.loads((eval_run / "summary.json").read_text())
    assert set(summary["scenarios"]) == {"subset_A", "missing_LAA"}
    laa = summary["scenarios"]["missing_LAA"]["structures"]["LAA"]
    for method in ("model", "baseline"):
        dice = laa[method]["dice"]
        assert dice["n"] == 2 and {"mean", "median", "q1", "q3", "iqr"} <= set(dice)
        assert dice["q1"] <= dice["median"] <= dice["q3"]
    assert summary["meta"]["num_cases"] == 2 and summary["meta"]["num_training_cases"] == 2
    csv_dice = [float(r["dice"]) for r in read_rows(eval_run / "metrics.csv")
                if r["scenario"] == "missing_LAA" and r["method"] == "model"]
    assert laa["model"]["dice"]["mean"] == pytest.approx(np.mean(csv_dice), abs=1e-5)


def test_html_report_references_only_existing_files(eval_run):
    text = (eval_run / "report.html").read_text(encoding="utf-8")
    refs = local_references(text)
    assert "metrics.csv" in refs and "summary.json" in refs
    for ref in refs:
        assert (eval_run / ref).is_file(), f"report.html links to a missing file {ref}"
    # box plots for both scenarios, one case's slice overlay and its 3-D snapshot, embedded
    assert text.count("data:image/png;base64,") == 4
    assert "<th>model</th><th>baseline</th>" in text and "Scenario missing_LAA" in text


def test_folder_of_label_maps_with_train_dir(tiny_checkpoint, prepared_synthetic_dataset, tmp_path):
    """A plain folder of label maps as data and as baseline training set (the case itself excluded)."""
    label_maps = prepared_synthetic_dataset / "label_maps"
    if not label_maps.is_dir():
        pytest.skip("no label maps in the prepared dataset fixture")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(tiny_checkpoint), "--data_dir", str(label_maps), "--train_dir", str(label_maps),
               "--scenarios", "missing_Coronary", "--max_cases", "1", "--figure_cases", "0", "--output_dir", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    rows = read_rows(out / "metrics.csv")
    assert {(r["method"], r["structure"]) for r in rows} == {("model", "Coronary"), ("baseline", "Coronary")}
    assert rows[0]["case"] != [r for r in rows if r["method"] == "baseline"][0]["baseline_case"]


# --- errors ----------------------------------------------------------------------------------
def test_bad_checkpoint_is_refused(tmp_path, capsys, synthetic_heart_files):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    rc = main(["--checkpoint", str(bad), "--data_dir", str(synthetic_heart_files.dir), "--output_dir",
               str(tmp_path / "out"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "heart-eval: error:" in err and str(bad) in err
    assert not (tmp_path / "out" / "report.html").exists()


def test_empty_or_wrong_data_dir_is_refused(tmp_path, capsys, tiny_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--checkpoint", str(tiny_checkpoint), "--data_dir", str(empty), "--output_dir",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no label maps" in err
    assert main(["--checkpoint", str(tiny_checkpoint), "--data_dir", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_find_cases_from_csv_and_moved_label_maps(tmp_path, synthetic_heart_files):
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_heart_files.dir, moved)
    names = [p.name for p in synthetic_heart_files]
    lines = ["case,case_id,source,annotated,truncated"]
    lines += [f"prep/{n}.npz,{n.split('.')[0]},/old/place/{n},LV;LA,LAA" for n in names]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvaluationError, match=r"test\.csv, line 2: label map .* not found"):
        cases_from_csv(tmp_path / "test.csv")
    cases = find_cases(tmp_path, split="test", label_dir=moved)
    assert [c.path.parent for c in cases] == [moved] * len(names)
    assert cases[0].annotated == ["LV", "LA"] and cases[0].truncated == ["LAA"]
    with pytest.raises(EvaluationError, match="no val.csv"):
        find_cases(tmp_path, split="val")


def test_undefined_values_are_counted_not_hidden(tmp_path):
    """A structure the method did not produce: Dice 0 counts, NaN distances are reported as undefined."""
    table = StructureTable.default()
    rows = [{"case": f"c{i}", "scenario": "missing_LAA", "method": m, "structure": "LAA", "label": 8,
             "dice": d, "hd95_mm": h, "assd_mm": h, "volume_error_percent": -100.0 if d == 0 else 5.0,
             "pred_volume_ml": 1.0, "ref_volume_ml": 1.0}
            for i, (m, d, h) in enumerate([("model", 0.0, math.nan), ("model", 0.8, 2.0), ("baseline", 0.5, 4.0)])]
    meta = {"scenarios": ["missing_LAA"], "checkpoint": "ck", "data": "d", "num_cases": 2}
    summary = summarize_rows(rows, meta, table)
    model = summary["scenarios"]["missing_LAA"]["structures"]["LAA"]["model"]
    assert model["dice"]["mean"] == pytest.approx(0.4) and model["hd95_mm"]["n_undefined"] == 1
    written = write_outputs(tmp_path, rows, meta, table, figures=[])
    assert json.loads((tmp_path / "summary.json").read_text())["scenarios"]["missing_LAA"]["structures"]["LAA"][
        "model"]["hd95_mm"]["n_undefined"] == 1
    assert written["headline"][0].startswith("missing_LAA")


def test_partially_annotated_case(tiny_checkpoint, tmp_path):
    """A split row that annotates only some structures: only those are given and scored, a
    scenario hiding an unannotated structure is skipped, truncated structures are flagged."""
    from heart_training.evaluation.baseline import NearestCaseBaseline
    from heart_training.evaluation.evaluate import EvalCase, evaluate_case

    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    checkpoint = load_inference_checkpoint(tiny_checkpoint)
    table = checkpoint.table
    reference = synthetic_label_map(seed=5, spacing_mm=3.0)
    baseline = NearestCaseBaseline.from_label_maps([synthetic_label_map(seed=s, spacing_mm=3.0) for s in (6, 7)])
    case = EvalCase("partial", tmp_path / "partial.nii.gz", annotated=["Myocardium", "LA", "left ventricle", "Aorta"],
                    truncated=["LA"])

    def model_fn(given, scenario):
        return complete_label_map(given, checkpoint, structures=scenario.scored_labels, replace=scenario.replace,
                                  device="cpu").label_map

    results = {name: (scenario, rows) for name, scenario, _, rows in
               evaluate_case(case, reference, ["annotated", "missing_PA"], table, model_fn, baseline, seed=0)}
    assert results["missing_PA"] == (None, [])
    scenario, rows = results["annotated"]
    assert scenario.input_labels == scenario.scored_labels == [1, 2, 3, 6]
    assert {(r["method"], r["structure"]) for r in rows} == {(m, s) for m in ("model", "baseline")
                                                             for s in ("Myocardium", "LA", "LV", "Aorta")}
    assert all(r["truncated"] == (r["structure"] == "LA") for r in rows)
    assert reference.labels.max() == 10  # the reference itself was not modified
