"""The data gate refuses broken data before training; a NaN loss stops the run naming the batch."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_training import write_analytic_case, write_case_lists
from heart_training.config import load_config
from heart_training.data.case_format import load_case, save_case
from heart_training.data.data_gate import DataGateError, check_case
from heart_training.data.dataset import CaseRef
from heart_training.train.engine import NonFiniteLossError
from heart_training.train.trainer import main, train

SMALL = dict(num_surface=6000, num_volume=3000, num_near=4000)


def _cfg(data_dir, out, *extra):
    return load_config("tiny_test", [f"data.datasets.0.data_dir={data_dir}", f"run.output_dir={out}",
                                     "optim.max_steps=2", "run.threads=1", *extra])


def test_good_case_passes_every_check(tmp_path):
    path = write_analytic_case(tmp_path / "good.npz", seed=0, **SMALL)
    assert check_case(CaseRef("t", path, "good")) == []


@pytest.mark.parametrize(
    "factors, message",
    [
        (dict(distance_factor=2.5), "different units"),  # distances in 0.4 mm voxels, points in mm
        (dict(distance_factor=0.001, point_factor=0.001), "tens of mm"),  # everything in metres
        (dict(distance_factor=0.01), "median \\|sdf\\|"),  # distances already divided by S
    ],
)
def test_gate_rejects_wrong_units_naming_the_file(tmp_path, factors, message):
    path = write_analytic_case(tmp_path / "wrong.npz", seed=0, **SMALL, **factors)
    problems = check_case(CaseRef("t", path, "wrong"))
    assert any(message.replace("\\", "") in p.replace("\\", "") or __import__("re").search(message, p)
               for p in problems), problems
    assert all(str(path) in p for p in problems)


@pytest.mark.slow
def test_trainer_refuses_to_start_on_voxel_distances(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_analytic_case(data / "vox.npz", seed=0, distance_factor=2.5, **SMALL)
    write_case_lists(data, ["vox"], [])
    with pytest.raises(DataGateError, match=r"vox.npz.*different units"):
        train(_cfg(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "state_last.pt").exists()  # nothing trained, nothing saved
    # the CLI turns it into exit status 2 and a message, not a traceback
    code = main(["--config", "tiny_test", f"data.datasets.0.data_dir={data}", f"--output_dir={tmp_path / 'cli'}",
                 "run.threads=1"])
    assert code == 2


def test_gate_rejects_unsigned_distances(tmp_path):
    path = write_analytic_case(tmp_path / "unsigned.npz", seed=0, **SMALL)
    case = load_case(path)
    meta = case.pop("meta")
    for key in ("volume_sdf", "near_sdf"):
        case[key] = np.abs(case[key])
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    save_case(path, case, meta)
    assert any("inside" in p for p in check_case(CaseRef("t", path, "unsigned")))


def test_nan_loss_stops_naming_the_cases(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = write_analytic_case(data / "poisoned.npz", seed=0, **SMALL)
    case = load_case(path)
    meta = {k: v for k, v in case.pop("meta").items() if k not in ("format", "format_version")}
    case["surface_points"][::50] = np.nan  # a broken input surface: the encoder sees NaN
    save_case(path, case, meta)
    write_case_lists(data, ["poisoned"], [])
    # the flag is read after the step (no sync inside it), but before anything is logged or saved:
    # a checkpoint every step and a log line every step still never see the non-finite weights
    with pytest.raises(NonFiniteLossError, match=r"step 0.*poisoned"):
        train(_cfg(data, tmp_path / "run", "run.data_gate=false", "run.checkpoint_every=1", "run.log_every=1"))
    assert not (tmp_path / "run" / "state_last.pt").exists()
    assert not list((tmp_path / "run").glob("*.safetensors"))
    assert '"split": "train"' not in (tmp_path / "run" / "log.jsonl").read_text()
    # with the gate on, the same data never reaches a step
    with pytest.raises(DataGateError, match="non-finite"):
        train(_cfg(data, tmp_path / "run2"))


def test_thick_slices_pass_and_voxel_distances_on_them_do_not(tmp_path):
    """A short-axis-like stack (1.5625 x 1.5625 x 10 mm, as ACDC): its distances are to the voxel
    staircase, its surface samples on a mesh sloping between slices, so near the surface the two
    differ by design; the gate compares them beyond half a slice. Distances in in-plane voxels
    (x 1 / 1.5625) are still refused."""
    from heart_training.data.case_format import load_case, save_case
    from heart_training.data.prepare import PrepareOptions, prepare_case

    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    stack = synthetic_label_map(seed=3, spacing_mm=(1.5625, 1.5625, 10.0))
    write_label_map(stack, tmp_path / "stack.nii.gz")
    options = PrepareOptions(num_surface=60_000, num_volume=20_000, num_near=40_000)
    prepare_case(tmp_path / "stack.nii.gz", tmp_path / "stack.npz", options)
    assert check_case(CaseRef("t", tmp_path / "stack.npz", "stack")) == []
    case = load_case(tmp_path / "stack.npz")
    meta = {k: v for k, v in case.pop("meta").items() if k not in ("format", "format_version")}
    for key in ("volume_sdf", "near_sdf"):
        case[key] = case[key] / 1.5625
    save_case(tmp_path / "voxels.npz", case, meta)
    assert any("different units" in p for p in check_case(CaseRef("t", tmp_path / "voxels.npz", "voxels")))
