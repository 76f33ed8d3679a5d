"""The model registry (``HeartCompletionLib/model/registry.py``, ``HeartCompletionLib/model/bundled/models.json``).

Real files throughout: registries written to temporary models folders (``HEART_MODELS_DIR`` or the
``folder`` argument), real (untrained, ``tiny``) checkpoints saved there, ``heart-complete`` and
the panel's background process run end to end with a registered name. The last test uses the
model the package ships; it fails, on purpose, until that file is committed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.errors import ExitCode
from HeartCompletionLib.inference import completion_process
from HeartCompletionLib.inference.complete_cli import main as complete_main
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.model.checkpoint import CheckpointError
from HeartCompletionLib.model.configs import get_config
from HeartCompletionLib.model.registry import (
    BUNDLED_MODELS_DIR,
    MODELS_DIR_ENV,
    RegistryError,
    find_model,
    load_model,
    load_registry,
    resolve_checkpoint,
)
from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()
WARNING = "synthetic hearts only: not for patient data"
DROPPED = (4, 6, 7)  # RA, Aorta, PA


def save_untrained_checkpoint(path: Path, table: StructureTable = TABLE) -> Path:
    """A real ``tiny`` inference checkpoint (untrained weights) for ``table``: a second to write."""
    import torch

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.model.checkpoint import save_inference_checkpoint
    from HeartCompletionLib.model.configs import get_config
    from HeartCompletionLib.model.vecset import HeartVecSet

    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", len(table)))
    return save_inference_checkpoint(path, model, table, Normalization(), phase=1, data_summary={"cases": 0})


def entry(name="toy", file="toy.safetensors", structures=None, **changes) -> dict:
    raw = {"name": name, "file": file, "structures": list(structures or TABLE.names),
           "trained_on": "nothing (untrained test weights)", "figures": {}, "warning": WARNING,
           "description": "a test model"}
    raw.update(changes)
    return raw


def write_registry(folder: Path, entries) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "models.json"
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory) -> Path:
    return save_untrained_checkpoint(tmp_path_factory.mktemp("untrained") / "tiny.safetensors")


@pytest.fixture()
def models(tmp_path, untrained_checkpoint) -> Path:
    """A models folder with one installed model ``toy`` and one registered but absent, ``ghost``."""
    folder = tmp_path / "models"
    write_registry(folder, [entry(), entry("ghost", "ghost.safetensors")])
    shutil.copy(untrained_checkpoint, folder / "toy.safetensors")
    return folder


@pytest.fixture(scope="module")
def partial_heart(tmp_path_factory) -> Path:
    heart = synthetic_label_map(seed=0, spacing_mm=3.0)
    labels = np.where(np.isin(heart.labels, DROPPED), 0, heart.labels)
    return write_label_map(LabelMap(labels, heart.ijk_to_ras), tmp_path_factory.mktemp("partial") / "partial.nii.gz")


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "cannot read the model registry"),
        (json.dumps({"name": "toy"}), "must be a JSON list"),
        (json.dumps([entry(warning="")]), "'warning' must be a non-empty string"),
        (json.dumps([{k: v for k, v in entry().items() if k != "structures"}]), "missing ['structures']"),
        (json.dumps([entry(), entry()]), "registered twice"),
        (json.dumps([entry(file="/abs/toy.safetensors")]), "must be relative to the models folder"),
        (json.dumps([entry(file="../toy.safetensors")]), "must be relative to the models folder"),
        (json.dumps([entry(structures=["LA", "LA"])]), "non-empty list of distinct names"),
        (json.dumps([entry(figures=[1, 2])]), "'figures' must be an object"),
        (json.dumps(["toy"]), "expected an object"),
    ],
)
def test_registry_parse_errors_name_the_file(tmp_path, content, expected):
    registry = write_registry(tmp_path / "models", content)
    with pytest.raises(RegistryError) as info:
        load_registry(tmp_path / "models")
    assert str(registry) in str(info.value) and expected in str(info.value)


def test_shipped_registry_is_valid_and_warns():
    (demo,) = [e for e in load_registry(BUNDLED_MODELS_DIR) if e.name == "synthetic-demo"]
    assert demo.file == "synthetic_demo.safetensors" and demo.path.parent == BUNDLED_MODELS_DIR
    assert list(demo.structures) == TABLE.names
    assert demo.warning == WARNING and demo.trained_on and demo.description
    assert isinstance(demo.figures, dict)
    assert WARNING in demo.describe()


def test_env_variable_points_at_another_models_folder(models, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(models))
    assert [e.name for e in load_registry()] == ["toy", "ghost"]
    assert find_model("toy").path == models / "toy.safetensors"
    assert find_model("synthetic-demo") is None


# --- resolution --------------------------------------------------------------------------------


def test_name_resolves_to_the_file_in_the_models_folder(models):
    path, found = resolve_checkpoint("toy", models)
    assert path == models / "toy.safetensors" and found.name == "toy" and found.warning == WARNING


def test_an_existing_path_wins_over_a_name(models, untrained_checkpoint, tmp_path, monkeypatch):
    path, found = resolve_checkpoint(untrained_checkpoint, models)
    assert path == untrained_checkpoint and found is None
    # a file in the working folder called like a registered model is that file, not the model
    monkeypatch.chdir(tmp_path)
    shutil.copy(untrained_checkpoint, tmp_path / "toy")
    path, found = resolve_checkpoint("toy", models)
    assert path == Path("toy") and found is None


def test_unknown_name_lists_the_registered_names(models):
    with pytest.raises(RegistryError, match=r"'tyo' is neither a checkpoint file nor a registered model name "
                                            r"\(registered: toy, ghost\)"):
        resolve_checkpoint("tyo", models)
    with pytest.raises(RegistryError, match="registered: none in"):
        resolve_checkpoint("toy", models.parent / "empty")


def test_missing_bundled_file_says_it_is_not_installed(models):
    with pytest.raises(RegistryError, match=r"the bundled model 'ghost' is not installed: .*ghost.safetensors is missing"):
        resolve_checkpoint("ghost", models)


def test_structure_table_mismatch_is_refused_with_both_lists(models):
    swapped = TABLE.names.copy()
    swapped[2], swapped[4] = swapped[4], swapped[2]  # LV <-> RV
    write_registry(models, [entry(structures=swapped)])
    with pytest.raises(RegistryError) as info:
        load_model("toy", folder=models)
    message = str(info.value)
    assert "toy.safetensors" in message and str(swapped) in message and str(TABLE.names) in message
    # the same checkpoint by path is not held to the registry's list
    checkpoint, found = load_model(models / "toy.safetensors", folder=models)
    assert found is None and checkpoint.table.names == TABLE.names
    # and a name still goes through the checkpoint's own checks (format, expected table)
    write_registry(models, [entry()])
    table16 = StructureTable.from_json(Path(__file__).resolve().parents[1] / "training" / "configs" / "structures_16.json")
    with pytest.raises(CheckpointError, match="other structures"):
        load_model("toy", expected_table=table16, folder=models)


# --- heart-complete and the background process with a name --------------------------------------


def test_heart_complete_with_a_registered_name_warns_and_completes(models, partial_heart, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv(MODELS_DIR_ENV, str(models))
    out = tmp_path / "completed.nii.gz"
    code = complete_main(["--checkpoint", "toy", "--input", str(partial_heart), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"model 'toy' ({models / 'toy.safetensors'}): {WARNING}" in err  # even with --quiet
    given, done = read_label_map(partial_heart), read_label_map(out)
    assert done.same_geometry(given)
    assert np.array_equal(done.labels[given.labels > 0], given.labels[given.labels > 0])

    # a path: no registry model, no warning
    code = complete_main(["--checkpoint", str(models / "toy.safetensors"), "--input", str(partial_heart),
                          "--output", str(tmp_path / "by_path.nii.gz"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and WARNING not in err

    # an unknown name and a registered but absent model are usage errors, before any input is read
    code = complete_main(["--checkpoint", "tyo", "--input", str(partial_heart), "--output", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "registered: toy, ghost" in err
    code = complete_main(["--checkpoint", "ghost", "--input", str(partial_heart), "--output", str(tmp_path / "x.nii.gz")])
    assert code == 2 and "'ghost' is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_heart_complete_never_picks_a_model_silently(partial_heart, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        complete_main(["--input", str(partial_heart), "--output", str(tmp_path / "o.nii.gz")])
    assert info.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_help_names_the_registered_models():
    out = subprocess.run([sys.executable, "-m", "HeartCompletionLib.inference.complete_cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "registered model" in out.stdout and "synthetic-demo" in out.stdout


@pytest.mark.slow
def test_background_process_resolves_a_name_and_logs_the_warning(models, partial_heart, tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(models))  # inherited by the child
    output = tmp_path / "out.nrrd"
    process = completion_process.CompletionProcess(
        completion_process.build_command("toy", partial_heart, output, device="cpu"))
    events = process.wait(timeout_s=300)
    assert process.returncode == 0, [e.message for e in events]
    assert any(e.kind == "log" and WARNING in e.message and "'toy'" in e.message for e in events)
    (result,) = [e.payload for e in events if e.kind == "result"]
    assert sorted(result["completed_labels"]) == list(DROPPED)
    assert read_label_map(output).same_geometry(read_label_map(partial_heart))

    process = completion_process.CompletionProcess(
        completion_process.build_command("ghost", partial_heart, tmp_path / "ghost.nrrd", device="cpu"))
    events = process.wait(timeout_s=300)
    assert process.returncode == ExitCode.BAD_INPUT
    assert any(e.kind == "error" and "'ghost' is not installed" in e.message for e in events)


# --- the model the package ships -----------------------------------------------------------------


def test_shipped_synthetic_demo_is_installed_loads_and_completes(tmp_path, monkeypatch, capsys):
    """Fails until ``HeartCompletionLib/model/bundled/synthetic_demo.safetensors`` is committed (on purpose)."""
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    path, demo = resolve_checkpoint("synthetic-demo")
    assert demo is not None and path == BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    assert path.stat().st_size <= 10 * 1024 * 1024, "the bundled model must stay under 10 MB"
    checkpoint, _ = load_model("synthetic-demo")  # also checks the registry's structure list
    assert checkpoint.table.names == list(demo.structures)
    # the CPU-inference size is the one that ships (its CT timing in docs/benchmarks.md is this model's)
    assert checkpoint.config == get_config("compact", len(checkpoint.table))

    heart = synthetic_label_map(seed=11, spacing_mm=2.5)
    labels = np.where(np.isin(heart.labels, DROPPED), 0, heart.labels)
    source = write_label_map(LabelMap(labels, heart.ijk_to_ras), tmp_path / "partial.nii.gz")
    out = tmp_path / "completed.nii.gz"
    code = complete_main(["--checkpoint", "synthetic-demo", "--input", str(source), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert WARNING in err
    done = read_label_map(out)
    for label in DROPPED:  # a model trained on synthetic hearts finds these large structures
        predicted, truth = done.labels == label, heart.labels == label
        dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
        assert dice > 0.5, f"{TABLE.by_label(label).name}: Dice {dice:.2f}"
