"""``HeartCompletion/HeartCompletion.py`` itself: its Logic, driven the way its Widget drives it.

The 3D Slicer application cannot be installed on these machines, and ``slicer-core`` (real MRML,
segmentations, storage nodes) lacks the application layer the module file imports at the top:
``qt``, ``slicer.i18n``, ``slicer.parameterNodeWrapper`` and ``slicer.ScriptedLoadableModule``.
Only those are replaced here, by the smallest stand-ins that let the file import (identity
translation, empty base classes, a no-op parameter-node decorator), and only where they are
missing: inside Slicer the real ones are used. Everything the Logic does then runs for real: the
MRML scene, segment mapping, the background completion process with the tiny checkpoint trained
in this session, result segments, undo and the three exports. The Widget (pure Qt wiring) and the
self-test (``slicer.modules``) still need a real Slicer: docs/slicer.md, "Build and test".
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

import test_slicer_logic  # noqa: E402
from test_slicer_logic import DROPPED, TABLE, partial_segmentation  # noqa: E402

from HeartCompletionLib import slicer_bridge  # noqa: E402

scene = test_slicer_logic.scene  # the same fresh-MRML-scene fixture
MODULE_FILE = Path(__file__).resolve().parents[1] / "HeartCompletion" / "HeartCompletion.py"


def _stand_ins() -> dict[str, types.ModuleType]:
    """The application-layer modules the module file imports, for those slicer-core lacks."""
    qt = types.ModuleType("qt")
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda _context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: tuple(choices)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args, **kwargs: None}))
    return {"qt": qt, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": scripted}


@contextlib.contextmanager
def module_file():
    """``HeartCompletion.py`` imported as Slicer imports it (stand-ins only for what is missing)."""
    added = {}
    for name, stand_in in _stand_ins().items():
        try:
            importlib.import_module(name)
        except ImportError:
            added[name] = stand_in
    sys.modules.update(added)
    try:
        spec = importlib.util.spec_from_file_location("HeartCompletionModuleFile", MODULE_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def module():
    with module_file() as mod:
        yield mod


@pytest.fixture(scope="module")
def heart():
    from HeartCompletionLib.synthetic import synthetic_label_map

    return synthetic_label_map(seed=5, spacing_mm=3.0)


def test_logic_completes_undoes_and_exports_like_the_panel(module, scene, heart, tiny_checkpoint, tmp_path):
    from HeartCompletionLib.labelmap_io import read_label_map

    logic = module.HeartCompletionLogic()
    node, volume = partial_segmentation(scene, heart)
    mappings = logic.segmentMappings(node)
    unmapped = [m.segment.name for m in mappings if m.structure is None]
    assert unmapped == ["Tumor"]
    structures = [s.name for s in logic.defaultStructures(mappings)]  # what the panel ticks
    assert sorted(structures) == sorted(DROPPED)

    description = logic.checkpointDescription(str(tiny_checkpoint))
    assert description.startswith("Structures: Myocardium, LA, LV") and "format version" in description
    assert logic.checkpointDescription("").startswith("Choose")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    assert logic.checkpointDescription(str(broken)).startswith("Not usable")
    assert logic.runsOnCpu("cpu") and "PyTorch" in logic.torchDescription()

    before = {info.segment_id: info.name for info in slicer_bridge.segment_infos(node)}
    process = logic.startCompletion(node, mappings, structures, str(tiny_checkpoint), "cpu", False, volume)
    events = process.wait(timeout_s=300)
    assert process.returncode == 0, [e.message for e in events]
    (result,) = [e.payload for e in events if e.kind == "result"]
    added = logic.finishCompletion(node, mappings, result["completed_labels"], False, False)
    assert sorted(added) == sorted(DROPPED)
    after = {info.segment_id: info.name for info in slicer_bridge.segment_infos(node)}
    assert {k: v for k, v in after.items() if k in before} == before  # existing segments kept, names too
    assert sorted(v for k, v in after.items() if k not in before) == sorted(DROPPED)
    logic.cleanupTemporaryFiles()
    assert logic.workDir is None

    exported = logic.export("labelmap", node, str(tmp_path), volume)
    label_map = read_label_map(exported[0])
    assert set(np.unique(label_map.labels)) <= {0, *(s.label for s in TABLE)}
    assert (tmp_path / "heart.nii.gz").is_file()
    assert logic.export("segnrrd", node, str(tmp_path))[0].name == "heart.seg.nrrd"
    meshes = logic.export("meshes", node, str(tmp_path), volume, "OBJ")
    assert meshes and all(p.suffix == ".obj" and p.stat().st_size > 0 for p in meshes)
    assert all(b"SPACE=RAS" in p.read_bytes().splitlines()[0] for p in meshes)  # else Slicer mirrors them

    logic.undoLastCompletion()
    assert {info.segment_id: info.name for info in slicer_bridge.segment_infos(node)} == before
    with pytest.raises(RuntimeError, match="no completion to undo"):
        logic.undoLastCompletion()


def test_logic_refuses_incomplete_input_with_a_message(module, scene, heart, tiny_checkpoint, tmp_path):
    logic = module.HeartCompletionLogic()
    node, _volume = partial_segmentation(scene, heart)
    mappings = logic.segmentMappings(node)
    with pytest.raises(ValueError, match="Select a segmentation"):
        logic.startCompletion(None, mappings, ["LAA"], str(tiny_checkpoint), "cpu", False, None)
    with pytest.raises(ValueError, match="checkpoint"):
        logic.startCompletion(node, mappings, ["LAA"], str(tmp_path / "missing.safetensors"), "cpu", False, None)
    with pytest.raises(ValueError, match="at least one structure"):
        logic.startCompletion(node, mappings, [], str(tiny_checkpoint), "cpu", False, None)
    with pytest.raises(ValueError, match="export folder"):
        logic.export("labelmap", node, "")
    assert logic.workDir is None  # nothing was started


def test_first_use_installs_only_what_slicer_lacks(module, monkeypatch):
    """``ensurePackages``/``ensureRequirements`` ask pip (or the PyTorch extension) for exactly the
    missing packages; the installers themselves are recorded instead of run (no network here)."""
    import importlib.util as importlib_util

    calls = []
    monkeypatch.setattr(slicer.util, "pip_install", calls.append, raising=False)
    real_find_spec = importlib_util.find_spec
    monkeypatch.setattr(importlib_util, "find_spec",
                        lambda name, *args: None if name in ("nrrd", "skimage") else real_find_spec(name, *args))
    logic = module.HeartCompletionLogic()
    logic.ensurePackages()
    assert calls == [["pynrrd", "scikit-image"]]
    assert not {"numpy", "vtk", "SimpleITK", "simpleitk"} & set(module.EXTRA_REQUIREMENTS.values())

    # torch present: nothing to confirm, only the missing file-format packages
    calls.clear()
    assert logic.ensureRequirements() is True and calls == [["pynrrd", "scikit-image"]]

    # torch missing, user declines: nothing installed
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    answers = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: answers.pop(0), raising=False)
    answers.append(False)
    calls.clear()
    assert logic.ensureRequirements() is False and calls == []

    # torch missing, no PyTorch extension: pip fallback, then the packages
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    answers.append(True)
    assert logic.ensureRequirements() is True and calls == ["torch", ["pynrrd", "scikit-image"]]

    # torch missing, PyTorch extension present: it installs torch (with the right CUDA build)
    installs = []
    extension = types.ModuleType("PyTorchUtils")
    extension.PyTorchUtilsLogic = lambda: types.SimpleNamespace(
        installTorch=lambda askConfirmation: installs.append(askConfirmation) or "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", extension)
    answers.append(True)
    calls.clear()
    assert logic.ensureRequirements() is True and installs == [False] and calls == [["pynrrd", "scikit-image"]]

    # the extension's installation fails: a clear error, nothing else installed
    extension.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=lambda askConfirmation: None)
    answers.append(True)
    calls.clear()
    with pytest.raises(RuntimeError, match="PyTorch installation failed"):
        logic.ensureRequirements()
    assert calls == []
