"""heart-split: deterministic, disjoint, stable splits of prepared case files (real .npz files)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from heart_training.data import split
from heart_training.data.case_format import save_case, write_manifest

from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()


def _write_cases(folder: Path, names, annotated=None) -> list[Path]:
    """Small but well-formed cases (split reads only the flags and meta)."""
    folder.mkdir(parents=True, exist_ok=True)
    K = len(TABLE)
    flags = np.ones(K, bool) if annotated is None else np.isin(TABLE.names, annotated)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        sdf = rng.normal(size=(8, K)).astype(np.float32)
        sdf[:, ~flags] = np.nan
        arrays = {
            "origin_mm": np.zeros(3), "surface_points": rng.normal(size=(8, 3)), "surface_normals": np.eye(3)[[0] * 8],
            "surface_labels": np.flatnonzero(flags)[np.arange(8) % flags.sum()], "volume_points": rng.normal(size=(8, 3)),
            "volume_sdf": sdf, "near_points": rng.normal(size=(8, 3)), "near_sdf": sdf,
            "annotated": flags, "truncated": np.arange(K) == 7,
        }
        path = folder / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(save_case(path, arrays, {"table": TABLE.names, "source": f"/data/{name}.nii.gz"}))
    return paths


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    data = tmp_path / "imagecas"
    _write_cases(data, [f"case_{i:03d}" for i in range(60)] + ["nested/case_x"])
    summary = split.write_splits([data], val_fraction=0.2, test_fraction=0.1, seed=3)
    rows = {name: _read(data / f"{name}.csv") for name in ("train", "val", "test")}
    ids = {name: [r["case_id"] for r in rs] for name, rs in rows.items()}
    everything = sum(ids.values(), [])
    assert sorted(everything) == sorted({*everything}) and len(everything) == 61  # each case exactly once
    assert summary["counts"] == {k: len(v) for k, v in ids.items()}
    assert 3 <= len(ids["val"]) <= 22 and 1 <= len(ids["test"]) <= 15  # hash fractions: right on average
    first = {name: (data / f"{name}.csv").read_bytes() for name in rows}
    split.write_splits([data], val_fraction=0.2, test_fraction=0.1, seed=3)
    assert first == {name: (data / f"{name}.csv").read_bytes() for name in rows}  # byte-identical re-run
    row = rows["train"][0] if rows["train"][0]["case_id"] != "nested/case_x" else rows["train"][1]
    assert (data / row["case"]).is_file() and row["dataset"] == "imagecas"
    assert row["annotated"] == ";".join(TABLE.names) and row["truncated"] == "LAA"
    assert row["source"].startswith("/data/case_")
    split.write_splits([data], val_fraction=0.2, test_fraction=0.1, seed=4)
    assert first["val"] != (data / "val.csv").read_bytes()  # the seed matters


def test_adding_cases_never_moves_existing_ones(tmp_path):
    data = tmp_path / "ds"
    _write_cases(data, [f"c{i}" for i in range(30)])
    split.write_splits([data], val_fraction=0.25)
    before = {r["case_id"]: name for name in ("train", "val") for r in _read(data / f"{name}.csv")}
    _write_cases(data, [f"new{i}" for i in range(30)])
    split.write_splits([data], val_fraction=0.25)
    after = {r["case_id"]: name for name in ("train", "val") for r in _read(data / f"{name}.csv")}
    assert len(after) == 60
    assert all(after[case] == where for case, where in before.items())


def test_several_datasets_merge_and_manifest_failures_are_skipped(tmp_path, capsys):
    a, b = tmp_path / "a" / "prepared", tmp_path / "b" / "prepared"
    _write_cases(a, [f"case_{i}" for i in range(12)])
    _write_cases(b, [f"case_{i}" for i in range(12)], annotated=["LV", "Myocardium"])  # same names, other data
    entries = [{"case": f"case_{i}", "source": f"/x/case_{i}.nii.gz", "output": str(b / f"case_{i}.npz"),
                "status": "ok" if i else "failed", "reason": "" if i else "corrupt"} for i in range(12)]
    write_manifest(b, "/x", {}, entries)
    out = tmp_path / "splits"
    assert split.main(["--data_dir", str(a), "--data_dir", str(b), "--output_dir", str(out), "--val_fraction", "0.3"]) == 0
    assert "train" in capsys.readouterr().out
    rows = _read(out / "train.csv") + _read(out / "val.csv")
    assert len(rows) == 23  # case_0 of b failed in its manifest
    assert {r["dataset"] for r in rows} == {"prepared", "prepared-2"}
    keys = [(r["dataset"], r["case_id"]) for r in rows]
    assert len(set(keys)) == len(keys)
    assert all((out / r["case"]).is_file() for r in rows)
    assert {r["annotated"] for r in rows if r["dataset"] == "prepared-2"} == {"Myocardium;LV"}
    resolved = split.read_split_csv(out / "val.csv")
    assert all(Path(r["case"]).is_absolute() and Path(r["case"]).is_file() for r in resolved)
    assert json.loads((out / "split.json").read_text())["datasets"]["prepared-2"] == str(b.resolve())
    assert not (out / "test.csv").exists()


def test_small_dataset_gets_a_test_group_when_asked():
    """Three patients (six frames) and a test fraction: at least one patient is held out, whole,
    for every seed; the other two keep one validation and one training patient."""
    cases = [{"case_id": f"patient00{p}_{f}_label", "dataset": "acdc"} for p in (1, 2, 3) for f in ("ED", "ES")]
    for seed in range(20):
        out = split.assign_splits([dict(c) for c in cases], val_fraction=0.15, test_fraction=0.25, seed=seed)
        patients = {name: {c["group"] for c in out[name]} for name in ("train", "val", "test")}
        assert all(len(p) == 1 for p in patients.values()), (seed, patients)  # one patient each, both frames
        assert all(len(out[name]) == 2 for name in patients)
    out = split.assign_splits([dict(c) for c in cases], val_fraction=0.0, test_fraction=0.0, seed=0)
    assert out["test"] == [] and out["val"] == []  # nothing asked, nothing moved


def test_tiny_dataset_gets_a_validation_case_and_errors_are_clear(tmp_path, capsys):
    data = tmp_path / "tiny"
    _write_cases(data, ["only_a", "only_b"])
    summary = split.write_splits([data], val_fraction=0.1)
    assert summary["counts"]["val"] == 1 and summary["counts"]["train"] == 1
    assert split.main(["--data_dir", str(tmp_path / "nothing")]) == 2
    assert "no such data folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert split.main(["--data_dir", str(tmp_path / "empty")]) == 2
    assert "no prepared cases" in capsys.readouterr().err
    with pytest.raises(split.SplitError, match="fractions"):
        split.write_splits([data], val_fraction=0.7, test_fraction=0.4)
    (data / "broken.npz").write_bytes(b"garbage")
    assert split.main(["--data_dir", str(data)]) == 2
    assert "broken.npz" in capsys.readouterr().err
