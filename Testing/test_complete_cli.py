"""``heart-complete`` (HeartCompletionLib/inference/complete_cli.py): real files in, real files out, clear errors.

Uses the session's tiny checkpoint and synthetic hearts at 3 mm written as NIfTI / NRRD.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.inference.complete_cli import main
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_label_map

DROPPED = (4, 6, 7)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with a partial heart as .nii.gz and the same heart (LPS-flipped grid) as .nrrd."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    for name, flips in (("case_a.nii.gz", ()), ("case_b.nrrd", (0, 1))):
        lm = synthetic_label_map(seed=0, spacing_mm=3.0, flip_axes=flips)
        labels = lm.labels.copy()
        labels[np.isin(labels, DROPPED)] = 0
        write_label_map(LabelMap(labels, lm.ijk_to_ras), folder / name)
    return folder


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "HeartCompletionLib.inference.complete_cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for option in ("--checkpoint", "--input", "--output", "--structures", "--label_map", "--meshes", "--replace",
                   "--device", "--threads"):
        assert option in out.stdout
    assert "--protocol" not in out.stdout  # the panel's line protocol is internal


def test_a_completion_process_never_imports_torchs_compiler(inputs, tmp_path):
    """``torch._dynamo`` takes about 3 s to import on the 2-core machine: a decorator, an optimizer or
    a factory call on the meta device would make every heart-complete run (and every completion
    of the Slicer panel, a process of its own) pay it. The bundled model, its latent fit included."""
    code = ("import sys\n"
            "from HeartCompletionLib.inference.complete_cli import main\n"
            f"code = main(['--checkpoint', 'synthetic-demo', '--input', {str(inputs / 'case_a.nii.gz')!r}, "
            f"'--output', {str(tmp_path / 'out.nii.gz')!r}, '--quiet'])\n"
            "print(code, 'torch' in sys.modules, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-3:] == ["0", "True", "False"], out.stdout
    assert (tmp_path / "out.nii.gz").is_file()


def test_the_console_script_is_the_inference_side_command():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    # run: main, then the exit without Python's teardown (HeartCompletionLib.inference.process_exit)
    assert 'heart-complete = "HeartCompletionLib.inference.complete_cli:run"' in pyproject
    assert not (Path(__file__).resolve().parents[1] / "training" / "complete_cli.py").exists()


def test_single_file_with_meshes(tiny_checkpoint, inputs, tmp_path, capsys):
    src = inputs / "case_a.nii.gz"
    before = digest(src)
    out = tmp_path / "sub" / "completed.nii.gz"
    code = main(["--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out),
                 "--meshes", str(tmp_path / "meshes"), "--mesh_format", "ply", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert digest(src) == before, "the input file was modified"
    given, done = read_label_map(src), read_label_map(out)
    assert done.same_geometry(given)
    mask = given.labels > 0
    assert np.array_equal(done.labels[mask], given.labels[mask])
    assert set(done.present_labels()) == set(given.present_labels()) | set(DROPPED)
    meshes = sorted(p.name for p in (tmp_path / "meshes").iterdir())
    assert "completed_Aorta.ply" in meshes and len(meshes) == len(done.present_labels())


def test_folder_batch_keeps_names_and_formats(tiny_checkpoint, inputs, tmp_path, capsys):
    out_dir = tmp_path / "completed"
    code = main(["--checkpoint", str(tiny_checkpoint), "--input", str(inputs), "--output", str(out_dir),
                 "--structures", "Aorta", "pulmonary artery"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["case_a.nii.gz", "case_b.nrrd"]
    assert "case_b.nrrd" in err and "completed Aorta, PA" in err
    a, b = read_label_map(out_dir / "case_a.nii.gz"), read_label_map(out_dir / "case_b.nrrd")
    assert b.same_geometry(read_label_map(inputs / "case_b.nrrd"))
    assert 4 not in a.present_labels() and {6, 7} <= set(a.present_labels())
    # the same heart stored LPS-flipped gives the same physical completion (flip b back onto a)
    # (the coarse lattice starts at the other corner, so a rare uniform-cell fill may differ)
    assert a.shape == b.shape and (a.labels == b.labels[::-1, ::-1, :]).mean() > 0.999


def _forged_checkpoint(source: Path, target: Path, **changes) -> Path:
    """Copy of a safetensors checkpoint with its HeartCompletion metadata changed."""
    raw = source.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["heartcompletion"])
    meta.update(changes)
    header["__metadata__"]["heartcompletion"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return target


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([*args, "--quiet"])
    return code, capsys.readouterr().err


def test_clear_errors(tiny_checkpoint, inputs, tmp_path, capsys):
    ck = str(tiny_checkpoint)
    src = inputs / "case_a.nii.gz"
    before = digest(src)

    # an output that would overwrite the input
    code, err = run_cli(["--checkpoint", ck, "--input", str(src), "--output", str(src)], capsys)
    assert code != 0 and "overwrite the input" in err and str(src) in err
    code, err = run_cli(["--checkpoint", ck, "--input", str(inputs), "--output", str(inputs)], capsys)
    assert code != 0 and "overwrite the input" in err
    assert digest(src) == before

    # a checkpoint of another format version, and one trained on another structure table
    old = _forged_checkpoint(Path(ck), tmp_path / "old.safetensors", format_version=99)
    code, err = run_cli(["--checkpoint", str(old), "--input", str(src), "--output", str(tmp_path / "o.nii.gz")], capsys)
    assert code != 0 and "old.safetensors" in err and "version" in err
    table16 = Path(__file__).resolve().parents[1] / "training" / "configs" / "structures_16.json"
    code, err = run_cli(["--checkpoint", ck, "--table", str(table16), "--input", str(src), "--output",
                         str(tmp_path / "o.nii.gz")], capsys)
    assert code != 0 and "other structures" in err

    # no recognised structure (values the table does not know become background)
    empty = write_label_map(LabelMap(np.full((10, 10, 10), 0, np.uint8), np.eye(4)), tmp_path / "empty.nii.gz")
    code, err = run_cli(["--checkpoint", ck, "--input", str(empty), "--output", str(tmp_path / "e.nii.gz")], capsys)
    assert code != 0 and "empty.nii.gz" in err and "no recognised structure" in err

    # unreadable input: garbage with a NIfTI name, and a missing file
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti at all")
    code, err = run_cli(["--checkpoint", ck, "--input", str(garbage), "--output", str(tmp_path / "g.nii.gz")], capsys)
    assert code != 0 and "garbage.nii.gz" in err
    code, err = run_cli(["--checkpoint", ck, "--input", str(tmp_path / "missing.nrrd"), "--output",
                         str(tmp_path / "m.nrrd")], capsys)
    assert code != 0 and "missing.nrrd" in err and "not found" in err
    assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "g.nii.gz").exists()

    # an island fraction outside [0, 1) is a usage error naming the option
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", ck, "--input", str(src), "--output", str(tmp_path / "i.nii.gz"),
              "--min_island_fraction", "1.5"])
    assert exit_info.value.code == 2 and "--min_island_fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # so is a negative detached-piece distance
        main(["--checkpoint", ck, "--input", str(src), "--output", str(tmp_path / "i.nii.gz"),
              "--max_detached_mm", "-3"])
    assert exit_info.value.code == 2 and "--max_detached_mm" in capsys.readouterr().err


def test_other_label_numbering_is_mapped(tiny_checkpoint, tmp_path, capsys):
    """An MM-WHS-numbered file (205 = Myocardium, 500 = LV, ...) with --label_map mmwhs."""
    from HeartCompletionLib.structures.conventions import MMWHS

    lm = synthetic_label_map(seed=0, spacing_mm=3.0)
    to_mmwhs = {table_label: value for value, table_label in zip(MMWHS, (1, 2, 3, 4, 5, 6, 7))}
    labels = np.zeros(lm.shape, np.int16)
    for table_label, value in to_mmwhs.items():
        if table_label not in DROPPED:
            labels[lm.labels == table_label] = value
    src = write_label_map(LabelMap(labels, lm.ijk_to_ras), tmp_path / "mmwhs.nii.gz", table=None)
    out = tmp_path / "out.nii.gz"
    code, err = run_cli(["--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out)], capsys)
    assert code != 0 and "mmwhs.nii.gz" in err and "--label_map" in err  # values 205... unknown to the table
    code, err = run_cli(["--checkpoint", str(tiny_checkpoint), "--input", str(src), "--output", str(out),
                         "--label_map", "mmwhs"], capsys)
    assert code == 0, err
    done = read_label_map(out)
    assert {1, 2, 3, 5} <= set(done.present_labels()) and set(DROPPED) <= set(done.present_labels())
    assert np.array_equal(done.labels[lm.labels == 3], np.full((lm.labels == 3).sum(), 3))
