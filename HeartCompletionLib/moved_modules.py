"""Where the modules lived before the subpackages: old import paths keep working, with a warning.

Until version 0.1 (November 2026) both packages were flat (``HeartCompletionLib.completion``,
``heart_training.trainer``). Scripts, notebooks and Slurm job files written then keep working:

- ``import HeartCompletionLib.completion`` (or ``from ... import``) gives the module
  ``HeartCompletionLib.inference.completion`` itself (the same object, no copy), with a
  :class:`DeprecationWarning` that names the new path;
- ``python -m heart_training.trainer`` (``torchrun -m`` too) runs ``heart_training.train.trainer``;
- three old modules are now packages of the same name (``structures``, ``geometry``, ``model``):
  their old names (``from HeartCompletionLib.structures import StructureTable``) resolve through
  :func:`forward_old_names`, the package's ``__getattr__``.

:data:`MOVED` is the one table of the move. Nothing here imports a module of the project until an
old name is asked for. ``HeartCompletionLib/__init__.py`` and ``heart_training``'s install the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module -> new module, for the modules that moved into a subpackage
MOVED: dict[str, str] = {
    "HeartCompletionLib.label_conventions": "HeartCompletionLib.structures.conventions",
    "HeartCompletionLib.segment_mapping": "HeartCompletionLib.structures.segment_mapping",
    "HeartCompletionLib.segment_mapping_cli": "HeartCompletionLib.structures.segment_mapping_cli",
    "HeartCompletionLib.labelmap": "HeartCompletionLib.io.labelmap",
    "HeartCompletionLib.labelmap_io": "HeartCompletionLib.io.labelmap_files",
    "HeartCompletionLib.sitk_io": "HeartCompletionLib.io.metaimage",
    "HeartCompletionLib.meshes": "HeartCompletionLib.io.meshes",
    "HeartCompletionLib.normalization": "HeartCompletionLib.geometry.normalization",
    "HeartCompletionLib.surface": "HeartCompletionLib.geometry.surface",
    "HeartCompletionLib.signed_distance": "HeartCompletionLib.geometry.signed_distance",
    "HeartCompletionLib.metrics": "HeartCompletionLib.geometry.metrics",
    "HeartCompletionLib.synthetic": "HeartCompletionLib.io.synthetic",
    "HeartCompletionLib.model_configs": "HeartCompletionLib.model.configs",
    "HeartCompletionLib.model_configs_cli": "HeartCompletionLib.model.configs_cli",
    "HeartCompletionLib.encoder_input": "HeartCompletionLib.model.encoder_input",
    "HeartCompletionLib.checkpoint": "HeartCompletionLib.model.checkpoint",
    "HeartCompletionLib.checkpoint_cli": "HeartCompletionLib.model.checkpoint_cli",
    "HeartCompletionLib.model_registry": "HeartCompletionLib.model.registry",
    "HeartCompletionLib.completion": "HeartCompletionLib.inference.completion",
    "HeartCompletionLib.decode_grid": "HeartCompletionLib.inference.decode_grid",
    "HeartCompletionLib.output_grid": "HeartCompletionLib.inference.output_grid",
    "HeartCompletionLib.islands": "HeartCompletionLib.inference.islands",
    "HeartCompletionLib.envelope": "HeartCompletionLib.inference.envelope",
    "HeartCompletionLib.complete_cli": "HeartCompletionLib.inference.complete_cli",
    "HeartCompletionLib.completion_process": "HeartCompletionLib.inference.completion_process",
    "heart_training.case_format": "heart_training.data.case_format",
    "heart_training.prepare": "heart_training.data.prepare",
    "heart_training.prepare_cli": "heart_training.data.prepare_cli",
    "heart_training.dataset": "heart_training.data.dataset",
    "heart_training.dataset_check": "heart_training.data.dataset_check",
    "heart_training.device_data": "heart_training.data.device_data",
    "heart_training.phase_masks": "heart_training.data.phase_masks",
    "heart_training.split": "heart_training.data.split",
    "heart_training.synth_cli": "heart_training.data.synth_cli",
    "heart_training.data_gate": "heart_training.data.data_gate",
    "heart_training.engine": "heart_training.train.engine",
    "heart_training.trainer": "heart_training.train.trainer",
    "heart_training.losses": "heart_training.train.losses",
    "heart_training.distributed": "heart_training.train.distributed",
    "heart_training.train_logging": "heart_training.train.logs",
    "heart_training.train_state": "heart_training.train.state",
    "heart_training.evaluate": "heart_training.evaluation.evaluate",
    "heart_training.baseline": "heart_training.evaluation.baseline",
    "heart_training.scenarios": "heart_training.evaluation.scenarios",
    "heart_training.report": "heart_training.evaluation.report",
    "heart_training.near_iou": "heart_training.evaluation.near_iou",
    "heart_training.input_use": "heart_training.evaluation.input_use",
}

#: an old module that is now a package of the same name -> the module that holds its old contents
PACKAGE_FORMERLY_MODULE: dict[str, str] = {
    "HeartCompletionLib.structures": "HeartCompletionLib.structures.table",
    "HeartCompletionLib.geometry": "HeartCompletionLib.geometry.affine",
    "HeartCompletionLib.model": "HeartCompletionLib.model.vecset",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old name as the new module itself; ``get_code`` serves ``python -m OLD``."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec):
        _warn(self.old, self.new)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec  # the import machinery set the old name's spec on it

    def get_code(self, fullname):
        _warn(self.old, self.new)
        source = f"import runpy\nrunpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{self.old}: moved to {self.new}>", "exec")


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(fullname, new))


def install_moved_module_finder() -> None:
    """Put the finder of old module names on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


_MISSING = object()


def forward_old_names(package: str):
    """A module ``__getattr__`` for ``package``: a name the old module of that name had is
    looked up in the module that holds it now (with a :class:`DeprecationWarning`). Modules the old
    one imported (``torch``, ``np``) are not among its names: torch's compiler probes such
    attributes, hundreds of times per compiled model, and each used to warn."""
    holder = PACKAGE_FORMERLY_MODULE[package]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(holder), name, _MISSING)
        if value is _MISSING or isinstance(value, types.ModuleType):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        _warn(f"{package}.{name}", f"{holder}.{name}")
        return value

    return __getattr__
