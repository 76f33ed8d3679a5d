"""3D Slicer module "Complete heart": adds the missing cardiac structures to a segmentation.

Thin by design: the widget wires the panel to :class:`HeartCompletionLogic`, which only glues
``HeartCompletionLib`` (segment mapping, MRML bridge, background completion process) together.
The model runs in a separate Python process polled by a ``qt.QTimer``, so Slicer stays
responsive and Cancel works.
"""

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
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)
        self.initializeParameterNode()
        self.onCheckpointChanged(self.ui.checkpointPathLineEdit.currentPath)
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
    def onCheckpointChanged(self, path):
        if path:
            qt.QSettings().setValue(CHECKPOINT_SETTING, path)
        self.ui.checkpointInfoLabel.text = self.logic.checkpointDescription(path)

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
            self.process = self.logic.startCompletion(
                p.segmentation, self.mappings, self.checkedStructures(), _pathText(p.checkpointPath), p.device,
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

    def checkpointDescription(self, path):
        if not path:
            return _("Choose a model checkpoint (.safetensors).")
        from HeartCompletionLib.checkpoint import CheckpointError, describe_checkpoint, read_checkpoint_metadata

        try:
            meta = read_checkpoint_metadata(path)
        except (CheckpointError, OSError) as exc:
            return _("Not usable: {0}").format(exc)
        names = [s["name"] for s in meta["structure_table"]["structures"]]
        return _("Structures: {0}\n{1}\nformat version {2}").format(
            ", ".join(names), describe_checkpoint(meta), meta.get("format_version")
        )

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

    def startCompletion(self, segmentationNode, mappings, structures, checkpointPath, device, replace, referenceVolume):
        """Write the input label map and start the background process (returns it)."""
        from HeartCompletionLib import completion_process, segment_mapping, slicer_bridge
        from HeartCompletionLib.labelmap_io import write_label_map

        if not segmentationNode:
            raise ValueError(_("Select a segmentation."))
        if not checkpointPath or not os.path.isfile(checkpointPath):
            raise ValueError(_("Choose an existing model checkpoint file."))
        if not structures:
            raise ValueError(_("Tick at least one structure to complete."))
        self.cleanupTemporaryFiles()
        self.workDir = tempfile.mkdtemp(prefix="HeartCompletion-")
        labelMap = slicer_bridge.segmentation_to_label_map(
            segmentationNode, segment_mapping.segment_labels(mappings), referenceVolume
        )
        inputPath = write_label_map(labelMap, os.path.join(self.workDir, "input.nrrd"))
        self.outputPath = os.path.join(self.workDir, "output.nrrd")
        python = shutil.which("PythonSlicer") or sys.executable
        command = completion_process.build_command(
            checkpointPath, inputPath, self.outputPath, structures, replace, device, python
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
    """Self-test inside Slicer: synthetic partial heart + a freshly trained tiny checkpoint."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CompleteSyntheticHeart()

    def test_CompleteSyntheticHeart(self):
        import numpy as np

        from HeartCompletionLib import segment_mapping, slicer_bridge, slicer_results
        from HeartCompletionLib.synthetic import synthetic_label_map

        self.delayDisplay(_("Building a partial synthetic heart"))
        logic = HeartCompletionLogic()
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
        self.assertEqual([s.name for s in logic.defaultStructures(mappings)], ["LAA", "Coronary"])

        self.delayDisplay(_("Training a tiny checkpoint"))
        checkpointPath = os.path.join(tempfile.mkdtemp(), "tiny.safetensors")
        self._trainTinyCheckpoint(checkpointPath, heart, logic.table)
        result, undo = slicer_results.complete_segmentation(segmentationNode, mappings, checkpointPath, device="cpu")
        names = [segmentation.GetSegment(i).GetName() for i in undo.added]
        self.assertEqual(sorted(names), sorted(logic.table.by_label(v).name for v in result.completed_labels))
        for segmentId in undo.added:
            entry = segment_mapping.parse_terminology_entry(slicer_bridge.segment_terminology(segmentation.GetSegment(segmentId)))
            self.assertEqual(logic.table.match_terminology(entry.type_code).name, segmentation.GetSegment(segmentId).GetName())
        undo.undo()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(mappings))
        self.delayDisplay(_("Test passed"))

    def _trainTinyCheckpoint(self, path, heart, table, steps=30):
        """A few real training steps of the "tiny" model on one synthetic heart (signed
        distances from Euclidean distance transforms, in mm), saved as an inference checkpoint."""
        import numpy as np
        import scipy.ndimage as ndi
        import torch

        from HeartCompletionLib.checkpoint import save_inference_checkpoint
        from HeartCompletionLib.encoder_input import encoder_arrays, encoder_centre_mm
        from HeartCompletionLib.geometry import ijk_to_ras_points
        from HeartCompletionLib.model import HeartVecSet
        from HeartCompletionLib.model_configs import get_config
        from HeartCompletionLib.normalization import Normalization
        from HeartCompletionLib.surface import sample_structure_surfaces

        rng = np.random.default_rng(0)
        norm = Normalization()
        points, _normals, values = sample_structure_surfaces(heart, table.labels, 2048, rng, min_per_structure=32)
        indices = values.astype(np.int64) - 1
        centre = encoder_centre_mm(points, indices, range(len(table)))
        xyz_n, onehot = encoder_arrays(points, indices, centre, norm, len(table))
        voxels = rng.integers(0, heart.shape, size=(4096, 3))
        spacing = heart.spacing_mm
        sdf_mm = np.stack(
            [
                ndi.distance_transform_edt(heart.labels != s.label, sampling=spacing)[tuple(voxels.T)]
                - ndi.distance_transform_edt(heart.labels == s.label, sampling=spacing)[tuple(voxels.T)]
                for s in table
            ],
            axis=-1,
        )
        queries_n = norm.points_to_network(ijk_to_ras_points(voxels, heart.ijk_to_ras), centre).astype(np.float32)
        model = HeartVecSet(get_config("tiny", len(table)))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        target = torch.from_numpy((sdf_mm / norm.scale_mm).astype(np.float32))[None]
        for _step in range(steps):
            out = model(torch.from_numpy(xyz_n)[None], torch.from_numpy(onehot)[None], torch.from_numpy(queries_n)[None])
            loss = (out["sdf"] - target).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_inference_checkpoint(path, model, table, norm, phase=1, data_summary={"cases": 1, "note": "self-test"})
