"""Static rules of the code's layout (issue 12, items 3 and 4), read with ``ast``; nothing is run.

- A library module carries no command line: ``main()`` and ``if __name__ == "__main__"`` live in
  the CLI modules only (``HeartCompletionLib/*_cli.py``; in ``training/`` the command modules below).
- No import cycle among the modules of ``HeartCompletionLib`` and ``heart_training``, counting the
  imports inside functions too (``model`` <-> ``model_configs`` and ``prepare`` <-> ``prepare_cli``
  were such cycles).
- Every command returns an :class:`~HeartCompletionLib.errors.ExitCode`, never a bare number.
- Every exception class of the project derives from ``HeartCompletionError``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from HeartCompletionLib.errors import ExitCode, HeartCompletionError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"HeartCompletionLib": ROOT / "HeartCompletionLib", "heart_training": ROOT / "training"}
#: training/ modules that are commands (console scripts, ``torchrun -m heart_training.train.trainer``)
TRAINING_COMMANDS = {"prepare_cli", "synth_cli", "split", "trainer", "evaluate"}
#: the functions that compute a command's exit status
EXIT_FUNCTIONS = {"main", "run_check_cli"}
#: exception classes in files another change owns right now (issue 12): they still need
#: ``HeartCompletionError`` as a first base; remove a name here once its file has it
PENDING_BASES: set[str] = set()


def _modules() -> dict[str, Path]:
    """Every module of the two packages, subpackages included, by its import name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)


def _is_command(name: str) -> bool:
    package, stem = name.split(".")[0], name.rsplit(".", 1)[-1]
    return stem.endswith("_cli") or (package == "heart_training" and stem in TRAINING_COMMANDS)


def test_only_cli_modules_have_a_command_line():
    offenders = []
    for name, path in MODULES.items():
        if _is_command(name):
            continue
        for node in _tree(path).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} def main")
            if _is_main_guard(node):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} if __name__ == '__main__'")
    assert not offenders, "library modules with a command line (move it to a *_cli module): " + ", ".join(offenders)


def test_every_cli_module_has_main_and_a_main_guard():
    for name, path in MODULES.items():
        if _is_command(name):
            body = _tree(path).body
            assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in body), name
            assert any(_is_main_guard(n) for n in body), name


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the two packages that ``name`` imports anywhere (top level or inside a function)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = anchor + ("." + base if base else "")
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_the_old_cycles():
    graph = {"a.model": {"a.model_configs"}, "a.model_configs": {"a.model"}, "a.x": {"a.model"}}
    assert _cycles(graph) == [["a.model", "a.model_configs"]]


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert "HeartCompletionLib.model.configs" in graph["HeartCompletionLib.model.vecset"]  # the finder sees imports
    assert "heart_training.data.prepare" in graph["heart_training.data.prepare_cli"]
    assert "HeartCompletionLib.model.vecset" not in graph["HeartCompletionLib.model.configs"]
    assert "heart_training.data.prepare_cli" not in graph["heart_training.data.prepare"]
    assert _cycles(graph) == []


def test_commands_return_exit_codes_not_numbers():
    """``return 2`` or ``EXIT_USAGE = 2`` in a command: use ``ExitCode`` (HeartCompletionLib/errors.py)."""
    offenders = []
    for path in MODULES.values():
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id.startswith("EXIT_"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.id}")
            if isinstance(node, ast.FunctionDef) and node.name in EXIT_FUNCTIONS:
                for inner in ast.walk(node):
                    value = getattr(inner, "value", None) if isinstance(inner, ast.Return) else None
                    numbers = [n for n in ast.walk(value) if isinstance(n, ast.Constant) and type(n.value) is int] \
                        if value is not None else []
                    if numbers:
                        offenders.append(f"{path.relative_to(ROOT)}:{inner.lineno} return {ast.unparse(value)}")
    assert not offenders, "bare exit numbers: " + ", ".join(offenders)


def test_exit_code_values_are_the_documented_ones():
    assert [int(ExitCode.OK), int(ExitCode.FAILED), int(ExitCode.USAGE)] == [0, 1, 2]
    assert ExitCode.BAD_INPUT is ExitCode.USAGE  # one value, two names


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith(("_cli", "__main__"))))
def test_exception_classes_derive_from_the_common_base(name):
    module_text = MODULES[name].read_text(encoding="utf-8")
    if "Error(" not in module_text:
        return
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # e.g. a module that needs Slicer
        pytest.skip(f"{name}: {exc}")
    for attr, cls in vars(module).items():
        if not (inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == name):
            continue
        if not attr.endswith("Error") or f"{name}.{attr}" in PENDING_BASES:
            continue
        assert issubclass(cls, HeartCompletionError), f"{name}.{attr} does not derive from HeartCompletionError"


#: the only modules at the top of each package; everything else lives in a subpackage (issue 12, item 5)
TOP_LEVEL = {"HeartCompletionLib": {"__init__", "errors", "atomic_io", "moved_modules"}, "heart_training": {"__init__", "config"}}


def test_modules_live_in_subpackages():
    for package, folder in PACKAGES.items():
        assert {p.stem for p in folder.glob("*.py")} == TOP_LEVEL[package], package
    subpackages = {name for name, path in MODULES.items() if path.stem == "__init__" and "." in name}
    assert subpackages == {
        "HeartCompletionLib.structures", "HeartCompletionLib.io", "HeartCompletionLib.geometry",
        "HeartCompletionLib.model", "HeartCompletionLib.inference",
        "heart_training.data", "heart_training.train", "heart_training.evaluation",
    }


@pytest.mark.parametrize("package", sorted(n for n, p in MODULES.items() if p.stem == "__init__" and "." in n))
def test_each_subpackage_docstring_names_its_modules(package):
    """A subpackage's docstring is its table of contents: every module in it, and none that is gone."""
    init = MODULES[package]
    doc = ast.get_docstring(_tree(init)) or ""
    here = {p.stem for p in init.parent.glob("*.py")} - {"__init__"}
    named = set(re.findall(r":mod:`\.(\w+)`", doc))
    assert named == here, f"{package}: docstring names {sorted(named)}, folder holds {sorted(here)}"


#: the subpackages as layers: a module imports only from its own layer and the ones before it
#: (the package's top-level modules -- errors, atomic writes, old paths, the training config -- come first)
LAYERS = [
    "HeartCompletionLib.structures", "HeartCompletionLib.geometry", "HeartCompletionLib.io",
    "HeartCompletionLib.model", "HeartCompletionLib.inference",
    "heart_training.data", "heart_training.train", "heart_training.evaluation",
]


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name == layer or name.startswith(layer + "."):
            return i
    # top-level modules: HeartCompletionLib's before every layer, heart_training's (config) before its subpackages
    return -1 if name.startswith("HeartCompletionLib") else LAYERS.index("heart_training.data") - 0.5


def test_subpackages_import_only_earlier_layers():
    upward = [f"{name} -> {dep}" for name, path in MODULES.items() for dep in _imports(name, path)
              if _layer(dep) > _layer(name)]
    assert not upward, "imports against the layer order: " + ", ".join(sorted(upward))
    assert _layer("HeartCompletionLib.io.labelmap") > _layer("HeartCompletionLib.geometry.affine")  # the rule is live
