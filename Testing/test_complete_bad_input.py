"""Completion on bad input (issue 14, rows 1, 2, 3 and 14): ``heart-complete``, the panel's
background process (the same command: ``python -m HeartCompletionLib.inference.complete_cli --protocol lines``)
and the panel's logic. One command, so one set of options, errors and exit codes (issue 12, item 2).

Real files and real (untrained ``tiny``) checkpoints: an untrained model predicts little, which is
all these tests need; they check what happens around the model, never its accuracy.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_model_registry import save_untrained_checkpoint

from HeartCompletionLib.errors import ExitCode
from HeartCompletionLib.inference import completion_process
from HeartCompletionLib.inference.complete_cli import main
from HeartCompletionLib.inference.completion import CompletionError, complete_label_map
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.structures.table import DEFAULT_TABLE_PATH, StructureTable

TABLE = StructureTable.default()
TABLE16_PATH = Path(__file__).resolve().parents[1] / "training" / "configs" / "structures_16.json"
DROPPED = (4, 6, 7)  # RA, Aorta, PA
SVC = 11  # first structure of the 16-structure table beyond the default ten


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def swapped_lv_rv() -> StructureTable:
    """The default table with LV and RV exchanged (names, synonyms, codes; labels stay 3 and 5)."""
    data = TABLE.to_dict()
    lv, rv = data["structures"][2], data["structures"][4]
    data["structures"][2], data["structures"][4] = {**rv, "label": 3}, {**lv, "label": 5}
    return StructureTable.from_dict(data)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny checkpoints: default table, 9 structures (no PV), 16 structures, LV/RV swapped."""
    folder = tmp_path_factory.mktemp("bad_input_checkpoints")
    nine = StructureTable(TABLE.structures[:9], name="nine")
    tables = {"ten": TABLE, "nine": nine, "sixteen": StructureTable.from_json(TABLE16_PATH), "swapped": swapped_lv_rv()}
    return {name: save_untrained_checkpoint(folder / f"{name}.safetensors", table) for name, table in tables.items()}


@pytest.fixture(scope="module")
def hearts(tmp_path_factory) -> dict[str, Path]:
    """A full heart and a partial one (RA, Aorta, PA missing) at 3 mm, as NIfTI."""
    folder = tmp_path_factory.mktemp("bad_input_hearts")
    heart = synthetic_label_map(seed=0, spacing_mm=3.0)
    partial = np.where(np.isin(heart.labels, DROPPED), 0, heart.labels)
    return {
        "full": write_label_map(heart, folder / "a_full.nii.gz"),
        "partial": write_label_map(LabelMap(partial, heart.ijk_to_ras), folder / "b_partial.nii.gz"),
    }


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def run_process(*args) -> tuple[int, list]:
    command = completion_process.build_command(*args, device="cpu") if len(args) == 3 else list(args[0])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return done.returncode, [completion_process.parse_line(line) for line in done.stdout.splitlines()]


# --- 1. nothing to complete ----------------------------------------------------------------------


@pytest.mark.slow
def test_full_heart_comes_back_unchanged_with_exit_0(checkpoints, hearts, tmp_path, capsys):
    out = tmp_path / "full.nii.gz"
    code, err = run_cli(["--checkpoint", checkpoints["ten"], "--input", hearts["full"], "--output", out], capsys)
    assert code == 0, err
    assert "nothing to complete" in err and "Traceback" not in err
    assert np.array_equal(read_label_map(out).labels, read_label_map(hearts["full"]).labels)


def test_given_structure_without_replace_is_nothing_to_complete(checkpoints, hearts, tmp_path, capsys):
    out = tmp_path / "lv.nii.gz"
    code, err = run_cli(["--checkpoint", checkpoints["ten"], "--input", hearts["partial"], "--output", out,
                         "--structures", "LV"], capsys)
    assert code == 0, err
    assert "nothing to complete" in err
    assert np.array_equal(read_label_map(out).labels, read_label_map(hearts["partial"]).labels)


def test_checkpoint_with_fewer_structures_has_nothing_to_complete(checkpoints, hearts, tmp_path, capsys):
    out = tmp_path / "nine.nii.gz"
    code, err = run_cli(["--checkpoint", checkpoints["nine"], "--input", hearts["full"], "--output", out], capsys)
    assert code == 0, err
    assert "nothing to complete" in err


def test_full_heart_does_not_stop_the_later_cases_of_a_batch(checkpoints, hearts, tmp_path, capsys):
    out_dir = tmp_path / "batch"
    code, err = run_cli(["--checkpoint", checkpoints["ten"], "--input", hearts["full"].parent, "--output", out_dir],
                        capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_full.nii.gz", "b_partial.nii.gz"]
    assert "a_full.nii.gz" in err and "nothing to complete" in err and "completed RA, Aorta, PA" in err


def test_library_nothing_to_complete_has_the_timings(checkpoints, hearts):
    result = complete_label_map(read_label_map(hearts["full"]), checkpoints["ten"], device="cpu")
    assert result.completed_labels == [] and "total_s" in result.timings
    assert any("nothing to complete" in m for m in result.messages)


@pytest.mark.slow
def test_background_process_full_heart_exit_0(checkpoints, hearts, tmp_path):
    code, events = run_process(checkpoints["ten"], hearts["full"], tmp_path / "out.nrrd")
    assert code == 0, [e.message for e in events]
    (result,) = [e.payload for e in events if e.kind == "result"]
    assert result["completed_labels"] == []
    assert any("nothing to complete" in e.message for e in events if e.kind == "log")


# --- 2. the background process never overwrites its input ----------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_background_process_refuses_output_equal_to_input(checkpoints, hearts, tmp_path, spelling):
    source = write_label_map(read_label_map(hearts["partial"]), tmp_path / "input.nrrd")
    before = digest(source)
    output = {"same": source, "dotted": tmp_path / "sub" / ".." / "input.nrrd"}[spelling]
    (tmp_path / "sub").mkdir()
    code, events = run_process(checkpoints["ten"], source, output)
    assert code == ExitCode.BAD_INPUT
    assert any(e.kind == "error" and "overwrite the input" in e.message for e in events)
    assert digest(source) == before


# --- 3. the checkpoint's structure table ----------------------------------------------------------


def heart_with_svc() -> LabelMap:
    """A partial heart (RA, Aorta, PA missing) plus an SVC block (label 11) clear of the others."""
    heart = synthetic_label_map(seed=0, spacing_mm=3.0)
    labels = np.where(np.isin(heart.labels, DROPPED), 0, heart.labels).astype(np.int16)
    free = np.argwhere(labels == 0)
    i, j, k = free[len(free) // 2]
    block = labels[max(i - 2, 0):i + 2, max(j - 2, 0):j + 2, max(k - 2, 0):k + 2]
    block[block == 0] = SVC
    return LabelMap(labels, heart.ijk_to_ras)


@pytest.mark.slow
def test_background_process_reads_with_the_checkpoint_table(checkpoints, tmp_path):
    source = write_label_map(heart_with_svc(), tmp_path / "svc.nrrd")
    svc = read_label_map(source, table=TABLE16_PATH).labels == SVC
    assert svc.sum() > 10
    code, events = run_process(checkpoints["sixteen"], source, tmp_path / "out.nrrd")
    assert code == 0, [e.message for e in events]
    (result,) = [e.payload for e in events if e.kind == "result"]
    assert SVC in result["given_labels"] and SVC not in result["completed_labels"]
    done = read_label_map(tmp_path / "out.nrrd", table=TABLE16_PATH)
    assert np.array_equal(done.labels == SVC, svc), "the given SVC voxels were not kept"


def test_background_process_refuses_a_checkpoint_of_another_table(checkpoints, hearts, tmp_path):
    command = completion_process.build_command(checkpoints["swapped"], hearts["partial"], tmp_path / "out.nrrd",
                                               device="cpu", table=DEFAULT_TABLE_PATH)
    code, events = run_process(command)
    assert code == ExitCode.BAD_INPUT
    (error,) = [e.message for e in events if e.kind == "error"]
    assert "swapped.safetensors" in error and str(swapped_lv_rv().names) in error and str(TABLE.names) in error
    assert not (tmp_path / "out.nrrd").exists()


@pytest.mark.slow
def test_panel_maps_and_completes_with_the_checkpoint_table(checkpoints, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from HeartCompletionModule import segments
    from HeartCompletionModule.logic import HeartCompletionLogic
    from test_slicer_logic import add_volume

    slicer.mrmlScene = slicer.vtkMRMLScene()
    segments.ensure_segmentation_converters()
    table16 = StructureTable.from_json(TABLE16_PATH)
    heart = heart_with_svc()
    volume = add_volume(slicer.mrmlScene, heart, "image")
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "heart")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(volume, node, "")
    segmentation = node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetName(table16.by_label(segment.GetLabelValue()).name)
    logic = None
    try:
        logic = HeartCompletionLogic()
        assert logic.setCheckpoint(str(checkpoints["sixteen"])) is True  # the table changed
        assert logic.table.names == table16.names
        mappings = logic.segmentMappings(node)
        assert "SVC" in [m.structure.name for m in mappings if m.structure is not None]
        structures = [s.name for s in logic.defaultStructures(mappings)]
        assert "SVC" not in structures and {"RA", "Aorta", "PA", "IVC"} <= set(structures)
        process = logic.startCompletion(node, mappings, structures, str(checkpoints["sixteen"]), "cpu", False,
                                        volume)
        events = process.wait(timeout_s=300)
        assert process.returncode == 0, [e.message for e in events]
        (result,) = [e.payload for e in events if e.kind == "result"]
        assert SVC in result["given_labels"]
        logic.finishCompletion(node, mappings, result["completed_labels"], False, False)
        svc_id = next(m.segment.segment_id for m in mappings if m.label == SVC)
        mask = segments.segment_mask(node, svc_id, heart.shape, heart.ijk_to_ras)
        assert np.array_equal(mask, heart.labels == SVC)
        logic.cleanupTemporaryFiles()

        # mapped for one checkpoint, run with another of a different table: refused, both listed
        with pytest.raises(ValueError) as info:
            logic.startCompletion(node, mappings, structures, str(checkpoints["swapped"]), "cpu", False, volume)
        assert str(table16.names) in str(info.value) and str(swapped_lv_rv().names) in str(info.value)
        assert logic.workDir is None
        # an unreadable checkpoint falls back to the default table
        assert logic.setCheckpoint(str(tmp_path / "missing.safetensors")) is True
        assert logic.table.names == TABLE.names
    finally:
        if logic is not None:
            logic.shutdown()  # its warm worker
        slicer.mrmlScene.Clear(1)


# --- 14. option checks: usage errors (exit 2) before any input is read -----------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("--grid_spacing_mm", "0"), ("--grid_spacing_mm", "-4"), ("--grid_spacing_mm", "nan"),
     ("--margin_mm", "nan"), ("--margin_mm", "-1"), ("--margin_mm", "inf")],
)
def test_lattice_options_out_of_range_are_usage_errors(checkpoints, hearts, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(checkpoints["ten"]), "--input", str(hearts["partial"]), "--output",
              str(tmp_path / "o.nii.gz"), option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and option in err
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize(("kwargs", "expected"), [({"grid_spacing_mm": 0.0}, "grid_spacing_mm"),
                                                   ({"grid_spacing_mm": -2.0}, "grid_spacing_mm"),
                                                   ({"margin_mm": float("nan")}, "margin_mm"),
                                                   ({"margin_mm": -5.0}, "margin_mm")])
def test_library_refuses_lattice_values(checkpoints, hearts, kwargs, expected):
    with pytest.raises(CompletionError, match=expected):
        complete_label_map(read_label_map(hearts["partial"]), checkpoints["ten"], device="cpu", **kwargs)


def test_unknown_structure_is_a_usage_error_before_reading_input(checkpoints, tmp_path, capsys):
    garbage = tmp_path / "garbage.nii.gz"  # never read: the option is refused first
    garbage.write_bytes(b"not a label map")
    code, err = run_cli(["--checkpoint", checkpoints["ten"], "--input", garbage, "--output", tmp_path / "o.nii.gz",
                         "--structures", "LAA", "Spleen"], capsys)
    assert code == 2
    assert "--structures" in err and "Spleen" in err and "garbage" not in err


def test_unavailable_cuda_is_a_usage_error_before_reading_input(checkpoints, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: an unavailable-device error cannot happen")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a label map")
    code, err = run_cli(["--checkpoint", checkpoints["ten"], "--input", garbage, "--output", tmp_path / "o.nii.gz",
                         "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and "garbage" not in err


def test_help_states_the_ranges():
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer), pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(buffer.getvalue().split())
    assert "> 0 (default 16)" in text and ">= 0 (default 60)" in text



@pytest.mark.slow
def test_background_process_checks_structures_and_device_before_reading_input(checkpoints, tmp_path):
    import torch

    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"not a label map")
    command = completion_process.build_command(checkpoints["ten"], garbage, tmp_path / "o.nrrd", ["LAA", "Spleen"],
                                               device="cpu")
    code, events = run_process(command)
    (error,) = [e.message for e in events if e.kind == "error"]
    assert code == ExitCode.BAD_INPUT
    assert "--structures" in error and "Spleen" in error and "garbage" not in error
    if not torch.cuda.is_available():  # where CUDA exists this refusal cannot happen
        command = completion_process.build_command(checkpoints["ten"], garbage, tmp_path / "o.nrrd", device="cuda")
        code, events = run_process(command)
        (error,) = [e.message for e in events if e.kind == "error"]
        assert code == ExitCode.BAD_INPUT
        assert "CUDA is not available" in error and "garbage" not in error


# --- one command: the background process is heart-complete with --protocol lines --------------------


def lines_of(text: str) -> list:
    return [completion_process.parse_line(line) for line in text.splitlines()]


def test_build_command_runs_heart_complete_with_the_line_protocol():
    command = completion_process.build_command("ck", "in.nrrd", "out.nrrd", ["LAA"], True, "cpu", "py",
                                               table="t.json", decode="exact")
    assert command[:5] == ["py", "-m", "HeartCompletionLib.inference.complete_cli", "--protocol", "lines"]
    from HeartCompletionLib.inference.complete_cli import _parser

    args = _parser().parse_args(command[3:])  # every option it writes is one of heart-complete's
    assert (args.protocol, args.checkpoint, args.input, args.output, args.structures, args.replace, args.device,
            args.table, args.decode) == ("lines", "ck", "in.nrrd", "out.nrrd", ["LAA"], True, "cpu", "t.json", "exact")


def test_protocol_lines_give_the_same_output_as_the_progress_bar(checkpoints, hearts, tmp_path, capsys):
    bar, lines = tmp_path / "bar.nii.gz", tmp_path / "lines.nii.gz"
    common = ["--checkpoint", checkpoints["ten"], "--input", hearts["partial"], "--device", "cpu", "--threads", "1"]
    code, err = run_cli([*common, "--output", bar], capsys)
    assert code == ExitCode.OK, err
    assert main([str(a) for a in [*common, "--output", lines, "--protocol", "lines"]]) == ExitCode.OK
    out = capsys.readouterr().out
    events = lines_of(out)
    fractions = [e.fraction for e in events if e.kind == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    (result,) = [e.payload for e in events if e.kind == "result"]
    assert result["output"] == str(lines.resolve()) and result["completed_labels"] == list(DROPPED)
    assert any(e.kind == "log" and "completed RA, Aorta, PA" in e.message for e in events)
    assert not [e for e in events if e.kind == "error"]
    assert np.array_equal(read_label_map(bar).labels, read_label_map(lines).labels)


def run_both(argv, capsys) -> tuple[tuple[int, str], tuple[int, list]]:
    """``(exit code, stderr)`` of heart-complete and ``(exit code, events)`` of the same options with
    ``--protocol lines`` (argparse's refusals included)."""
    outcomes = []
    for extra in ([], ["--protocol", "lines"]):
        try:
            code = main([str(a) for a in [*argv, *extra]])
        except SystemExit as exc:
            code = exc.code
        outcomes.append((code, capsys.readouterr()))
    (bar_code, bar), (lines_code, lines) = outcomes
    return (bar_code, bar.err), (lines_code, lines_of(lines.out))


def test_same_errors_and_exit_codes_with_and_without_the_protocol(checkpoints, hearts, tmp_path, capsys):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a label map")
    cases = [  # (options, exit code, text in the message)
        (["--input", garbage, "--output", tmp_path / "o.nii.gz"], ExitCode.FAILED, "garbage.nii.gz"),  # the case
        (["--input", tmp_path / "none.nii.gz", "--output", tmp_path / "o.nii.gz"], ExitCode.USAGE, "input not found"),
        (["--input", hearts["partial"], "--output", hearts["partial"]], ExitCode.USAGE, "overwrite the input"),
        (["--input", hearts["partial"], "--output", tmp_path / "o.nii.gz", "--margin_mm", "-1"], ExitCode.USAGE,
         "--margin_mm"),
        (["--input", hearts["partial"], "--output", tmp_path / "o.nii.gz", "--structures", "Spleen"], ExitCode.USAGE,
         "Spleen"),
    ]
    for options, expected, text in cases:
        (code, err), (lines_code, events) = run_both(["--checkpoint", checkpoints["ten"], *options], capsys)
        assert code == expected and text in err and "Traceback" not in err, (options, err)
        errors = [e.message for e in events if e.kind == "error"]
        assert lines_code == expected and len(errors) == 1 and text in errors[0], (options, events)
        assert not [e for e in events if e.kind == "result"]
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.slow
def test_background_process_reports_an_unreadable_label_map_as_a_failed_case(checkpoints, tmp_path):
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"not a label map")
    code, events = run_process(checkpoints["ten"], garbage, tmp_path / "o.nrrd")
    (error,) = [e.message for e in events if e.kind == "error"]
    assert code == ExitCode.FAILED and "garbage.nrrd" in error
    assert not [e for e in events if e.kind == "result"] and not (tmp_path / "o.nrrd").exists()
