"""The module's logic: no Qt, no widgets; drives ``HeartCompletionLib`` and the background process.

:class:`HeartCompletionLogic` maps segments to the checkpoint's structures, describes models,
writes the input and hands the completion to a separate Python process (``heart-complete``'s
module with ``--protocol lines --serve``: a warm worker,
:class:`HeartCompletionLib.inference.completion_process.CompletionWorker`, started ahead by
:meth:`~HeartCompletionLogic.warmUp` and kept for the next completion with the same model and
device, so that Python, torch and the model are loaded once), reads that process's events when
asked (:meth:`~HeartCompletionLogic.poll`, which the widget calls from a ``qt.QTimer``), cancels
it, turns its output into segments (with one undo record) and exports. It reports through plain-Python :class:`~.signals.Signal` s that the widget connects to,
so tests drive it on a real MRML scene with ``slicer-core`` alone.

Usage (inside Slicer, or with slicer-core after setting ``slicer.mrmlScene``)::

    logic = HeartCompletionLogic()
    logic.progressChanged.connect(lambda fraction, message: print(f"{fraction:.0%} {message}"))
    logic.finished.connect(lambda added: print("added", added))
    logic.failed.connect(print)
    logic.setCheckpoint("synthetic-demo")          # segments are mapped to its structure table
    mappings = logic.segmentMappings(segmentationNode)
    structures = [s.name for s in logic.defaultStructures(mappings)]
    logic.start(segmentationNode, mappings, structures, "synthetic-demo", "cpu", False, None)
    while logic.isRunning:                         # the panel polls from a timer instead
        logic.poll()
        time.sleep(0.2)
    logic.undoLastCompletion()
    logic.shutdown()                               # the module's cleanup: the worker ends
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

from .i18n import _
from .install import InstallLogic
from .signals import Signal


@dataclass
class _Run:
    """What a running completion needs when it ends (captured when it starts)."""

    process: object
    segmentationNode: object
    mappings: list
    replace: bool
    showSurfaces: bool
    result: dict | None = None


class HeartCompletionLogic:
    """Glue between the panel and ``HeartCompletionLib`` (no algorithms here).

    Signals: ``progressChanged(fraction, message)``, ``logged(text)``, ``runningChanged(bool)``,
    ``finished(names of the structures added or updated)``, ``failed(exception)``.
    ``installLogic``: what installs the requirements (default :class:`~.install.InstallLogic`).
    """

    def __init__(self, installLogic: InstallLogic | None = None) -> None:
        from HeartCompletionLib.structures.table import StructureTable

        self.installLogic = installLogic or InstallLogic()
        self.table = StructureTable.default()
        self.lastUndo = None
        self.workDir = None
        self.outputPath = None
        self._run: _Run | None = None
        self._worker = None  # the warm completion process (CompletionWorker), kept between runs
        self.progressChanged = Signal()
        self.logged = Signal()
        self.runningChanged = Signal()
        self.finished = Signal()
        self.failed = Signal()

    # --- segments and structures -----------------------------------------------------------------
    def segmentMappings(self, segmentationNode):
        from HeartCompletionLib.structures.segment_mapping import map_segments

        from .segments import segment_infos

        return map_segments(segment_infos(segmentationNode), self.table)

    def withUserChoice(self, mapping, comboIndex):
        from HeartCompletionLib.structures.segment_mapping import with_user_choice

        return with_user_choice(mapping, self.table.by_label(comboIndex) if comboIndex else None)

    def defaultStructures(self, mappings):
        from HeartCompletionLib.structures.segment_mapping import default_structures_to_complete

        return default_structures_to_complete(mappings, self.table)

    # --- models and device -------------------------------------------------------------------------
    def registeredModels(self):
        """The registry's models (``ModelEntry``); none when the registry is unreadable (logged)."""
        from HeartCompletionLib.model.registry import RegistryError, load_registry

        try:
            return load_registry()
        except RegistryError as exc:
            logging.error(str(exc))
            return []

    def modelWarning(self, checkpoint):
        """The registry's warning for a registered model name, "" for a checkpoint file (an
        existing file wins over a name, as everywhere)."""
        from HeartCompletionLib.model.registry import RegistryError, find_model

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
        from HeartCompletionLib.model.checkpoint import CheckpointError, describe_checkpoint, read_checkpoint_metadata
        from HeartCompletionLib.model.registry import RegistryError, find_model, resolve_checkpoint

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
        from HeartCompletionLib.model.checkpoint import CheckpointError, read_checkpoint_metadata
        from HeartCompletionLib.model.registry import RegistryError, resolve_checkpoint
        from HeartCompletionLib.structures.table import StructureTable

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
        from HeartCompletionLib.inference.completion_process import torch_status

        s = torch_status()
        if not s["installed"]:
            return _("PyTorch is not installed yet; it is installed on first Apply.")
        cuda = _("CUDA {0} ({1})").format(s["cuda_version"], s["gpu"]) if s["cuda_available"] else _("no CUDA GPU")
        return _("PyTorch {0}, {1}").format(s["version"], cuda)

    def runsOnCpu(self, device):
        from HeartCompletionLib.inference.completion_process import torch_status

        return device == "cpu" or (device == "auto" and not torch_status()["cuda_available"])

    # --- the background run: start, poll, cancel, finish ----------------------------------------
    @property
    def isRunning(self) -> bool:
        return self._run is not None

    def start(self, segmentationNode, mappings, structures, checkpoint, device, replace, referenceVolume,
              showSurfaces=True):
        """Start a completion in the background (see :meth:`startCompletion`); its results go into
        ``segmentationNode`` when :meth:`poll` sees the process end. Emits ``runningChanged(True)``."""
        if self._run is not None:
            raise RuntimeError(_("A completion is already running."))
        process = self.startCompletion(segmentationNode, mappings, structures, checkpoint, device, replace,
                                       referenceVolume)
        self._run = _Run(process, segmentationNode, list(mappings), bool(replace), bool(showSurfaces))
        self.runningChanged.emit(True)

    def poll(self):
        """Handle what the process reported since the last call; never blocks. At its end the
        results become segments and ``finished`` (or ``failed``) is emitted."""
        run = self._run
        if run is None:
            return
        for event in run.process.poll():
            if event.kind == "progress":
                self.progressChanged.emit(event.fraction, event.message)
            elif event.kind in ("log", "error"):
                self.logged.emit(event.message)
            elif event.kind == "result":
                run.result = event.payload
            elif event.kind == "exit":
                self._finish(run, event.payload["returncode"])
                return

    def _finish(self, run, returncode):
        self._run = None
        added, error = None, None
        try:
            if returncode != 0:
                raise RuntimeError(_("The completion process failed (exit status {0}); see the log.").format(returncode))
            completed = (run.result or {}).get("completed_labels", [])
            added = self.finishCompletion(run.segmentationNode, run.mappings, completed, run.replace, run.showSurfaces)
        except Exception as exc:  # reported to the panel, which shows it
            error = exc
        finally:
            self.cleanupTemporaryFiles()
        self.runningChanged.emit(False)
        if error is not None:
            self.failed.emit(error)
        else:
            self.finished.emit(added)

    def cancel(self):
        """Stop a running completion (nothing is added; its worker process is terminated, the next
        run starts another) and remove its temporary files; returns whether one was running.
        Emits ``runningChanged(False)`` when it was."""
        run, self._run = self._run, None
        if run is not None:
            run.process.cancel()
        self.cleanupTemporaryFiles()
        if run is not None:
            self.runningChanged.emit(False)
        return run is not None

    def warmUp(self, checkpoint, device):
        """Start the warm worker for ``checkpoint`` on ``device`` ahead of the first **Apply** (the
        panel calls it when the module is entered and when the model or device changes), so that
        Python, torch and the model load while the user ticks structures. Only when nothing is
        running and every requirement is installed (it never installs) and ``checkpoint`` names an
        existing file or installed registered model; a checkpoint that cannot be used is left for
        **Apply** to report. Returns whether a worker for them is starting or ready."""
        from HeartCompletionLib.model.registry import RegistryError, resolve_checkpoint

        if self._run is not None or not checkpoint or self.installLogic.outdated():
            return False
        try:
            path, _entry = resolve_checkpoint(checkpoint)
        except (RegistryError, OSError):
            return False
        if not path.is_file():
            return False
        self._workerFor(checkpoint, path, device)
        return True

    def shutdown(self):
        """Cancel a running completion and end the warm worker (the module's cleanup, Slicer's exit)."""
        self.cancel()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def _workerFor(self, checkpoint, path, device):
        """The warm worker for ``checkpoint`` (file ``path``) on ``device``: the kept one when it
        serves the same Python, file (same modification time and size) and device and is idle,
        else a new one (the old one ends). Its Python is Slicer's ``PythonSlicer`` when there is one."""
        from HeartCompletionLib.inference import completion_process

        python = shutil.which("PythonSlicer") or sys.executable
        stat = os.stat(path)
        key = (python, str(checkpoint), os.path.realpath(path), stat.st_mtime_ns, stat.st_size, device)
        worker = self._worker
        if worker is not None and (worker.key != key or not worker.alive or worker.busy):
            worker.terminate()  # idle or dead: nothing is lost, and the panel does not wait for it
            worker = None
        if worker is None:
            worker = completion_process.CompletionWorker(
                completion_process.build_worker_command(checkpoint, device, python), key=key
            )
        self._worker = worker
        return worker

    # --- the steps of a run (also used directly by the self-test and scripts) ----------------------
    def startCompletion(self, segmentationNode, mappings, structures, checkpoint, device, replace, referenceVolume):
        """Write the input label map (in the values of ``self.table``, which must be the
        checkpoint's) and hand it to the background process (returns the run, a
        :class:`~HeartCompletionLib.inference.completion_process.WorkerJob`: ``poll``, ``wait``,
        ``cancel``, ``returncode``). ``checkpoint``: a file or a registered model name."""
        from HeartCompletionLib.inference import completion_process
        from HeartCompletionLib.io.labelmap_files import write_label_map
        from HeartCompletionLib.model.checkpoint import CheckpointError, read_checkpoint_metadata
        from HeartCompletionLib.model.registry import RegistryError, resolve_checkpoint
        from HeartCompletionLib.structures import segment_mapping
        from HeartCompletionLib.structures.table import StructureTable

        from .segments import segmentation_to_label_map

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
        labelMap = segmentation_to_label_map(segmentationNode, segment_mapping.segment_labels(mappings), referenceVolume,
                                             vtk_order=True)  # only written to the file
        # the box around the given structures, with the grid it belongs to: the process reads the same
        # label map, from a file written and read in a third of the time at CT size
        inputPath = write_label_map(labelMap, os.path.join(self.workDir, "input.nrrd"), table=self.table,
                                    box_only=True)
        tablePath = os.path.join(self.workDir, "structures.json")
        with open(tablePath, "w", encoding="utf-8") as f:
            json.dump(self.table.to_dict(), f)
        self.outputPath = os.path.join(self.workDir, "output.nrrd")
        # the result comes back as the box around its labels (a CT result's file a third to a half
        # the size); import_completion_result places it on the segmentation's grid
        request = completion_process.build_request(inputPath, self.outputPath, structures, replace, table=tablePath,
                                                   crop_output=True)
        return self._workerFor(checkpoint, path, device).submit(request)

    def finishCompletion(self, segmentationNode, mappings, completedLabels, replace, showSurfaces):
        """Turn the process output into segments; returns the names of the structures written."""
        from HeartCompletionLib.io.labelmap_files import read_label_map

        from .results import import_completion_result

        result = read_label_map(self.outputPath, table=self.table)
        self.lastUndo = import_completion_result(
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

    # --- export ------------------------------------------------------------------------------------
    def export(self, kind, segmentationNode, folder, referenceVolume=None, meshFormat="STL"):
        """``kind``: "labelmap" (NIfTI, table values), "segnrrd" or "meshes"; returns the paths written."""
        from . import results

        if not segmentationNode or not folder:
            raise ValueError(_("Select a segmentation and an export folder."))
        self.installLogic.ensurePackages()
        stem = os.path.join(folder, segmentationNode.GetName())
        if kind == "labelmap":
            return [results.export_label_map(segmentationNode, stem + ".nii.gz", self.table, referenceVolume)]
        if kind == "segnrrd":
            return [results.write_seg_nrrd(segmentationNode, stem + ".seg.nrrd")]
        return results.export_structure_meshes(segmentationNode, stem + "-meshes", self.table, meshFormat)
