"""The panel: the .ui's widgets wired to :class:`~.logic.HeartCompletionLogic` (Qt only here).

:class:`HeartCompletionPanel` loads ``Resources/UI/HeartCompletion.ui``, binds it to the
parameter node (:mod:`.parameters`), fills the segment table and the structure list from the
logic's mapping, and follows the logic's signals while a completion runs: a ``qt.QTimer`` calls
``logic.poll()``, the Apply button turns into Cancel, the progress bar and the log update. No
algorithm and no process handling lives here. ``HeartCompletion.py``'s widget is a shell around
this class; it cannot run outside Slicer (a static test checks every ``self.ui.<name>`` against
the .ui).

Usage (inside Slicer, what ``HeartCompletionWidget.setup`` does)::

    panel = HeartCompletionPanel(resourcePath("UI/HeartCompletion.ui"))
    layout.addWidget(panel.uiWidget)
"""

import logging
import pathlib
import traceback

import qt
import slicer
from slicer import vtkMRMLSegmentationNode
from slicer.util import VTKObservationMixin

from .i18n import _
from .logic import HeartCompletionLogic
from .parameters import CHECKPOINT_SETTING, DONT_ASK_BEFORE_CPU_SETTING, MODEL_SETTING, getParameterNode, pathText

#: How often a running completion's output is read (ms).
POLL_INTERVAL_MS = 200


class HeartCompletionPanel(VTKObservationMixin):
    def __init__(self, uiPath, logic=None):
        VTKObservationMixin.__init__(self)
        self.uiWidget = slicer.util.loadUI(str(uiPath))
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic or HeartCompletionLogic()
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._entered = False
        self.mappings = []
        self.userChoices = {}
        self.observedSegmentation = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.logic.poll)

        self.logic.runningChanged.connect(self.onRunningChanged)
        self.logic.progressChanged.connect(self.onProgress)
        self.logic.logged.connect(self.appendLog)
        self.logic.installLogic.logged.connect(self.appendLog)
        self.logic.finished.connect(self.onCompletionFinished)
        self.logic.failed.connect(self.onCompletionFailed)
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

    # --- module life cycle (called by HeartCompletionWidget) ------------------------------------
    def cleanup(self):
        self._entered = False  # no warm-up from here on
        self.logic.shutdown()  # cancels a running completion and ends the warm worker
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        self._entered = True
        self.initializeParameterNode()
        self.updateTables()
        self.warmUp()

    def exit(self):
        self._entered = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self._entered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(getParameterNode())
        remembered = qt.QSettings().value(CHECKPOINT_SETTING, "") or ""
        if not pathText(self._parameterNode.checkpointPath) and remembered:
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
        return name or pathText(self.ui.checkpointPathLineEdit.currentPath)

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
        self.warmUp()

    def warmUp(self):
        """Start the completion process for the chosen model and device ahead of **Apply**, while
        the module is shown (the logic does nothing when something is missing or running)."""
        if not self._entered:
            return
        try:
            self.logic.warmUp(self.currentCheckpoint(), self.ui.deviceComboBox.currentText)
        except Exception:  # noqa: BLE001 - a head start only: Apply reports any real problem
            logging.debug("warm-up of the completion process failed:\n" + traceback.format_exc())

    def updateDeviceInfo(self, *_args):
        self.warmUp()  # a worker serves one device
        self.ui.deviceInfoLabel.text = self.logic.torchDescription()
        onCpu = self.logic.runsOnCpu(self.ui.deviceComboBox.currentText)
        self.ui.cpuWarningLabel.visible = onCpu
        self.ui.cpuWarningLabel.text = _(
            "The model will run on the CPU: with the bundled model expect about 5-15 seconds per heart; "
            "larger models take up to a few minutes. A CUDA GPU is faster."
        )

    # --- apply / cancel ---------------------------------------------------------------------------
    def onApplyOrCancel(self):
        if self.logic.isRunning:
            self.logic.cancel()
            self.appendLog(_("Cancelled."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the completion."), waitCursor=True):
            self.ui.logTextEdit.clear()  # before installing, so that what was installed stays in the log
            if not self.logic.installLogic.ensureRequirements():
                return
            p = self._parameterNode
            if self.logic.runsOnCpu(p.device) and not slicer.util.confirmOkCancelDisplay(
                _("No CUDA GPU will be used: the completion runs on the CPU and may take from seconds to a few minutes, depending on the model. Continue?"),
                dontShowAgainSettingsKey=DONT_ASK_BEFORE_CPU_SETTING,
            ):
                return
            checkpoint = self.currentCheckpoint()
            warning = self.logic.modelWarning(checkpoint)
            if warning:
                self.appendLog(_("Model {0}: {1}").format(checkpoint, warning))
            self.ui.progressBar.value = 0
            self.logic.start(
                p.segmentation, self.mappings, self.checkedStructures(), checkpoint, p.device,
                p.replaceExisting, p.referenceVolume, p.showSurfaces,
            )

    def onRunningChanged(self, running):
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        if running:
            self.timer.start()
        else:
            self.timer.stop()
            self.warmUp()  # a cancelled run ended its process: start the next one ahead

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.statusLabel.text = message

    def onCompletionFinished(self, added):
        self.appendLog(_("Added or updated: {0}").format(", ".join(added)))
        self.ui.statusLabel.text = _("Done.")
        self.updateTables()

    def onCompletionFailed(self, error):
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        slicer.util.errorDisplay(_("Completion failed.") + "\n\n" + str(error), detailedText=details)

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
            written = self.logic.export(kind, p.segmentation, pathText(p.exportFolder), p.referenceVolume, p.meshFormat)
            self.appendLog(_("Exported: {0}").format(", ".join(str(w) for w in written)))
