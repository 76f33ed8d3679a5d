"""3D Slicer module "Complete heart": adds the missing cardiac structures to a segmentation.

Only what Slicer looks for in a module file lives here: the module's metadata and terminology,
a widget shell and the self-test. The panel, the Qt-free logic (background completion process,
result segments, undo, export), the installation of what the model needs and the MRML glue are
in the ``HeartCompletionModule`` package next to this file; ``HeartCompletionLib`` (shared with the
training pipeline) never imports Slicer.
"""

import importlib
import os
import time

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


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


class HeartCompletionWidget(ScriptedLoadableModuleWidget):
    """A shell around :class:`HeartCompletionModule.widget.HeartCompletionPanel`; ``self.logic``
    and ``self.ui`` are the panel's (the self-test and scripts reach them here)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None
        self.logic = None
        self.ui = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from HeartCompletionModule.widget import HeartCompletionPanel

        self.panel = HeartCompletionPanel(self.resourcePath("UI/HeartCompletion.ui"))
        self.layout.addWidget(self.panel.uiWidget)
        self.logic, self.ui = self.panel.logic, self.panel.ui

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()

    def onReload(self):
        """Reload the package's submodules (dependency order) before the standard reload, which
        re-reads only this file."""
        import HeartCompletionModule

        HeartCompletionModule = importlib.reload(HeartCompletionModule)
        for name in HeartCompletionModule.SUBMODULES:
            importlib.reload(importlib.import_module(f"HeartCompletionModule.{name}"))
        ScriptedLoadableModuleWidget.onReload(self)


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
        from HeartCompletionLib.model.registry import find_model

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
        from HeartCompletionModule.logic import HeartCompletionLogic
        from HeartCompletionModule.segments import segment_terminology, segmentation_from_label_map

        from HeartCompletionLib.io.labelmap import LabelMap
        from HeartCompletionLib.io.synthetic import synthetic_label_map
        from HeartCompletionLib.structures import segment_mapping

        self.delayDisplay(_("Building a partial synthetic heart"))
        logic = HeartCompletionLogic()
        logic.setCheckpoint(self.MODEL)
        heart = synthetic_label_map(seed=3, spacing_mm=2.5)
        partial = np.where(np.isin(heart.labels, [8, 9]), 0, heart.labels)
        segmentationNode, labelmapNode = segmentation_from_label_map(LabelMap(partial, heart.ijk_to_ras), "heart", logic.table)
        segmentation = segmentationNode.GetSegmentation()
        mappings = logic.segmentMappings(segmentationNode)
        structures = [s.name for s in logic.defaultStructures(mappings)]
        self.assertEqual(structures, ["LAA", "Coronary"])

        self.delayDisplay(_("Completing with the bundled model {0}").format(self.MODEL))
        logs, added, failures = [], [], []
        logic.logged.connect(logs.append)
        logic.finished.connect(added.extend)
        logic.failed.connect(failures.append)
        logic.start(segmentationNode, mappings, structures, self.MODEL, "cpu", False, labelmapNode)
        deadline = time.monotonic() + 600
        try:
            while logic.isRunning and time.monotonic() < deadline:  # what the panel's timer does
                logic.poll()
                slicer.app.processEvents()
                time.sleep(0.1)
            self.assertFalse(logic.cancel(), "the completion did not finish within 600 s")
        finally:
            logic.shutdown()  # this test's own background process
        self.assertEqual(failures, [])
        self.assertTrue(any("not for patient data" in line for line in logs))
        self.assertEqual(sorted(added), sorted(structures))
        self.assertIsNone(logic.workDir)
        undo = logic.lastUndo
        names = [segmentation.GetSegment(i).GetName() for i in undo.added]
        self.assertEqual(sorted(names), sorted(structures))
        for segmentId in undo.added:
            entry = segment_mapping.parse_terminology_entry(segment_terminology(segmentation.GetSegment(segmentId)))
            self.assertEqual(logic.table.match_terminology(entry.type_code).name, segmentation.GetSegment(segmentId).GetName())
        logic.undoLastCompletion()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(mappings))
        self.delayDisplay(_("Test passed"))
