"""3D Slicer module "Complete heart": adds the missing cardiac structures to a segmentation.

Thin by design: the widget wires the panel to :class:`HeartCompletionLogic`, which only glues
``HeartCompletionLib`` (segment mapping, MRML bridge, background completion process) together.
The model runs in a separate Python process polled by a ``qt.QTimer``, so Slicer stays
responsive and Cancel works. The model is a checkpoint file or a registered (bundled) model
(:mod:`HeartCompletionLib.model_registry`), chosen explicitly in the "Model" box, whose warning is
shown in red beneath it; its structure table is the one segments are mapped to.
"""

import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

CHECKPOINT_SETTING = "HeartCompletion/CheckpointPath"
#: The registered model chosen last ("" = the checkpoint file): remembered, never chosen by default.
MODEL_SETTING = "HeartCompletion/RegisteredModel"
#: Python packages the completion needs beyond what Slicer bundles (import name -> pip name).
#: SimpleITK, vtk and numpy come with Slicer and are never installed here.
EXTRA_REQUIREMENTS = {"safetensors": "safetensors", "nibabel": "nibabel", "nrrd": "pynrrd", "skimage": "scikit-image"}


def _pathText(path):
    """A parameter-node path as text; "" when unset (an unset ``pathlib.Path`` reads as ".")."""
    text = str(path) if path is not None else ""
    return "" if text in ("", ".") else text


class HeartCompletion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Complete heart")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Cardiac")]
        self.parent.dependencies = []
        self.parent.contributors = ["HeartCompletion developers"]
        self.parent.helpText = _(
            "Completes a partially segmented heart: the missing cardiac structures (of Myocardium, LA, LV, RA, "
            "RV, Aorta, PA, LAA, Coronary, PV) are predicted by a neural implicit shape model from the "
            "segments you have, and added as new segments."
        )
        self.parent.acknowledgementText = _("Uses a VecSet-style multi-class neural implicit model trained with PyTorch.")
        slicer.app.connect("startupCompleted()", self.loadTerminology)

    def loadTerminology(self):
        """Register the extension's terminology context (Myocardium is not in Slicer's lists)."""
        path = os.path.join(os.path.dirname(self.parent.path), "Resources", "HeartCompletion.term.json")
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(path)


@parameterNodeWrapper
class HeartCompletionParameterNode:
    segmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    checkpointPath: pathlib.Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    replaceExisting: bool = False
    showSurfaces: bool = True
    exportFolder: pathlib.Path
    meshFormat: Annotated[str, Choice(["STL", "OBJ"])] = "STL"


class HeartCompletionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.process = None
        self.result = None
        self.mappings = []
        self.userChoices = {}
        self.observedSegmentation = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HeartCompletion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HeartCompletionLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.refreshButton.connect("clicked(bool)", self.updateTables)
        self.ui.exportLabelMapButton.connect("clicked(bool)", lambda: self.onExport("labelmap"))
        self.ui.exportSegNrrdButton.connect("clicked(bool)", lambda: self.onExport("segnrrd"))
        self.ui.exportMeshesButton.connect("clicked(bool)", lambda: self.onExport("meshes"))
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.fillModelChoices()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)
        self.initializeParameterNode()
        self.onModelChosen()
        self.updateDeviceInfo()

    def cleanup(self):
        self.cancelProcess()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.updateTables()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.cancelProcess()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        remembered = qt.QSettings().value(CHECKPOINT_SETTING, "") or ""
        if not _pathText(self._parameterNode.checkpointPath) and remembered:
            self._parameterNode.checkpointPath = pathlib.Path(remembered)
        if not self._parameterNode.segmentation:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if node:
                self._parameterNode.segmentation = node

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # --- structure table ----------------------------------------------------------------------
    def onSegmentationChanged(self, node):
        """Follow segments being added, renamed or removed; forget choices made for another node."""
        if self.observedSegmentation is not None:
            self.removeObserver(self.observedSegmentation, vtkMRMLSegmentationNode.SegmentationChangedEvent, self.updateTables)
        self.observedSegmentation = node
        if node is not None:
            self.addObserver(node, vtkMRMLSegmentationNode.SegmentationChangedEvent, self.updateTables)
        self.userChoices = {}
        self.updateTables()

    def updateTables(self, *_args):
        """Fill the segment table (auto-mapped, editable) and the structure checklist."""
        node = self.ui.segmentationSelector.currentNode()
        self.ui.segmentTable.setRowCount(0)
        self.mappings = self.logic.segmentMappings(node) if node else []
        # re-apply what the user fixed by hand (the automatic mapping is recomputed each time)
        self.mappings = [
            self.logic.withUserChoice(m, self.userChoices[m.segment.segment_id]) if m.segment.segment_id in self.userChoices else m
            for m in self.mappings
        ]
        names = [_("(ignore)")] + self.logic.table.names
        for row, mapping in enumerate(self.mappings):
            self.ui.segmentTable.insertRow(row)
            self.ui.segmentTable.setItem(row, 0, qt.QTableWidgetItem(mapping.segment.name))
            combo = qt.QComboBox()
            combo.addItems(names)
            combo.setCurrentIndex(mapping.label)
            combo.connect("currentIndexChanged(int)", lambda index, r=row: self.onMappingEdited(r, index))
            self.ui.segmentTable.setCellWidget(row, 1, combo)
            self.ui.segmentTable.setItem(row, 2, qt.QTableWidgetItem(_(mapping.matched_by)))
        self.updateStructureList()

    def onMappingEdited(self, row, index):
        self.userChoices[self.mappings[row].segment.segment_id] = index
        self.mappings[row] = self.logic.withUserChoice(self.mappings[row], index)
        self.ui.segmentTable.item(row, 2).setText(_("user") if index else _("ignored"))
        self.updateStructureList()

    def updateStructureList(self):
        missing = {s.label for s in self.logic.defaultStructures(self.mappings)}
        providers = {}
        for m in self.mappings:
            if m.structure is not None:
                providers.setdefault(m.label, []).append(m.segment.name)
        table = self.ui.structureTable
        table.setRowCount(len(self.logic.table))
        for row, structure in enumerate(self.logic.table):
            item = qt.QTableWidgetItem(structure.name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Checked if structure.label in missing else qt.Qt.Unchecked)
            item.setData(qt.Qt.DecorationRole, qt.QColor(*structure.color))
            table.setItem(row, 0, item)
            given = ", ".join(providers.get(structure.label, []))
            table.setItem(row, 1, qt.QTableWidgetItem(_("given by: {0}").format(given) if given else _("missing")))

    def checkedStructures(self):
        table = self.ui.structureTable
        return [table.item(row, 0).text() for row in range(table.rowCount) if table.item(row, 0).checkState() == qt.Qt.Checked]

    # --- model and device -----------------------------------------------------------------------
    def fillModelChoices(self):
        """"Checkpoint file" plus one item per registered model (with its warning in the item text)."""
        combo = self.ui.modelComboBox
        combo.clear()
        combo.addItem(_("Checkpoint file (choose below)"), "")
        for entry in self.logic.registeredModels():
            combo.addItem(_("{0} (bundled; {1})").format(entry.name, entry.warning), entry.name)
        remembered = qt.QSettings().value(MODEL_SETTING, "") or ""
        combo.setCurrentIndex(max(combo.findData(remembered), 0))

    def currentCheckpoint(self):
        """The registered model's name, or the checkpoint file's path ("" when none)."""
        name = self.ui.modelComboBox.currentData or ""
        return name or _pathText(self.ui.checkpointPathLineEdit.currentPath)

    def onModelChosen(self, *_args):
        name = self.ui.modelComboBox.currentData or ""
        qt.QSettings().setValue(MODEL_SETTING, name)
        self.ui.checkpointPathLineEdit.enabled = not name
        self.onCheckpointChanged(self.ui.checkpointPathLineEdit.currentPath)

    def onCheckpointChanged(self, path):
        if path and not (self.ui.modelComboBox.currentData or ""):
            qt.QSettings().setValue(CHECKPOINT_SETTING, path)
        checkpoint = self.currentCheckpoint()
        self.ui.checkpointInfoLabel.text = self.logic.checkpointDescription(checkpoint)
        warning = self.logic.modelWarning(checkpoint)
        self.ui.modelWarningLabel.text = _("Warning: {0}").format(warning) if warning else ""
        self.ui.modelWarningLabel.visible = bool(warning)
        if self.logic.setCheckpoint(checkpoint):  # another structure table: map the segments again
            self.userChoices = {}
            self.updateTables()

    def updateDeviceInfo(self, *_args):
        self.ui.deviceInfoLabel.text = self.logic.torchDescription()
        onCpu = self.logic.runsOnCpu(self.ui.deviceComboBox.currentText)
        self.ui.cpuWarningLabel.visible = onCpu
        self.ui.cpuWarningLabel.text = _(
            "The model will run on the CPU: expect about half a minute to a few minutes per heart "
            "(more for large images). A CUDA GPU takes seconds."
        )

    # --- apply / cancel ---------------------------------------------------------------------------
    def onApplyOrCancel(self):
        if self.process is not None:
            self.cancelProcess()
            self.appendLog(_("Cancelled."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the completion."), waitCursor=True):
            if not self.logic.ensureRequirements():
                return
            p = self._parameterNode
            if self.logic.runsOnCpu(p.device) and not slicer.util.confirmOkCancelDisplay(
                _("No CUDA GPU will be used: the completion runs on the CPU and may take a few minutes. Continue?"),
                dontShowAgainSettingsKey="HeartCompletion/DontAskBeforeCpu",
            ):
                return
            self.ui.logTextEdit.clear()
            checkpoint = self.currentCheckpoint()
            warning = self.logic.modelWarning(checkpoint)
            if warning:
                self.appendLog(_("Model {0}: {1}").format(checkpoint, warning))
            self.process = self.logic.startCompletion(
                p.segmentation, self.mappings, self.checkedStructures(), checkpoint, p.device,
                p.replaceExisting, p.referenceVolume,
            )
            self.result = None
            self.ui.applyButton.text = _("Cancel")
            self.ui.progressBar.value = 0
            self.timer.start()

    def onPoll(self):
        for event in self.process.poll() if self.process else []:
            if event.kind == "progress":
                self.ui.progressBar.value = int(100 * event.fraction)
                self.ui.statusLabel.text = event.message
            elif event.kind in ("log", "error"):
                self.appendLog(event.message)
            elif event.kind == "result":
                self.result = event.payload
            elif event.kind == "exit":
                self.onProcessFinished(event.payload["returncode"])

    def onProcessFinished(self, returncode):
        self.timer.stop()
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Completion failed."), waitCursor=True):
            self.process = None
            if returncode != 0:
                raise RuntimeError(_("The completion process failed (exit status {0}); see the log.").format(returncode))
            completed = (self.result or {}).get("completed_labels", [])
            added = self.logic.finishCompletion(p.segmentation, self.mappings, completed, p.replaceExisting, p.showSurfaces)
            self.appendLog(_("Added or updated: {0}").format(", ".join(added)))
            self.ui.statusLabel.text = _("Done.")
            self.updateTables()
        self.logic.cleanupTemporaryFiles()

    def cancelProcess(self):
        self.timer.stop()
        if self.process is not None:
            self.process.cancel()
            self.process = None
        self.ui.applyButton.text = _("Apply")
        self.logic.cleanupTemporaryFiles()

    def appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def onUndo(self):
        with slicer.util.tryWithErrorDisplay(_("Undo failed.")):
            self.logic.undoLastCompletion()
            self.updateTables()

    def onExport(self, kind):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.export(kind, p.segmentation, _pathText(p.exportFolder), p.referenceVolume, p.meshFormat)
            self.appendLog(_("Exported: {0}").format(", ".join(str(w) for w in written)))


class HeartCompletionLogic(ScriptedLoadableModuleLogic):
    """Glue between the panel and ``HeartCompletionLib`` (no algorithms here)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from HeartCompletionLib.structures import StructureTable

        self.table = StructureTable.default()
        self.lastUndo = None
        self.workDir = None
        self.outputPath = None
        self.completedLabels = []

    def getParameterNode(self):
        return HeartCompletionParameterNode(super().getParameterNode())

    def segmentMappings(self, segmentationNode):
        from HeartCompletionLib import segment_mapping, slicer_bridge

        return segment_mapping.map_segments(slicer_bridge.segment_infos(segmentationNode), self.table)

    def withUserChoice(self, mapping, comboIndex):
        from HeartCompletionLib.segment_mapping import with_user_choice

        return with_user_choice(mapping, self.table.by_label(comboIndex) if comboIndex else None)

    def defaultStructures(self, mappings):
        from HeartCompletionLib.segment_mapping import default_structures_to_complete

        return default_structures_to_complete(mappings, self.table)

    def registeredModels(self):
        """The registry's models (``ModelEntry``); none when the registry is unreadable (logged)."""
        from HeartCompletionLib.model_registry import RegistryError, load_registry

        try:
            return load_registry()
        except RegistryError as exc:
            logging.error(str(exc))
            return []

    def modelWarning(self, checkpoint):
        """The registry's warning for a registered model name, "" for a checkpoint file (an
        existing file wins over a name, as everywhere)."""
        from HeartCompletionLib.model_registry import RegistryError, find_model

        if not checkpoint or os.path.exists(checkpoint):
            return ""
        try:
            entry = find_model(checkpoint)
        except RegistryError:
            return ""
        return entry.warning if entry is not None else ""

    def checkpointDescription(self, checkpoint):
        """What the panel shows about a checkpoint file or a registered model name."""
        if not checkpoint:
            return _("Choose a model checkpoint (.safetensors) or a bundled model.")
        from HeartCompletionLib.checkpoint import CheckpointError, describe_checkpoint, read_checkpoint_metadata
        from HeartCompletionLib.model_registry import RegistryError, find_model, resolve_checkpoint

        entry = None
        try:
            entry = find_model(checkpoint) if not os.path.exists(checkpoint) else None
            path, entry = resolve_checkpoint(checkpoint)
            meta = read_checkpoint_metadata(path)
        except (CheckpointError, RegistryError, OSError) as exc:
            prefix = entry.describe() + "\n" if entry is not None else ""
            return prefix + _("Not usable: {0}").format(exc)
        names = [s["name"] for s in meta["structure_table"]["structures"]]
        text = _("Structures: {0}\n{1}\nformat version {2}").format(
            ", ".join(names), describe_checkpoint(meta), meta.get("format_version")
        )
        return entry.describe() + "\n" + text if entry is not None else text

    def checkpointTable(self, checkpoint):
        """The structure table a checkpoint (file or registered name) was trained with; the
        default table when it cannot be read (the panel says why in its description)."""
        from HeartCompletionLib.checkpoint import CheckpointError, read_checkpoint_metadata
        from HeartCompletionLib.model_registry import RegistryError, resolve_checkpoint
        from HeartCompletionLib.structures import StructureTable

        if not checkpoint:
            return StructureTable.default()
        try:
            path, _entry = resolve_checkpoint(checkpoint)
            return StructureTable.from_dict(read_checkpoint_metadata(path)["structure_table"])
        except (CheckpointError, RegistryError, OSError, KeyError, TypeError, ValueError):
            return StructureTable.default()

    def setCheckpoint(self, checkpoint):
        """Map segments onto the structure table of ``checkpoint`` from now on (the background
        process reads the input with that table). Returns True when the table changed."""
        table = self.checkpointTable(checkpoint)
        changed = table.names != self.table.names
        self.table = table
        return changed

    def torchDescription(self):
        from HeartCompletionLib.completion_process import torch_status

        s = torch_status()
        if not s["installed"]:
            return _("PyTorch is not installed yet; it is installed on first Apply.")
        cuda = _("CUDA {0} ({1})").format(s["cuda_version"], s["gpu"]) if s["cuda_available"] else _("no CUDA GPU")
        return _("PyTorch {0}, {1}").format(s["version"], cuda)

    def runsOnCpu(self, device):
        from HeartCompletionLib.completion_process import torch_status

        return device == "cpu" or (device == "auto" and not torch_status()["cuda_available"])

    def ensureRequirements(self):
        """Install PyTorch (through the PyTorch extension) and missing packages on first use."""
        try:
            import torch  # noqa: F401
        except ImportError:
            if not slicer.util.confirmOkCancelDisplay(
                _("Complete heart needs PyTorch, which is not installed. Install it now (a few minutes)?")
            ):
                return False
            try:
                import PyTorchUtils

                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError(_("PyTorch installation failed; see the Python console."))
            except ImportError:
                slicer.util.pip_install("torch")
        self.ensurePackages()
        return True

    def ensurePackages(self):
        """pip-install the file-format packages Slicer lacks (needed by exports and the process)."""
        import importlib.util

        missing = [pip for name, pip in EXTRA_REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
        if missing:
            slicer.util.pip_install(missing)

    def startCompletion(self, segmentationNode, mappings, structures, checkpoint, device, replace, referenceVolume):
        """Write the input label map (in the values of ``self.table``, which must be the
        checkpoint's) and start the background process (returns it). ``checkpoint``: a file or
        a registered model name."""
        from HeartCompletionLib import completion_process, segment_mapping, slicer_bridge
        from HeartCompletionLib.checkpoint import CheckpointError, read_checkpoint_metadata
        from HeartCompletionLib.labelmap_io import write_label_map
        from HeartCompletionLib.model_registry import RegistryError, resolve_checkpoint
        from HeartCompletionLib.structures import StructureTable

        if not segmentationNode:
            raise ValueError(_("Select a segmentation."))
        if not checkpoint:
            raise ValueError(_("Choose a model checkpoint file or a bundled model."))
        try:
            path, _entry = resolve_checkpoint(checkpoint)
            if not path.is_file():
                raise ValueError(_("{0}: not a checkpoint file").format(path))
            table = StructureTable.from_dict(read_checkpoint_metadata(path)["structure_table"])
        except (CheckpointError, RegistryError) as exc:
            raise ValueError(_("Choose an existing model checkpoint file or a bundled model: {0}").format(exc)) from exc
        if table.names != self.table.names:
            raise ValueError(
                _("The segments were mapped to other structures than the model was trained on; choose the model "
                  "again.\n  segments mapped to: {0}\n  model {1}: {2}").format(self.table.names, checkpoint,
                                                                                 table.names)
            )
        if not structures:
            raise ValueError(_("Tick at least one structure to complete."))
        self.cleanupTemporaryFiles()
        self.workDir = tempfile.mkdtemp(prefix="HeartCompletion-")
        labelMap = slicer_bridge.segmentation_to_label_map(
            segmentationNode, segment_mapping.segment_labels(mappings), referenceVolume
        )
        inputPath = write_label_map(labelMap, os.path.join(self.workDir, "input.nrrd"), table=self.table)
        tablePath = os.path.join(self.workDir, "structures.json")
        with open(tablePath, "w", encoding="utf-8") as f:
            json.dump(self.table.to_dict(), f)
        self.outputPath = os.path.join(self.workDir, "output.nrrd")
        python = shutil.which("PythonSlicer") or sys.executable
        command = completion_process.build_command(
            checkpoint, inputPath, self.outputPath, structures, replace, device, python, table=tablePath
        )
        return completion_process.CompletionProcess(command)

    def finishCompletion(self, segmentationNode, mappings, completedLabels, replace, showSurfaces):
        """Turn the process output into segments; returns the names of the structures written."""
        from HeartCompletionLib import slicer_results
        from HeartCompletionLib.labelmap_io import read_label_map

        result = read_label_map(self.outputPath, table=self.table)
        self.lastUndo = slicer_results.import_completion_result(
            segmentationNode, mappings, result, completedLabels, self.table, replace, showSurfaces
        )
        return [self.table.by_label(v).name for v in completedLabels]

    def undoLastCompletion(self):
        if self.lastUndo is None:
            raise RuntimeError(_("There is no completion to undo."))
        self.lastUndo.undo()
        self.lastUndo = None

    def cleanupTemporaryFiles(self):
        if self.workDir and os.path.isdir(self.workDir):
            shutil.rmtree(self.workDir, ignore_errors=True)
        self.workDir = None

    def export(self, kind, segmentationNode, folder, referenceVolume=None, meshFormat="STL"):
        from HeartCompletionLib import slicer_results

        if not segmentationNode or not folder:
            raise ValueError(_("Select a segmentation and an export folder."))
        self.ensurePackages()
        stem = os.path.join(folder, segmentationNode.GetName())
        if kind == "labelmap":
            return [slicer_results.export_label_map(segmentationNode, stem + ".nii.gz", self.table, referenceVolume)]
        if kind == "segnrrd":
            return [slicer_results.write_seg_nrrd(segmentationNode, stem + ".seg.nrrd")]
        return slicer_results.export_structure_meshes(segmentationNode, stem + "-meshes", self.table, meshFormat)


class HeartCompletionTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic partial heart completed by the bundled synthetic model
    through the panel (model chooser, its warning) and the background process, then undone."""

    MODEL = "synthetic-demo"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_BundledModelIsOfferedWithItsWarning()
        self.setUp()
        self.test_CompleteSyntheticHeart()

    def test_BundledModelIsOfferedWithItsWarning(self):
        from HeartCompletionLib.model_registry import find_model

        entry = find_model(self.MODEL)
        self.assertIsNotNone(entry, "the bundled model is not registered")
        self.assertTrue(entry.installed, f"the bundled model file {entry.path} is not installed")
        slicer.util.selectModule("HeartCompletion")
        widget = slicer.modules.heartcompletion.widgetRepresentation().self()
        combo = widget.ui.modelComboBox
        index = combo.findData(self.MODEL)
        self.assertGreaterEqual(index, 1, "the bundled model is not offered in the Model box")
        self.assertIn(entry.warning, combo.itemText(index))
        previous = combo.currentIndex
        combo.setCurrentIndex(index)
        try:
            self.assertFalse(widget.ui.modelWarningLabel.isHidden())
            self.assertIn(entry.warning, widget.ui.modelWarningLabel.text)
            self.assertIn("Structures:", widget.ui.checkpointInfoLabel.text)
        finally:
            combo.setCurrentIndex(previous)  # the user's own choice is kept

    def test_CompleteSyntheticHeart(self):
        import numpy as np

        from HeartCompletionLib import segment_mapping, slicer_bridge
        from HeartCompletionLib.synthetic import synthetic_label_map

        self.delayDisplay(_("Building a partial synthetic heart"))
        logic = HeartCompletionLogic()
        logic.setCheckpoint(self.MODEL)
        heart = synthetic_label_map(seed=3, spacing_mm=2.5)
        partial = np.where(np.isin(heart.labels, [8, 9]), 0, heart.labels)
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "partial")
        slicer.util.updateVolumeFromArray(labelmapNode, np.ascontiguousarray(partial.transpose(2, 1, 0), dtype=np.int16))
        labelmapNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(heart.ijk_to_ras))
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "heart")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            segment.SetName(logic.table.by_label(segment.GetLabelValue()).name)
        mappings = logic.segmentMappings(segmentationNode)
        structures = [s.name for s in logic.defaultStructures(mappings)]
        self.assertEqual(structures, ["LAA", "Coronary"])

        self.delayDisplay(_("Completing with the bundled model {0}").format(self.MODEL))
        process = logic.startCompletion(segmentationNode, mappings, structures, self.MODEL, "cpu", False, labelmapNode)
        events = process.wait(timeout_s=600)
        self.assertEqual(process.returncode, 0, [e.message for e in events])
        self.assertTrue(any(e.kind == "log" and "not for patient data" in e.message for e in events))
        (result,) = [e.payload for e in events if e.kind == "result"]
        added = logic.finishCompletion(segmentationNode, mappings, result["completed_labels"], False, True)
        logic.cleanupTemporaryFiles()
        self.assertEqual(sorted(added), sorted(structures))
        undo = logic.lastUndo
        names = [segmentation.GetSegment(i).GetName() for i in undo.added]
        self.assertEqual(sorted(names), sorted(structures))
        for segmentId in undo.added:
            entry = segment_mapping.parse_terminology_entry(slicer_bridge.segment_terminology(segmentation.GetSegment(segmentId)))
            self.assertEqual(logic.table.match_terminology(entry.type_code).name, segmentation.GetSegment(segmentId).GetName())
        logic.undoLastCompletion()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(mappings))
        self.delayDisplay(_("Test passed"))
