"""The panel checked statically against its .ui file (the widget cannot run without Slicer).

``HeartCompletionModule/widget.py`` (and the self-test in ``HeartCompletion.py``) is read with
``ast``: every ``<x>.ui.<name>`` it uses must be a widget of ``Resources/UI/HeartCompletion.ui``,
and what it does with that widget must exist on the widget's class: the signals it connects
(with their exact signatures, as PythonQt needs them), the properties it reads or assigns
(assigned ones writable), the methods it calls. Local aliases (``table = self.ui.structureTable``)
are followed. The table below lists the members of the Qt, CTK and Slicer classes the .ui uses;
a class or member missing from it fails the test rather than passing unchecked. Also here: the
module keeps its layers apart (no Slicer in ``HeartCompletionLib``, no Qt in the logic), and the
extension's CMake file packages every module file.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "HeartCompletion"
PACKAGE_DIR = MODULE_DIR / "HeartCompletionModule"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "HeartCompletion.ui"
#: Files whose ``.ui.<name>`` uses are checked.
UI_USERS = (PACKAGE_DIR / "widget.py", MODULE_DIR / "HeartCompletion.py")

#: Members of the widget classes the .ui uses (from the Qt 5, CTK and Slicer class references),
#: each class listing its own and naming its base. ``properties``: writable Q_PROPERTYs;
#: ``readonly``: read-only ones; ``methods``: callables used from Python.
WIDGET_CLASSES = {
    "QObject": {"base": None, "signals": {"destroyed()"}, "properties": {"objectName"}, "readonly": set(),
                "methods": {"connect", "disconnect", "blockSignals", "setProperty", "property"}},
    "QWidget": {"base": "QObject", "signals": set(),
                "properties": {"enabled", "visible", "toolTip", "styleSheet", "minimumHeight", "maximumHeight"},
                "readonly": set(),
                "methods": {"show", "hide", "setVisible", "setEnabled", "isHidden", "isVisible", "isEnabled",
                            "setToolTip", "setStyleSheet"}},
    "QAbstractButton": {"base": "QWidget", "signals": {"clicked()", "clicked(bool)", "toggled(bool)", "pressed()",
                                                       "released()"},
                        "properties": {"text", "checkable", "checked", "icon"}, "readonly": set(),
                        "methods": {"click", "setText", "text", "setChecked", "isChecked"}},
    "QPushButton": {"base": "QAbstractButton", "signals": set(), "properties": {"default", "flat"}, "readonly": set(),
                    "methods": set()},
    "QCheckBox": {"base": "QAbstractButton", "signals": {"stateChanged(int)"}, "properties": {"tristate"},
                  "readonly": set(), "methods": {"checkState", "setCheckState"}},
    "QLabel": {"base": "QWidget", "signals": {"linkActivated(QString)"}, "properties": {"text", "wordWrap"},
               "readonly": set(), "methods": {"setText", "text", "clear"}},
    "QComboBox": {"base": "QWidget", "signals": {"currentIndexChanged(int)", "currentTextChanged(QString)",
                                                 "activated(int)"},
                  "properties": {"currentIndex", "currentText", "editable"}, "readonly": {"count", "currentData"},
                  "methods": {"addItem", "addItems", "insertItem", "clear", "findData", "findText", "itemText",
                              "itemData", "setCurrentIndex", "setCurrentText"}},
    "QTableWidget": {"base": "QWidget", "signals": {"cellChanged(int,int)", "itemChanged(QTableWidgetItem*)"},
                     "properties": {"rowCount", "columnCount"}, "readonly": set(),
                     "methods": {"setRowCount", "setColumnCount", "insertRow", "removeRow", "setItem", "item",
                                 "setCellWidget", "cellWidget", "clearContents", "rowCount"}},
    "QProgressBar": {"base": "QWidget", "signals": {"valueChanged(int)"},
                     "properties": {"value", "minimum", "maximum", "format", "textVisible"}, "readonly": {"text"},
                     "methods": {"setValue", "reset", "setRange"}},
    "QPlainTextEdit": {"base": "QWidget", "signals": {"textChanged()"},
                       "properties": {"plainText", "readOnly", "maximumBlockCount", "placeholderText"},
                       "readonly": set(), "methods": {"appendPlainText", "clear", "setPlainText", "toPlainText"}},
    "ctkCollapsibleButton": {"base": "QAbstractButton", "signals": {"contentsCollapsed(bool)"},
                             "properties": {"collapsed"}, "readonly": set(), "methods": set()},
    "ctkPathLineEdit": {"base": "QWidget", "signals": {"currentPathChanged(QString)", "validInputChanged(bool)"},
                        "properties": {"currentPath", "filters", "nameFilters", "settingKey", "showHistoryButton"},
                        "readonly": set(), "methods": {"setCurrentPath", "addCurrentPathToHistory"}},
    "qMRMLWidget": {"base": "QWidget", "signals": {"mrmlSceneChanged(vtkMRMLScene*)"}, "properties": set(),
                    "readonly": set(), "methods": {"setMRMLScene", "mrmlScene"}},
    "qMRMLNodeComboBox": {"base": "qMRMLWidget",
                          "signals": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
                                      "currentNodeIDChanged(QString)", "nodeAdded(vtkMRMLNode*)"},
                          "properties": {"currentNodeID", "nodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
                                         "renameEnabled", "showHidden", "showChildNodeTypes"},
                          "readonly": set(), "methods": {"currentNode", "setCurrentNode", "setCurrentNodeID"}},
}


def members(cls: str, kind: str) -> set[str]:
    out: set[str] = set()
    while cls is not None:
        out |= WIDGET_CLASSES[cls][kind]
        cls = WIDGET_CLASSES[cls]["base"]
    return out


def ui_widgets() -> dict[str, str]:
    """``{widget name: class}`` of every widget in the .ui."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def ui_name(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The .ui widget an expression denotes: ``<x>.ui.<name>`` or an alias of one."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
        return node.attr
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    return None


def ui_uses(path: Path) -> list[tuple[str, str, str, int]]:
    """``(widget, kind, member, line)`` for each use: kind is "widget" (a bare reference),
    "signal" (``.connect("sig(...)", ...)``), "call", "read" or "write"."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    uses = []
    for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))]:
        aliases = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = ui_name(node.value, {})
                if name is not None:
                    aliases[node.targets[0].id] = name
        for node in ast.walk(function):
            widget = ui_name(node, aliases)
            if widget is None or (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)):
                continue
            uses.append((widget, "widget", "", node.lineno))
            parent = parents.get(node)
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                continue
            member, grand = parent.attr, parents.get(parent)
            if isinstance(grand, ast.Call) and grand.func is parent:
                if member == "connect" and grand.args and isinstance(grand.args[0], ast.Constant):
                    uses.append((widget, "signal", grand.args[0].value, node.lineno))
                else:
                    uses.append((widget, "call", member, node.lineno))
            elif isinstance(parent.ctx, ast.Store):
                uses.append((widget, "write", member, node.lineno))
            else:
                uses.append((widget, "read", member, node.lineno))
    return uses


def test_the_table_knows_every_widget_class_of_the_ui():
    unknown = {cls for cls in ui_widgets().values() if cls not in WIDGET_CLASSES}
    assert not unknown, f"add these classes (signals, properties, methods) to WIDGET_CLASSES: {sorted(unknown)}"


@pytest.mark.parametrize("path", UI_USERS, ids=lambda p: p.name)
def test_every_ui_use_exists_in_the_ui_file(path):
    widgets = ui_widgets()
    uses = ui_uses(path)
    assert uses, f"{path.name}: no .ui uses found (has the panel moved?)"
    problems = []
    for widget, kind, member, line in uses:
        where = f"{path.name}:{line}: {widget}"
        if widget not in widgets:
            problems.append(f"{where}: no such widget in {UI_FILE.name}")
            continue
        cls = widgets[widget]
        if kind == "signal":
            if re.sub(r"\s+", "", member) not in members(cls, "signals"):
                problems.append(f"{where}: {cls} has no signal {member!r}")
        elif kind == "write" and member not in members(cls, "properties"):
            problems.append(f"{where}: {cls} has no writable property {member!r}")
        elif kind == "read" and member not in members(cls, "properties") | members(cls, "readonly") | members(cls, "methods"):
            problems.append(f"{where}: {cls} has no property {member!r}")
        elif kind == "call" and member not in members(cls, "methods"):
            problems.append(f"{where}: {cls} has no method {member!r}")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_wrong_uses(tmp_path):
    """The checker itself: a wrong name, signal signature, property and read-only write are found."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(self):\n"
        "    self.ui.applyButton.connect('clicked(int)', f)\n"
        "    self.ui.progressBar.text = 'x'\n"
        "    combo = self.ui.modelComboBox\n"
        "    combo.currentData = 1\n"
        "    self.ui.noSuchWidget.show()\n"
        "    self.ui.statusLabel.txet = ''\n",
        encoding="utf-8",
    )
    widgets = ui_widgets()
    found = []
    for widget, kind, member, _line in ui_uses(bad):
        cls = widgets.get(widget)
        ok = cls is not None and (
            kind == "widget"
            or (kind == "signal" and member in members(cls, "signals"))
            or (kind == "write" and member in members(cls, "properties"))
            or (kind == "call" and member in members(cls, "methods"))
        )
        if not ok:
            found.append((widget, member))
    assert ("applyButton", "clicked(int)") in found and ("progressBar", "text") in found
    assert ("modelComboBox", "currentData") in found and ("noSuchWidget", "") in found
    assert ("statusLabel", "txet") in found


def test_parameter_node_fields_are_the_ui_bindings():
    """Every widget bound to the parameter node names a field of ``HeartCompletionParameterNode``."""
    ui = ET.parse(UI_FILE).getroot()
    bound = {prop.find("string").text for prop in ui.iter("property") if prop.get("name") == "SlicerParameterName"}
    tree = ast.parse((PACKAGE_DIR / "parameters.py").read_text(encoding="utf-8"))
    (node_class,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HeartCompletionParameterNode"]
    assert bound == {n.target.id for n in node_class.body if isinstance(n, ast.AnnAssign)}


# --- layers and packaging -------------------------------------------------------------------------------

APPLICATION = {"slicer", "qt", "vtk", "ctk"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted((REPO / "HeartCompletionLib").rglob("*.py")), ids=lambda p: p.name)
def test_the_core_library_never_imports_slicer(path):
    assert not imported_roots(path) & APPLICATION


@pytest.mark.parametrize("name", ["signals", "i18n", "segments", "results", "install", "logic"])
def test_the_logic_side_imports_no_qt(name):
    """Only the panel (widget, parameters) may need Slicer's application layer; ``i18n`` tries it."""
    modules = imported_modules(PACKAGE_DIR / f"{name}.py")
    assert not modules & {"qt", "ctk", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule"}
    if name != "i18n":
        assert "slicer.i18n" not in modules


def test_reload_order_is_the_dependency_order():
    """``SUBMODULES`` names every submodule once, each after the submodules it imports."""
    namespace: dict = {}
    exec((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"), namespace)
    order = list(namespace["SUBMODULES"])
    assert sorted(order) == sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
    for position, name in enumerate(order):
        tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"))
        siblings = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                siblings |= {node.module} if node.module else {a.name for a in node.names}
        assert siblings <= set(order[:position]), f"{name} imports {siblings - set(order[:position])} reloaded later"


def test_cmake_packages_every_module_file():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", cmake, re.S).group(1).split()
    listed = {entry.replace("${MODULE_NAME}", "HeartCompletion") for entry in listed}
    present = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == present


def test_module_files_compile_and_are_ruff_clean():
    files = [str(p) for p in [MODULE_DIR / "HeartCompletion.py", *sorted(PACKAGE_DIR.glob("*.py"))]]
    subprocess.run([sys.executable, "-m", "py_compile", *files], check=True)
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", *files], capture_output=True, text=True)
    if "No module named ruff" in ruff.stderr:
        pytest.skip("ruff is not installed")
    assert ruff.returncode == 0, ruff.stdout
