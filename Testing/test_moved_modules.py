"""Old module paths (before the subpackages) keep working: issue 12, item 5.

Scripts, notebooks and Slurm job files written against the flat packages import the same module
objects, with a ``DeprecationWarning`` naming the new path, and ``python -m OLD`` runs the new
command. Real imports and real subprocesses; nothing is stubbed.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import heart_training  # noqa: F401  (installs the finder for heart_training's old names too)
import pytest

from HeartCompletionLib.moved_modules import MOVED, PACKAGE_FORMERLY_MODULE

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"HeartCompletionLib": ROOT / "HeartCompletionLib", "heart_training": ROOT / "training"}


def _file_of(name: str) -> Path:
    top, *rest = name.split(".")
    return FOLDERS[top].joinpath(*rest).with_suffix(".py")


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module_with_a_warning(old):
    new = MOVED[old]
    assert _file_of(new).is_file() and not _file_of(old).exists()
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the real module's spec, not the alias's


def test_the_table_is_one_to_one_and_flat_to_nested():
    """Each old flat module has one new home, no two old names share one, and no old name is also a
    current module (it would shadow the file)."""
    old_flat = set(MOVED) | set(PACKAGE_FORMERLY_MODULE)
    assert all(old.count(".") == 1 for old in old_flat)
    assert all(new.count(".") == 2 for new in [*MOVED.values(), *PACKAGE_FORMERLY_MODULE.values()])
    assert len(set(MOVED.values())) == len(MOVED)
    assert not any(_file_of(old).exists() for old in old_flat)


def test_old_names_of_modules_that_became_packages():
    with pytest.warns(DeprecationWarning, match="HeartCompletionLib.structures.table.StructureTable"):
        from HeartCompletionLib.structures import StructureTable
    from HeartCompletionLib.structures.table import StructureTable as new

    assert StructureTable is new
    with pytest.warns(DeprecationWarning):
        from HeartCompletionLib.model import HeartVecSet
    from HeartCompletionLib.model.vecset import HeartVecSet as new_model

    assert HeartVecSet is new_model
    with pytest.warns(DeprecationWarning):
        from HeartCompletionLib.geometry import LPS_TO_RAS
    assert LPS_TO_RAS.shape == (4, 4)
    with pytest.raises(ImportError):
        from HeartCompletionLib.model import no_such_name  # noqa: F401
    import HeartCompletionLib.model as package

    with warnings.catch_warnings():  # a module the old one imported is not one of its names, and
        warnings.simplefilter("error")  # asking (as torch's compiler does) does not warn
        assert not hasattr(package, "torch")
        assert not hasattr(package, "math")


def test_new_paths_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error'); "
            "import heart_training.train.trainer, heart_training.evaluation.evaluate, heart_training.data.prepare_cli, "
            "HeartCompletionLib.inference.complete_cli, HeartCompletionLib.model.registry")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("old,prog", [("heart_training.trainer", "heart-train"),
                                      ("HeartCompletionLib.complete_cli", "heart-complete")])
def test_python_m_old_path_runs_the_command(old, prog):
    """``torchrun -m heart_training.trainer`` in an existing job script still starts the trainer."""
    proc = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", old, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {prog}")
    assert f"{old} moved to {MOVED[old]}" in proc.stderr


def test_python_m_old_path_passes_the_exit_code(tmp_path):
    missing = tmp_path / "no_such_input.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "HeartCompletionLib.complete_cli", "--checkpoint", "synthetic-demo",
                           "--input", str(missing), "--output", str(tmp_path / "out.nii.gz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr
