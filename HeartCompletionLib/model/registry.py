"""Named models: the small registry of checkpoints that ship with HeartCompletion.

The registry is ``models.json`` in the models folder (``HeartCompletionLib/model/bundled/`` by default;
the environment variable ``HEART_MODELS_DIR`` or a ``folder`` argument points elsewhere, e.g. in
tests). It is a JSON list of entries::

    {"name": "synthetic-demo", "file": "synthetic_demo.safetensors",
     "structures": ["Myocardium", "LA", ...], "trained_on": "...", "figures": {},
     "warning": "synthetic hearts only: not for patient data", "description": "..."}

``file`` is relative to the models folder; ``structures`` are the names of the checkpoint's
structure table, in order (checked when the model is loaded); ``figures`` holds the evaluation
study's numbers (empty until it has run); ``warning`` is shown wherever the model is used.

A registered model is only ever used when asked for by name: nothing picks it silently.
:func:`resolve_checkpoint` turns what a user typed into a file: an existing path wins, then a
registered name; anything else is an error that lists the known names.

>>> [entry.name for entry in load_registry()]
['synthetic-demo']
>>> load_registry()[0].warning
'synthetic hearts only: not for patient data'
>>> resolve_checkpoint("no-such-model")
Traceback (most recent call last):
...
HeartCompletionLib.model.registry.RegistryError: 'no-such-model' is neither a checkpoint file nor a registered model name (registered: synthetic-demo)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from HeartCompletionLib.errors import HeartCompletionError

#: Environment variable naming another models folder (its ``models.json`` replaces the bundled one).
MODELS_DIR_ENV = "HEART_MODELS_DIR"
REGISTRY_FILE = "models.json"
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "bundled"
_REQUIRED = ("name", "file", "structures", "trained_on", "warning", "description")


class RegistryError(HeartCompletionError, ValueError):
    """A registry that cannot be read, a name it does not hold, or a model file that is missing."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model; ``path`` is its checkpoint file in the models folder."""

    name: str
    file: str
    structures: tuple[str, ...]
    trained_on: str
    warning: str
    description: str
    figures: dict = field(default_factory=dict)
    folder: Path = BUNDLED_MODELS_DIR

    @property
    def path(self) -> Path:
        return self.folder / self.file

    @property
    def installed(self) -> bool:
        return self.path.is_file()

    def describe(self) -> str:
        """A few human-readable lines (the Slicer panel shows them)."""
        figures = ", ".join(f"{k}: {v}" for k, v in self.figures.items()) or "not measured yet"
        return (f"{self.name}: {self.description}\nTrained on: {self.trained_on}\nFigures: {figures}\n"
                f"Warning: {self.warning}")

    def check_table(self, table) -> None:
        """Refuse a checkpoint whose structure table is not the one the registry lists."""
        if list(self.structures) != list(table.names):
            raise RegistryError(
                f"{self.path}: the registry ({self.folder / REGISTRY_FILE}) lists other structures for model "
                f"{self.name!r} than the checkpoint holds.\n  registry:   {list(self.structures)}\n"
                f"  checkpoint: {list(table.names)}"
            )


def models_dir(folder=None) -> Path:
    """The models folder: ``folder``, else ``$HEART_MODELS_DIR``, else the bundled one."""
    if folder is not None:
        return Path(folder)
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else BUNDLED_MODELS_DIR


def _entry(raw, index: int, folder: Path, registry: Path) -> ModelEntry:
    where = f"{registry}: entry {index}"
    if not isinstance(raw, dict):
        raise RegistryError(f"{where} is a {type(raw).__name__}, expected an object with {list(_REQUIRED)}")
    if isinstance(raw.get("name"), str):
        where += f" ({raw['name']!r})"
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise RegistryError(f"{where}: missing {missing}")
    for key in ("name", "file", "trained_on", "warning", "description"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise RegistryError(f"{where}: {key!r} must be a non-empty string, got {raw[key]!r}")
    name, file = raw["name"], raw["file"]
    if any(c in name for c in "/\\") or name != name.strip():
        raise RegistryError(f"{where}: name {name!r} must not contain slashes or surrounding spaces")
    relative = Path(file)
    if relative.is_absolute() or ".." in relative.parts:
        raise RegistryError(f"{where}: file {file!r} must be relative to the models folder {folder}")
    structures = raw["structures"]
    if (not isinstance(structures, list) or not structures or not all(isinstance(s, str) and s for s in structures)
            or len(set(structures)) != len(structures)):
        raise RegistryError(f"{where}: 'structures' must be a non-empty list of distinct names, got {structures!r}")
    figures = raw.get("figures", {})
    if not isinstance(figures, dict):
        raise RegistryError(f"{where}: 'figures' must be an object, got {figures!r}")
    return ModelEntry(name, file, tuple(structures), raw["trained_on"], raw["warning"], raw["description"],
                      dict(figures), folder)


def load_registry(folder=None) -> list[ModelEntry]:
    """The entries of ``models.json`` in :func:`models_dir` (``[]`` when that folder has none).

    Raises :class:`RegistryError` naming the file for unreadable JSON or an invalid entry.
    """
    folder = models_dir(folder)
    registry = folder / REGISTRY_FILE
    if not registry.is_file():
        return []
    try:
        data = json.loads(registry.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{registry}: cannot read the model registry: {exc}") from exc
    if not isinstance(data, list):
        raise RegistryError(f"{registry}: the model registry must be a JSON list of models, got {type(data).__name__}")
    entries = [_entry(raw, i, folder, registry) for i, raw in enumerate(data)]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistryError(f"{registry}: model name(s) {duplicates} registered twice")
    return entries


def find_model(name: str, folder=None) -> ModelEntry | None:
    """The entry called ``name`` (exact), or ``None``."""
    return next((e for e in load_registry(folder) if e.name == name), None)


def resolve_checkpoint(name_or_path, folder=None) -> tuple[Path, ModelEntry | None]:
    """``(checkpoint file, registry entry or None)`` for a path or a registered model name.

    An existing path wins (its entry is ``None``: the registry is not even read). A registered
    name resolves to its file in the models folder; if that file is absent the error says that
    the bundled model is not installed. Anything else raises :class:`RegistryError` listing the
    registered names.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text and path.exists():
        return path, None
    entries = load_registry(folder)
    entry = next((e for e in entries if e.name == text), None)
    if entry is None:
        known = ", ".join(e.name for e in entries) or f"none in {models_dir(folder) / REGISTRY_FILE}"
        raise RegistryError(f"{text!r} is neither a checkpoint file nor a registered model name (registered: {known})")
    if not entry.installed:
        raise RegistryError(
            f"the bundled model {entry.name!r} is not installed: {entry.path} is missing "
            f"(registered in {entry.folder / REGISTRY_FILE}); reinstall HeartCompletion or pass a checkpoint file"
        )
    return entry.path, entry


def load_model(name_or_path, expected_table=None, device="cpu", folder=None):
    """``(InferenceCheckpoint, entry or None)``: :func:`resolve_checkpoint`, then load the file.

    A registered model's structure table must equal the registry's list (refused otherwise,
    both lists in the message); ``expected_table`` is checked as by ``load_inference_checkpoint``.
    """
    from .checkpoint import load_inference_checkpoint

    path, entry = resolve_checkpoint(name_or_path, folder)
    checkpoint = load_inference_checkpoint(path, expected_table=expected_table, device=device)
    if entry is not None:
        entry.check_table(checkpoint.table)
    return checkpoint, entry
