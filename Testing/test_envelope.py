"""The envelope metric (issue 11, item 4): exact on boxes across grids, right on the real envelope
files (same grid and another grid of the same patient), and the benchmark that reports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.inference.envelope import envelope_fit, sample_mask
from HeartCompletionLib.io.labelmap import LabelMap

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def _box_map(shape, ijk_to_ras, lo_ras, hi_ras, value=1) -> LabelMap:
    """Label ``value`` at the voxels whose centres lie in the RAS box [lo, hi)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ras = ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    inside = np.all((ras >= lo_ras) & (ras < hi_ras), axis=1).reshape(shape)
    return LabelMap(np.where(inside, value, 0).astype(np.int16), ijk_to_ras)


def test_fractions_of_boxes_on_different_grids():
    # completion: 1 mm RAS grid; box x 0..40, y 0..40, z 0..40 mm (64 ml)
    comp_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    comp_affine[:3, 3] = [-20.5, -20.5, -20.5]
    completed = _box_map((100, 100, 100), comp_affine, [0, 0, 0], [40, 40, 40], value=3)
    # envelope: an LPS-stored 2 mm grid (i towards left, j towards posterior) with box x 20..60 (same y, z)
    env_affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    env_affine[:3, 3] = [99.0, 99.0, -39.0]
    envelope = _box_map((100, 100, 50), env_affine, [20, 0, 0], [60, 40, 40]).labels > 0
    fit = envelope_fit(completed, envelope, env_affine, [3])
    assert fit["heart_ml"] == pytest.approx(64.0, rel=0.01)
    assert fit["envelope_ml"] == pytest.approx(64.0, rel=0.05)
    assert fit["inside_fraction"] == pytest.approx(0.5, abs=0.03)  # x 20..40 of 0..40
    assert fit["fill_fraction"] == pytest.approx(0.5, abs=0.03)
    assert fit["envelope_in_view_fraction"] == pytest.approx(1.0)
    # a completion grid that reaches only x < 40 sees half the envelope
    small = LabelMap(completed.labels[:61], comp_affine)
    assert envelope_fit(small, envelope, env_affine, [3])["envelope_in_view_fraction"] == pytest.approx(0.5, abs=0.03)
    # a structure not asked for is not counted
    assert envelope_fit(completed, envelope, env_affine, [1])["heart_ml"] == 0


def test_sample_mask_is_false_outside_its_grid():
    mask = np.ones((4, 4, 4), dtype=bool)
    points = np.array([[0.0, 0, 0], [3, 3, 3], [-1, 0, 0], [4.6, 0, 0]])
    assert sample_mask(mask, np.eye(4), points).tolist() == [True, True, False, False]


def _real(folder: str) -> Path:
    path = REAL / folder
    if not path.is_dir():
        pytest.skip(f"no real envelope files: {path} is absent (see ../shared/data/real/README.md)")
    return path


@pytest.mark.parametrize("folder, label_file, envelope_file, minimum", [
    ("platipy_rtct", "04D1_label.nii.gz", "04D1_heart_envelope.nii.gz", 0.95),  # the LAD lies on the heart
    ("totalseg_chestct", "chestct_label.nii.gz", "chestct_heart_envelope.nii.gz", 0.8),  # the PA trunk leaves it
])
def test_real_structures_lie_in_their_envelope(folder, label_file, envelope_file, minimum):
    """The real given structure against its envelope (same grid for platipy, another grid for the
    chest CT, in LPS files): only right physical coordinates put it inside; the same envelope
    stored with its voxel axes reversed (same physical mask) gives the same figures."""
    from HeartCompletionLib.inference.envelope import read_envelope
    from HeartCompletionLib.io.labelmap_files import read_label_map

    base = _real(folder)
    given = read_label_map(base / label_file)
    mask, affine = read_envelope(base / envelope_file)
    fit = envelope_fit(given, mask, affine, given.present_labels())
    assert fit["inside_fraction"] >= minimum
    assert fit["envelope_in_view_fraction"] > 0.99  # both inputs' grids hold the whole heart
    flipped = affine.copy()
    flipped[:3, 0], flipped[:3, 1] = -affine[:3, 0], -affine[:3, 1]
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 0] * (mask.shape[0] - 1) + affine[:3, 1] * (mask.shape[1] - 1)
    again = envelope_fit(given, mask[::-1, ::-1].copy(), flipped, given.present_labels())
    assert again == fit
    # a wrong frame (the envelope read as voxel indices) puts the structure outside
    assert envelope_fit(given, mask, np.diag([*np.abs(np.diag(affine)[:3]), 1.0]), given.present_labels())[
        "inside_fraction"] < 0.5


@pytest.mark.slow
def test_envelope_check_help_and_one_real_case(tmp_path):
    script = ROOT / "benchmarks" / "envelope_check.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--checkpoint" in help_text and "synthetic" in help_text
    _real("platipy_rtct")
    out = subprocess.run([sys.executable, str(script), "--cases", "platipy_rtct", "--no_control", "--json",
                          str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("$ python benchmarks/envelope_check.py --cases platipy_rtct")
    assert "trained on synthetic hearts only" in lines[1]
    import json

    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["input"] == ["Coronary"]
    for key in ("inside_fraction", "fill_fraction", "envelope_in_view_fraction"):
        assert 0.0 <= row["heart"][key] <= 1.0
    assert row["heart"]["envelope_ml"] == pytest.approx(786.3, abs=1.0)  # PROVENANCE.md: 274821 voxels, 786.27 ml
