"""The module's logic (``HeartCompletionModule.logic``), driven the way the panel drives it.

The logic has no Qt and needs no Slicer application: it imports here with ``slicer-core`` alone
(real MRML, segmentations, storage nodes), with no stand-in for ``qt``, ``slicer.i18n`` or the
scripted-module base classes. Everything it does runs for real: the MRML scene, segment mapping,
the background completion process with the tiny checkpoint trained in this session (started,
polled, cancelled, finished as the panel's timer does), result segments, undo, the three exports
and the version checks of what first use installs. The panel (``HeartCompletionModule.widget``,
Qt wiring) and the self-test still need a real Slicer; ``Testing/test_slicer_widget_static.py``
checks the panel against its .ui file statically.
"""

from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

import test_slicer_logic  # noqa: E402
from HeartCompletionModule import install, segments  # noqa: E402
from HeartCompletionModule.logic import HeartCompletionLogic  # noqa: E402
from test_slicer_logic import DROPPED, TABLE, partial_segmentation  # noqa: E402

scene = test_slicer_logic.scene  # the same fresh-MRML-scene fixture
APP_LAYER = ("qt", "ctk", "slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule")


@pytest.fixture(scope="module")
def heart():
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    return synthetic_label_map(seed=5, spacing_mm=3.0)


def test_logic_imports_without_the_application_layer():
    """Importing the logic pulled in none of Slicer's application modules (nor stand-ins for them)."""
    assert not [name for name in APP_LAYER if name in sys.modules]


class Recorder:
    """Connects to every signal of a logic and records what it emitted, in order."""

    def __init__(self, logic):
        self.events = []
        for name in ("progressChanged", "logged", "runningChanged", "finished", "failed"):
            getattr(logic, name).connect(lambda *args, name=name: self.events.append((name, *args)))

    def of(self, name):
        return [e[1:] for e in self.events if e[0] == name]


_LOGICS = []  # every logic a test made: its warm worker ends after the test (the module's cleanup)


@pytest.fixture(autouse=True)
def _shut_down_logics():
    yield
    while _LOGICS:
        _LOGICS.pop().shutdown()


def new_logic(**kwargs):
    logic = HeartCompletionLogic(**kwargs)
    _LOGICS.append(logic)
    return logic


def recorded_panel(scene, heart):
    """``(logic, recorder of its signals, segmentation node, volume, segment mappings)`` of a
    partial heart loaded into the scene, as the panel starts from."""
    logic = new_logic()
    recorder = Recorder(logic)
    node, volume = partial_segmentation(scene, heart)
    return logic, recorder, node, volume, logic.segmentMappings(node)


def poll_until_done(logic, timeout_s=300):
    """What the panel's timer does: poll until the run ends."""
    deadline = time.monotonic() + timeout_s
    while logic.isRunning:
        assert time.monotonic() < deadline, "the completion did not finish"
        logic.poll()
        time.sleep(0.05)


def test_logic_completes_undoes_and_exports_like_the_panel(scene, heart, tiny_checkpoint, tmp_path):
    from HeartCompletionLib.io.labelmap_files import read_label_map

    logic = new_logic()
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

    before = {info.segment_id: info.name for info in segments.segment_infos(node)}
    process = logic.startCompletion(node, mappings, structures, str(tiny_checkpoint), "cpu", False, volume)
    events = process.wait(timeout_s=300)
    assert process.returncode == 0, [e.message for e in events]
    (result,) = [e.payload for e in events if e.kind == "result"]
    added = logic.finishCompletion(node, mappings, result["completed_labels"], False, False)
    assert sorted(added) == sorted(DROPPED)
    after = {info.segment_id: info.name for info in segments.segment_infos(node)}
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
    assert {info.segment_id: info.name for info in segments.segment_infos(node)} == before
    with pytest.raises(RuntimeError, match="no completion to undo"):
        logic.undoLastCompletion()


def test_logic_refuses_incomplete_input_with_a_message(scene, heart, tiny_checkpoint, tmp_path):
    logic = new_logic()
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


def test_the_panels_run_start_poll_finish_and_undo(scene, heart, tiny_checkpoint):
    """``start`` / ``poll`` (the panel's timer) / ``finished``: the signals the panel follows, in order."""
    logic, recorder, node, volume, mappings = recorded_panel(scene, heart)
    structures = [s.name for s in logic.defaultStructures(mappings)]
    logic.start(node, mappings, structures, str(tiny_checkpoint), "cpu", False, volume, showSurfaces=False)
    assert logic.isRunning and logic.workDir is not None
    with pytest.raises(RuntimeError, match="already running"):
        logic.start(node, mappings, structures, str(tiny_checkpoint), "cpu", False, volume)
    poll_until_done(logic)
    assert recorder.of("failed") == []
    assert recorder.of("runningChanged") == [(True,), (False,)]
    (added,) = recorder.of("finished")
    assert sorted(added[0]) == sorted(DROPPED)
    fractions = [fraction for fraction, _message in recorder.of("progressChanged")]
    assert fractions and fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    assert [e[0] for e in recorder.events][-2:] == ["runningChanged", "finished"]  # button back, then results
    assert logic.workDir is None and not logic.isRunning
    assert sorted(segments.segment_infos(node)[i].name for i in range(len(mappings), len(mappings) + 3)) == sorted(DROPPED)
    logic.undoLastCompletion()
    assert len(segments.segment_infos(node)) == len(mappings)


def test_cancel_stops_the_process_and_adds_nothing(scene, heart, tiny_checkpoint):
    logic, recorder, node, volume, mappings = recorded_panel(scene, heart)
    before = [info.segment_id for info in segments.segment_infos(node)]
    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "cpu", False, volume)
    work_dir = logic.workDir
    process = logic._run.process
    assert logic.cancel() is True
    assert process._process.poll() is not None  # the child is gone
    assert not logic.isRunning and logic.workDir is None
    from pathlib import Path

    assert not Path(work_dir).exists()
    logic.poll()  # a late timer tick does nothing
    assert recorder.of("runningChanged") == [(True,), (False,)] and recorder.of("finished") == []
    assert [info.segment_id for info in segments.segment_infos(node)] == before
    assert logic.cancel() is False  # nothing to cancel


def test_a_second_completion_reuses_the_warm_worker(scene, heart, tiny_checkpoint):
    """The panel keeps its completion process between runs with the same model and device (only
    the first run starts Python and loads the model); another device, a changed checkpoint file or
    a cancelled run start a new one; ``shutdown`` (the module's cleanup) ends it."""
    import os

    logic, recorder, node, volume, mappings = recorded_panel(scene, heart)
    masks = []
    for _ in range(2):
        logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "cpu", False, volume, showSurfaces=False)
        poll_until_done(logic)
        (laa,) = [i for i in segments.segment_infos(node) if i.name == "LAA"]
        masks.append(segments.segment_mask(node, laa.segment_id, heart.shape, heart.ijk_to_ras))
        logic.undoLastCompletion()
        if len(masks) == 1:
            worker = logic._worker
            assert worker is not None and worker.alive and not worker.busy
    assert logic._worker is worker and worker.alive, "the second run was not served by the same process"
    np.testing.assert_array_equal(masks[0], masks[1])
    assert recorder.of("failed") == [] and len(recorder.of("finished")) == 2 and logic.workDir is None

    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "auto", False, volume, showSurfaces=False)
    poll_until_done(logic)
    assert logic._worker is not worker and not worker.alive  # another device: the old one ended
    worker = logic._worker
    stat = os.stat(tiny_checkpoint)
    os.utime(tiny_checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a retrained file, same name
    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "auto", False, volume, showSurfaces=False)
    poll_until_done(logic)
    assert logic._worker is not worker and not worker.alive
    worker = logic._worker
    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "auto", False, volume, showSurfaces=False)
    assert logic.cancel() and not worker.alive
    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "auto", False, volume, showSurfaces=False)
    poll_until_done(logic)
    assert logic._worker is not worker and recorder.of("failed") == [] and len(recorder.of("finished")) == 5
    worker = logic._worker
    logic.shutdown()
    assert logic._worker is None and not worker.alive and worker._process.returncode == 0


def test_warm_up_starts_the_worker_the_first_apply_uses(scene, heart, tiny_checkpoint, monkeypatch, tmp_path):
    """Entering the module starts the completion process ahead of Apply (never installing
    anything, never for an unusable checkpoint or while a run is going on); Apply then uses it."""
    logic, recorder, node, volume, mappings = recorded_panel(scene, heart)
    assert logic.warmUp("", "cpu") is False and logic.warmUp(str(tmp_path / "missing.safetensors"), "cpu") is False
    assert logic.warmUp("no-such-registered-model", "cpu") is False and logic._worker is None
    installer, calls, _ = make_install(monkeypatch, {**CURRENT, "pynrrd": None})
    logic.installLogic, kept = installer, logic.installLogic
    assert logic.warmUp(str(tiny_checkpoint), "cpu") is False and logic._worker is None and calls == []
    logic.installLogic = kept

    assert logic.warmUp(str(tiny_checkpoint), "cpu") is True
    worker = logic._worker
    assert worker is not None and worker.alive
    deadline = time.monotonic() + 120
    while not worker.ready:  # the model loads with no request yet
        assert time.monotonic() < deadline and worker.alive, "the warmed-up worker did not get ready"
        time.sleep(0.05)
    assert logic.warmUp(str(tiny_checkpoint), "cpu") is True and logic._worker is worker  # already warm
    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "cpu", False, volume, showSurfaces=False)
    assert logic.warmUp(str(tiny_checkpoint), "auto") is False  # not while a run is going on
    poll_until_done(logic)
    assert logic._worker is worker and recorder.of("failed") == [] and len(recorder.of("finished")) == 1
    assert any(message.startswith("loading") for _fraction, message in recorder.of("progressChanged"))


def test_a_failing_process_is_reported_not_raised(scene, heart, tiny_checkpoint, tmp_path):
    """A process that exits with an error: ``failed`` carries the message, nothing is added."""
    logic, recorder, node, volume, mappings = recorded_panel(scene, heart)
    before = [info.segment_id for info in segments.segment_infos(node)]
    logic.start(node, mappings, ["LAA"], str(tiny_checkpoint), "no-such-device", False, volume)
    poll_until_done(logic)
    (failure,) = recorder.of("failed")
    assert "exit status" in str(failure[0])
    assert recorder.of("logged"), "the process's error lines reach the log"
    assert recorder.of("finished") == [] and logic.workDir is None
    assert [info.segment_id for info in segments.segment_infos(node)] == before


# --- first use: what is installed, by version -------------------------------------------------------


def test_declared_minimums_are_the_projects():
    """The extension's floors are pyproject.toml's (one fact, checked in two places)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', text.split("[project.optional-dependencies]")[0]))
    for requirement in (install.TORCH, *install.PIP_REQUIREMENTS, *install.BUNDLED):
        assert declared.get(requirement.distribution) == requirement.minimum, requirement
    assert not {r.distribution.lower() for r in install.PIP_REQUIREMENTS} & install.NEVER_INSTALLED
    fast = re.search(r"^fast = \[(.*)\]$", text, re.MULTILINE).group(1)
    assert dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', fast)) == {
        r.distribution: r.minimum for r in install.OPTIONAL_REQUIREMENTS}


@pytest.mark.parametrize(
    ("version", "minimum", "ok"),
    [("2.13.0+cpu", "2.1", True), ("2.1", "2.1", True), ("2.1.0", "2.1", True), ("2.0.1+cu118", "2.1", False),
     ("1.10.0", "1.9", True), ("0.19.3", "0.19", True), ("0.18.9", "0.19", False), ("5.4.2", "4.0", True),
     ("2.1.0rc1", "2.1", True), ("v1.0", "1.0", True)],
)
def test_version_comparison_is_numeric(version, minimum, ok):
    assert install.isAtLeast(version, minimum) is ok


def test_this_environment_needs_nothing():
    """Read from the real package metadata: everything here is installed and new enough."""
    assert install.InstallLogic().outdated() == []


def make_install(monkeypatch, versions, answers=()):
    """An InstallLogic that sees ``versions`` ({distribution: version or None}) and records what it
    would ask and install (no network here)."""
    calls, questions, answers = [], [], list(answers)

    def confirm(text):
        questions.append(text)
        return answers.pop(0)

    logic = install.InstallLogic(confirm=confirm, pipInstall=calls.append)
    monkeypatch.setattr(logic, "installedVersion", lambda requirement: versions[requirement.distribution])
    return logic, calls, questions


CURRENT = {"torch": "2.5.1+cu121", "safetensors": "0.4.5", "nibabel": "5.2.0", "pynrrd": "1.0.0",
           "scikit-image": "0.24.0", "numpy": "1.26.4", "scipy": "1.13.1", "edt": "3.0.0",
           "connected-components-3d": "3.26.1"}


def test_first_use_installs_what_is_missing_or_too_old(monkeypatch):
    # all present and new enough: nothing asked, nothing installed
    logic, calls, questions = make_install(monkeypatch, CURRENT)
    assert logic.ensureRequirements() is True and calls == [] and questions == []

    # missing and too old file-format packages: one pip call with the minimums
    versions = {**CURRENT, "pynrrd": None, "nibabel": "3.2.2", "scikit-image": "0.18.3"}
    logic, calls, questions = make_install(monkeypatch, versions)
    logged = []
    logic.logged.connect(logged.append)
    assert [(r.distribution, v) for r, v in logic.outdated()] == [
        ("nibabel", "3.2.2"), ("pynrrd", None), ("scikit-image", "0.18.3")]
    logic.ensurePackages()
    assert calls == [["nibabel>=4.0", "pynrrd>=1.0", "scikit-image>=0.19"]] and questions == []
    assert logged and "nibabel>=4.0" in logged[0]

    # importable without metadata (placed by hand): accepted, its version cannot be checked
    logic, calls, _ = make_install(monkeypatch, {**CURRENT, "safetensors": ""})
    logic.ensurePackages()
    assert calls == []


def test_first_use_installs_the_speedups_and_carries_on_without_them(monkeypatch):
    """edt and cc3d (the ``fast`` extra): installed after the file-format packages in a pip call of
    their own; where pip fails for them (no wheel for the platform), that is logged and the
    packages the completion needs are still installed and no error is raised."""
    versions = {**CURRENT, "pynrrd": None, "edt": None, "connected-components-3d": "3.1.0"}
    logic, calls, _ = make_install(monkeypatch, versions)
    logic.ensurePackages()
    assert calls == [["pynrrd>=1.0"], ["edt>=2.3", "connected-components-3d>=3.10"]]

    def pip_without_speedup_wheels(requirements):
        if any(r.startswith("edt") for r in requirements):
            raise RuntimeError("no matching distribution found for edt>=2.3")
        calls.append(requirements)

    logic, calls, _ = make_install(monkeypatch, versions)
    logic._pipInstall = pip_without_speedup_wheels
    logged = []
    logic.logged.connect(logged.append)
    logic.ensurePackages()
    assert calls == [["pynrrd>=1.0"]]
    assert "no matching distribution" in logged[-1] and "scipy" in logged[-1]
    tries = len(logged)
    assert logic.ensureSpeedups() is False and len(logged) == tries  # not tried again this session
    logic.ensurePackages()
    assert calls == [["pynrrd>=1.0"]] * 2 and len(logged) == tries + 1  # the required ones still are

    logic, calls, _ = make_install(monkeypatch, CURRENT)
    assert logic.ensureSpeedups() is True and calls == []


def test_slicers_own_packages_are_checked_never_installed(monkeypatch):
    logic, calls, _ = make_install(monkeypatch, {**CURRENT, "numpy": "1.21.6", "pynrrd": None})
    with pytest.raises(RuntimeError, match=r"too old.*numpy 1\.21\.6 \(needs 1\.22"):
        logic.ensurePackages()
    assert calls == []


def test_first_use_installs_pytorch_through_the_extension(monkeypatch):
    # torch missing, user declines: nothing installed
    logic, calls, questions = make_install(monkeypatch, {**CURRENT, "torch": None}, answers=[False])
    assert logic.ensureRequirements() is False and calls == []
    assert "not installed" in questions[0]

    # torch missing, no PyTorch extension: pip fallback with the minimum, then the packages
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # "import PyTorchUtils" now raises ImportError
    logic, calls, _ = make_install(monkeypatch, {**CURRENT, "torch": None, "pynrrd": None}, answers=[True])
    assert logic.ensureRequirements() is True and calls == ["torch>=2.1", ["pynrrd>=1.0"]]

    # torch too old, PyTorch extension present: asked to update, the extension installs (right CUDA build)
    installs = []
    extension = types.ModuleType("PyTorchUtils")
    extension.PyTorchUtilsLogic = lambda: types.SimpleNamespace(
        installTorch=lambda askConfirmation, torchVersionRequirement: installs.append(
            (askConfirmation, torchVersionRequirement)) or "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", extension)
    logic, calls, questions = make_install(monkeypatch, {**CURRENT, "torch": "2.0.1+cu118"}, answers=[True])
    assert logic.ensureRequirements() is True and installs == [(False, ">=2.1")] and calls == []
    assert "2.0.1+cu118" in questions[0] and "2.1" in questions[0]
    assert logic.needsRestart is ("torch" in sys.modules)

    # the extension's installation fails: a clear error, nothing else installed
    extension.PyTorchUtilsLogic = lambda: types.SimpleNamespace(
        installTorch=lambda askConfirmation, torchVersionRequirement: None)
    logic, calls, _ = make_install(monkeypatch, {**CURRENT, "torch": None, "pynrrd": None}, answers=[True])
    with pytest.raises(RuntimeError, match="PyTorch installation failed"):
        logic.ensureRequirements()
    assert calls == []


def test_export_installs_missing_packages_first(scene, heart, monkeypatch, tmp_path):
    """The exports need the file-format packages: the logic asks its install logic first."""
    installer, calls, _ = make_install(monkeypatch, {**CURRENT, "pynrrd": None})
    logic = new_logic(installLogic=installer)
    node, _volume = partial_segmentation(scene, heart)
    logic.export("segnrrd", node, str(tmp_path))
    assert calls == [["pynrrd>=1.0"]]
