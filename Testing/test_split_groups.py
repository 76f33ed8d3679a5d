"""heart-split by patient (issue 11): cases of one group (patient) never straddle a split.

The default rule groups ``patientNNN_ED_label`` / ``patientNNN_ES_label`` (ACDC's frames); cases it
does not match stay their own group with the hash they always had. Checked on the real ACDC names
when ``../shared/data/real`` exists and on the same naming pattern always.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from heart_training.data.split import (
    DEFAULT_GROUP_BY,
    assign_splits,
    case_group,
    compile_group_by,
)
from heart_training.data.split import (
    main as split_main,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def _cases(names, dataset="acdc"):
    return [{"case_id": n, "dataset": dataset, "annotated": [], "truncated": [], "source": "", "path": Path(n)}
            for n in names]


def _side_of(splits) -> dict:
    return {c["case_id"]: name for name, cases in splits.items() for c in cases}


def _acdc_like_names() -> list[str]:
    return [f"patient{p:03d}_{phase}_label" for p in range(1, 41) for phase in ("ED", "ES")]


def _real_acdc_names() -> list[str]:
    folder = REAL / "acdc_cmr"
    if not folder.is_dir():
        pytest.skip(f"no real ACDC label maps: {folder} is absent (see ../shared/data/real/README.md)")
    names = sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))
    assert len(names) >= 4
    return names


def _check_no_straddle(names, seeds=range(40), val=0.2, test=0.2):
    pattern = compile_group_by(DEFAULT_GROUP_BY)
    sides_seen = set()
    for seed in seeds:
        splits = assign_splits(_cases(names), val, test, seed)
        side = _side_of(splits)
        assert sorted(side) == sorted(names)  # every case in exactly one split
        by_patient: dict[str, set] = {}
        for name in names:
            by_patient.setdefault(case_group(name, pattern), set()).add(side[name])
        assert all(len(s) == 1 for s in by_patient.values()), {p: s for p, s in by_patient.items() if len(s) > 1}
        sides_seen |= set(side.values())
    assert sides_seen == {"train", "val", "test"}  # grouping did not collapse everything into one side
    return by_patient


def test_ed_and_es_never_straddle_a_split_acdc_names():
    names = _acdc_like_names()
    by_patient = _check_no_straddle(names)
    assert len(by_patient) == 40 and all(p.startswith("patient") for p in by_patient)


def test_ed_and_es_never_straddle_a_split_real_acdc_files():
    names = _real_acdc_names()
    by_patient = _check_no_straddle(names)
    assert len(by_patient) == len(names) // 2  # ED + ES of each patient


def test_without_grouping_frames_do_straddle():
    """The control: without grouping, some seed puts a patient's ED and ES on both sides (so the
    test above can fail)."""
    names = _acdc_like_names()
    straddles = 0
    for seed in range(10):
        side = _side_of(assign_splits(_cases(names), 0.2, 0.2, seed, group_by="none"))
        straddles += sum(side[f"patient{p:03d}_ED_label"] != side[f"patient{p:03d}_ES_label"] for p in range(1, 41))
    assert straddles > 0


@pytest.mark.parametrize("name, group", [
    ("patient001_ED_label", "patient001"),
    ("patient001_ES_label", "patient001"),
    ("sub/patient002_frame01_gt", "sub/patient002"),
    ("P7-es", "P7"),
    ("patient012_4d", "patient012"),
    ("06SR5RBREL16DQ6M8LWS_LA_label", "06SR5RBREL16DQ6M8LWS_LA_label"),
    ("04D1_label", "04D1_label"),
    ("heart_EDGE_1", "heart_EDGE_1"),  # ED must be a whole tag
    ("case_0001", "case_0001"),
])
def test_default_group_rule(name, group):
    assert case_group(name, compile_group_by(DEFAULT_GROUP_BY)) == group


def test_unmatched_cases_keep_the_assignment_they_had_without_grouping():
    names = [f"case_{i:04d}" for i in range(200)] + ["patient001_ED_label", "patient001_ES_label"]
    for seed in (0, 3):
        grouped = _side_of(assign_splits(_cases(names), 0.1, 0.1, seed))
        plain = _side_of(assign_splits(_cases(names), 0.1, 0.1, seed, group_by=None))
        assert all(grouped[n] == plain[n] for n in names if n.startswith("case_"))


def test_custom_regex_first_group_or_whole_match():
    names = ["subjA_scan1", "subjA_scan2", "subjB_scan1", "subjB_scan2", "other"]
    first_group = compile_group_by(r"^(subj[A-Z])_scan\d")
    whole = compile_group_by(r"subj[A-Z]")
    assert [case_group(n, first_group) for n in names] == ["subjA", "subjA", "subjB", "subjB", "other"]
    assert [case_group(n, whole) for n in names] == ["subjA", "subjA", "subjB", "subjB", "other"]
    for seed in range(20):
        side = _side_of(assign_splits(_cases(names), 0.3, 0.3, seed, group_by=r"^(subj[A-Z])_scan\d"))
        assert side["subjA_scan1"] == side["subjA_scan2"] and side["subjB_scan1"] == side["subjB_scan2"]


def test_groups_are_per_dataset_and_deterministic():
    names = _acdc_like_names()
    a = assign_splits(_cases(names, "acdc"), 0.2, 0.1, 5)
    b = assign_splits(_cases(names, "acdc"), 0.2, 0.1, 5)
    assert _side_of(a) == _side_of(b)


# --- the command line, on prepared files ------------------------------------------------------------
def _write_small_map(path: Path, shift: int) -> None:
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.labelmap_files import write_label_map

    labels = np.zeros((24, 24, 12), dtype=np.int16)
    labels[6 + shift:14 + shift, 6:14, 3:9] = 1
    labels[8 + shift:12 + shift, 8:12, 4:8] = 3
    write_label_map(LabelMap(labels, np.diag([2.0, 2.0, 4.0, 1.0])), path)


def test_heart_split_cli_groups_frames(tmp_path):
    from heart_training.data.prepare_cli import main as prepare_main

    raw = tmp_path / "raw"
    raw.mkdir()
    names = [f"patient{p:03d}_{phase}_label" for p in range(1, 7) for phase in ("ED", "ES")]
    for i, name in enumerate(names):
        _write_small_map(raw / f"{name}.nii.gz", i % 2)
    prepared = tmp_path / "prepared"
    assert prepare_main(["--input_dir", str(raw), "--output_dir", str(prepared), "--workers", "1", "--quiet",
                         "--num_surface", "600", "--num_volume", "300", "--num_near", "300",
                         "--min_surface_per_structure", "50"]) == 0
    assert split_main(["--data_dir", str(prepared), "--val_fraction", "0.3", "--test_fraction", "0.3"]) == 0
    side, group = {}, {}
    for name in ("train", "val", "test"):
        with open(prepared / f"{name}.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                side[row["case_id"]], group[row["case_id"]] = name, row["group"]
    assert sorted(side) == sorted(names)
    for p in range(1, 7):
        assert side[f"patient{p:03d}_ED_label"] == side[f"patient{p:03d}_ES_label"]
        assert group[f"patient{p:03d}_ED_label"] == f"patient{p:03d}"
    assert split_main(["--data_dir", str(prepared), "--group_by", "(unclosed"]) == 2
