"""One place for each file rule (issue 12, item 4): case names and label-map discovery
(:func:`HeartCompletionLib.io.labelmap_files.case_name`, :func:`~HeartCompletionLib.io.labelmap_files.find_label_maps`)
give what the helpers they replaced gave (copied below as the reference), and the commands use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from HeartCompletionLib.io.labelmap_files import SUPPORTED_SUFFIXES, case_name, find_label_maps, is_label_map_name

NAMES = ["case_001.nii.gz", "case_001.nii", "Case.NRRD", "heart.seg.nrrd", "heart.SEG.NRRD", "a.b.nii.gz",
         "x.nrrd.nii", "ct.seg.nii.gz", "notes.txt", "case_001.npz", "seg.nrrd", "nii.gz", "README"]


# --- the helpers that were replaced (as they were) ------------------------------------------
def _old_evaluate_strip_suffix(name: str) -> str:  # training/evaluation/evaluate.py
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _old_prepare_strip_label_map_suffix(name: str) -> str | None:  # training/data/prepare.py
    from HeartCompletionLib.io.labelmap_files import LabelMapError, suffix_of

    try:
        suffix = suffix_of(name)
    except LabelMapError:
        return None
    return name[: -len(suffix)] or None


def _old_prepare_find(input_dir: Path, exclude: Path | None = None) -> list[Path]:  # training/data/prepare_cli.py
    found = []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if exclude is not None and exclude in path.parents:
            continue
        if _old_prepare_strip_label_map_suffix(path.name) is not None:
            found.append(path)
    return found


def _old_evaluate_find(folder: Path) -> list[Path]:  # training/evaluation/evaluate.py
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES))


def _old_complete_find(folder: Path) -> list[Path]:  # training/complete_cli.py
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES))


# --- case names ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_case_name_is_the_old_rules(name):
    assert case_name(name) == _old_evaluate_strip_suffix(name)
    old = _old_prepare_strip_label_map_suffix(name)
    assert is_label_map_name(name) == (old is not None)
    if old is not None:
        assert case_name(name) == old
        assert case_name(Path("some/folder") / name) == old  # the folder never counts


def test_case_name_keeps_the_case_of_the_name():
    assert case_name("Patient_07_ED.Seg.Nrrd") == "Patient_07_ED"
    assert case_name(".nii.gz") == ".nii.gz"  # only a suffix: nothing to strip


# --- finding label maps --------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "in"
    files = ["b.nii.gz", "A.NRRD", "a.seg.nrrd", "c.nii", "notes.txt", "case.npz", ".hidden.nii.gz",
             "sub/d.nii.gz", "sub/deeper/e.nrrd", ".git/f.nii.gz", "out/g.nii.gz", "out/h.nii.gz.x1y2z3w4.tmp",
             "b.nii.gz.abcdefgh.tmp"]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "folder.nii.gz").mkdir()  # a folder with a label-map name is not a label map
    return root


def test_find_label_maps_is_what_each_command_found(tree):
    assert find_label_maps(tree, exclude=tree / "out") == _old_prepare_find(tree, exclude=tree / "out")
    assert find_label_maps(tree) == _old_prepare_find(tree)
    assert find_label_maps(tree, include_hidden=True) == _old_evaluate_find(tree)
    assert find_label_maps(tree, recursive=False, include_hidden=True) == _old_complete_find(tree)
    names = [p.relative_to(tree).as_posix() for p in find_label_maps(tree, exclude=tree / "out")]
    assert names == ["A.NRRD", "a.seg.nrrd", "b.nii.gz", "c.nii", "sub/d.nii.gz", "sub/deeper/e.nrrd"]


# --- the commands use them -----------------------------------------------------------------
def test_prepare_and_evaluate_name_cases_by_the_one_rule(tmp_path):
    from heart_training.data.prepare import sidecar_path
    from heart_training.evaluation.evaluate import find_cases

    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    folder = tmp_path / "maps"
    heart = synthetic_label_map(seed=0, spacing_mm=(4.0, 4.0, 4.0))
    for name in ("p2.Seg.Nrrd", "p1.nii.gz", "sub/p3.nrrd"):
        write_label_map(heart, folder / name)
    cases = find_cases(folder)
    assert [(c.case_id, c.path.name) for c in cases] == [("p1", "p1.nii.gz"), ("p2", "p2.Seg.Nrrd"), ("p3", "p3.nrrd")]
    assert sidecar_path(folder / "p2.Seg.Nrrd") == folder / "p2.json"


def test_every_command_skips_hidden_files(tree):
    """heart-complete and heart-eval skip hidden names as heart-prepare does (a macOS `._case.nii.gz`
    or an editor's `.case.nii.gz` is not a case)."""
    from heart_training.evaluation.evaluate import find_cases

    from HeartCompletionLib.inference.complete_cli import _jobs

    jobs = [src.name for src, _ in _jobs(tree, tree.parent / "done")]
    assert ".hidden.nii.gz" not in jobs and jobs == ["A.NRRD", "a.seg.nrrd", "b.nii.gz", "c.nii"]
    cases = [c.path.relative_to(tree).as_posix() for c in find_cases(tree)]
    assert all(not part.startswith(".") for c in cases for part in c.split("/")) and "b.nii.gz" in cases
