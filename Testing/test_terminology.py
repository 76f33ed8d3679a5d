"""Terminology and extension packaging: the structure table, the shipped ``.term.json``, the
segment terminology strings and the module's files all agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.structures.segment_mapping import (
    TERMINOLOGY_CONTEXT_NAME,
    SegmentInfo,
    map_segments,
    match_segment,
    parse_terminology_entry,
    terminology_context,
    terminology_entry,
    write_terminology_context,
)
from HeartCompletionLib.structures.table import StructureTable

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "HeartCompletion"
TERM_JSON = MODULE_DIR / "Resources" / "HeartCompletion.term.json"
TABLE = StructureTable.default()
#: SNOMED CT codes fixed by DESIGN.md ("Terminology").
DESIGN_CODES = {
    "Myocardium": "74281007",
    "LA": "82471001",
    "LV": "87878005",
    "RA": "73829009",
    "RV": "53085002",
    "Aorta": "15825003",
    "PA": "81040000",
    "LAA": "33626005",
    "Coronary": "41801008",
    "PV": "122972007",
}


def entry_with(type_code, type_meaning="x", modifier=("", "", "")):
    return (
        "Some context~SCT^123037004^Anatomical Structure~SCT^" + f"{type_code}^{type_meaning}~" + "^".join(modifier)
        + "~Anatomic codes - DICOM master list~^^~^^"
    )


# --- table <-> DESIGN <-> .term.json ------------------------------------------------------------


def test_table_codes_are_the_design_codes():
    assert {s.name: s.snomed_code for s in TABLE} == DESIGN_CODES
    colours = [s.color for s in TABLE]
    assert len(set(colours)) == len(colours), "two structures share a colour"


def test_shipped_term_json_is_generated_from_the_table(tmp_path):
    shipped = json.loads(TERM_JSON.read_text(encoding="utf-8"))
    assert shipped == terminology_context(TABLE), (
        "HeartCompletion.term.json is stale: regenerate with "
        "python -m HeartCompletionLib.structures.segment_mapping_cli --output HeartCompletion/Resources/HeartCompletion.term.json"
    )
    regenerated = write_terminology_context(tmp_path / "t.term.json")
    assert regenerated.read_text(encoding="utf-8") == TERM_JSON.read_text(encoding="utf-8")
    (category,) = shipped["SegmentationCodes"]["Category"]
    assert category["CodeValue"] == "123037004"
    by_name = {t["3dSlicerLabel"]: t for t in category["Type"]}
    assert set(by_name) == set(TABLE.names)  # Myocardium included: it is not in Slicer's lists
    for s in TABLE:
        assert by_name[s.name]["CodeValue"] == s.snomed_code
        assert by_name[s.name]["recommendedDisplayRGBValue"] == list(s.color)


def test_slicer_loads_the_term_json_and_our_entries():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(TERM_JSON)) == TERMINOLOGY_CONTEXT_NAME
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(TERMINOLOGY_CONTEXT_NAME, 0, category)
    assert logic.GetNumberOfTypesInTerminologyCategory(TERMINOLOGY_CONTEXT_NAME, category) == len(TABLE)
    for index in range(len(TABLE)):
        term_type = slicer.vtkSlicerTerminologyType()
        logic.GetNthTypeInTerminologyCategory(TERMINOLOGY_CONTEXT_NAME, category, index, term_type)
        structure = TABLE.by_name(term_type.GetSlicerLabel())
        assert term_type.GetCodeValue() == structure.snomed_code
        assert tuple(term_type.GetRecommendedDisplayRGBValue()) == structure.color
    for structure in TABLE:
        text = terminology_entry(structure)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(text, entry)
        assert entry.GetTypeObject().GetCodeValue() == structure.snomed_code
        assert entry.GetCategoryObject().GetCodeValue() == "123037004"
        assert logic.SerializeTerminologyEntry(entry) == text
        assert parse_terminology_entry(text).type_code == structure.snomed_code


# --- mapping rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, terminology, expected, how",
    [
        ("Segment_1", entry_with("68786006", "Auricular appendage", ("SCT", "7771000", "Left")), "LAA", "terminology"),
        ("Segment_1", entry_with("33626005", "Left auricular appendage"), "LAA", "terminology"),
        ("Segment_1", entry_with("68786006", "Auricular appendage", ("SCT", "24028007", "Right")), None, "none"),
        ("LA", entry_with("87878005", "Left ventricle"), "LV", "terminology"),  # the code wins over the name
        ("LV", entry_with("85756007", "Tissue"), "LV", "name"),  # Slicer's default entry says nothing
        ("heart_atrium_right", "", "RA", "name"),
        ("Pulmonary Veins", "garbage-without-fields", "PV", "name"),
        ("Tumor", entry_with("108369006", "Neoplasm"), None, "none"),
    ],
)
def test_match_segment(name, terminology, expected, how):
    structure, matched_by = match_segment(name, terminology, TABLE)
    assert (structure.name if structure else None, matched_by) == (expected, how)


def test_labelmap_io_seg_nrrd_maps_back_through_slicer(tmp_path):
    """A .seg.nrrd written by labelmap_io, opened by Slicer, maps back to the same structures."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from HeartCompletionModule import segments

    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.labelmap_files import write_label_map

    labels = np.zeros((6, 6, 12), np.int16)
    for s in TABLE:
        labels[1:4, 1:4, s.label] = s.label
    path = write_label_map(LabelMap(labels, np.eye(4)), tmp_path / "all.seg.nrrd")
    slicer.mrmlScene = slicer.vtkMRMLScene()
    segments.ensure_segmentation_converters()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "all")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    infos = segments.segment_infos(node)
    # rename every segment so only the terminology can identify it
    renamed = [SegmentInfo(i.segment_id, f"Segment_{n}", i.terminology) for n, i in enumerate(infos)]
    mappings = map_segments(renamed, TABLE)
    assert all(m.matched_by == "terminology" for m in mappings)
    for info, mapping in zip(infos, mappings):
        assert mapping.structure.name == info.name


# --- the extension's files ----------------------------------------------------------------------------


def test_module_compiles_and_is_ruff_clean():
    module = MODULE_DIR / "HeartCompletion.py"
    subprocess.run([sys.executable, "-m", "py_compile", str(module)], check=True)
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", str(module)], capture_output=True, text=True)
    if "No module named ruff" in ruff.stderr:
        pytest.skip("ruff is not installed")
    assert ruff.returncode == 0, ruff.stdout


# The panel against its .ui (widgets, signals, properties, parameter-node bindings) and the module
# package's layering and packaging: Testing/test_slicer_widget_static.py.


def test_cmake_lists_name_existing_files_and_metadata():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', top), key
    assert 'set(EXTENSION_CATEGORY "Cardiac")' in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(HeartCompletion)" in top
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", module_cmake, re.S).group(1).split()
    for resource in resources:
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "HeartCompletion")).is_file(), resource
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    # the library goes into the extension whole: every .py of every subpackage, and every data file
    assert "file(GLOB_RECURSE _lib_scripts RELATIVE ${_lib_source_dir} ${_lib_source_dir}/HeartCompletionLib/*.py)" in module_cmake
    globs = re.findall(r"\$\{_lib_source_dir\}/(HeartCompletionLib/\S+)", module_cmake.split("_lib_resources", 1)[1].split(")", 1)[0])
    data_files = [p.relative_to(REPO) for p in (REPO / "HeartCompletionLib").rglob("*")
                  if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts]
    assert data_files and globs
    unpackaged = [str(f) for f in data_files if not any(f.match(g) and len(f.parts) == len(Path(g).parts) for g in globs)]
    assert not unpackaged, f"library data files the extension would leave out: {unpackaged}"
    assert (REPO / "Resources" / "HeartCompletion.png").is_file()
