"""Map Slicer segments onto the structure table, and the extension's terminology (Slicer-free).

A Slicer segment carries a name and (usually) a terminology entry: a string of seven ``~``
separated fields, ``context~category~type~typeModifier~anatomicContext~region~regionModifier``,
each coded field written ``scheme^code^meaning``. A segment is mapped to a structure by its
SNOMED CT type code (and modifier) first, then by its name and the table's synonyms; Slicer's
generic default entry ("Tissue") says nothing, so such segments fall through to their names.

The extension's ``.term.json`` (a Slicer terminology context) is generated from the structure
table here, so names, colours and codes live in one place (``structures_default.json``); the
command that rewrites it is :mod:`.segment_mapping_cli`.

>>> from HeartCompletionLib.structures.table import StructureTable
>>> table = StructureTable.default()
>>> entry = terminology_entry(table.by_name("LAA"))
>>> parse_terminology_entry(entry).type_code
'33626005'
>>> [(m.structure.name if m.structure else None, m.matched_by) for m in map_segments(
...     [SegmentInfo("s1", "left ventricle"), SegmentInfo("s2", "Tumor"),
...      SegmentInfo("s3", "Segment_3", entry)], table)]
[('LV', 'name'), (None, 'none'), ('LAA', 'terminology')]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from HeartCompletionLib.atomic_io import atomic_write_text

from .table import SNOMED_CATEGORY_CODE, SNOMED_CATEGORY_MEANING, SNOMED_SCHEME, Structure, StructureTable

#: Name of the terminology context in the extension's ``.term.json`` (shown in Slicer's
#: terminology selector; written into every segment's terminology entry).
TERMINOLOGY_CONTEXT_NAME = "Segmentation category and type - HeartCompletion"
#: Slicer's default anatomic context (our entries leave the anatomic region empty).
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"
#: File name of the terminology context shipped with the module (under ``HeartCompletion/Resources``).
TERMINOLOGY_FILE_NAME = "HeartCompletion.term.json"
#: SNOMED CT codes that Slicer assigns to new segments by default; they name no structure.
GENERIC_TYPE_CODES = frozenset({"85756007"})  # "Tissue"


@dataclass(frozen=True)
class CodedEntry:
    """One DICOM coded concept (``scheme^code^meaning``); empty strings when absent."""

    scheme: str = ""
    code: str = ""
    meaning: str = ""

    def serialize(self) -> str:
        return f"{self.scheme}^{self.code}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> CodedEntry:
        parts = (text.split("^") + ["", "", ""])[:3]
        return cls(*(p.strip() for p in parts))


@dataclass(frozen=True)
class TerminologyEntry:
    """A parsed Slicer terminology entry (see the module docstring for the string format)."""

    context: str = ""
    category: CodedEntry = CodedEntry()
    type: CodedEntry = CodedEntry()
    type_modifier: CodedEntry = CodedEntry()
    anatomic_context: str = ""
    region: CodedEntry = CodedEntry()
    region_modifier: CodedEntry = CodedEntry()

    @property
    def type_code(self) -> str:
        return self.type.code

    @property
    def type_modifier_code(self) -> str:
        return self.type_modifier.code

    def serialize(self) -> str:
        return "~".join(
            [
                self.context,
                self.category.serialize(),
                self.type.serialize(),
                self.type_modifier.serialize(),
                self.anatomic_context,
                self.region.serialize(),
                self.region_modifier.serialize(),
            ]
        )


def parse_terminology_entry(text: str | None) -> TerminologyEntry:
    """Parse a Slicer terminology string; an empty or malformed string gives an empty entry.

    Newer Slicer versions may append ``|``-separated extras; they are ignored.
    """
    if not text:
        return TerminologyEntry()
    fields = text.split("|")[0].split("~")
    if len(fields) < 3:
        return TerminologyEntry()
    fields = (fields + [""] * 7)[:7]
    return TerminologyEntry(
        context=fields[0],
        category=CodedEntry.parse(fields[1]),
        type=CodedEntry.parse(fields[2]),
        type_modifier=CodedEntry.parse(fields[3]),
        anatomic_context=fields[4],
        region=CodedEntry.parse(fields[5]),
        region_modifier=CodedEntry.parse(fields[6]),
    )


def terminology_entry(structure: Structure, context_name: str = TERMINOLOGY_CONTEXT_NAME) -> str:
    """The Slicer terminology string our result segments carry for ``structure``.

    Structures without a SNOMED CT code (e.g. an extended table's extra entries) get an empty
    type, which Slicer shows as "no terminology" rather than a wrong code.
    """
    type_entry = (
        CodedEntry(SNOMED_SCHEME, structure.snomed_code, structure.snomed_meaning or structure.name)
        if structure.snomed_code
        else CodedEntry()
    )
    return TerminologyEntry(
        context=context_name,
        category=CodedEntry(SNOMED_SCHEME, SNOMED_CATEGORY_CODE, SNOMED_CATEGORY_MEANING),
        type=type_entry,
        anatomic_context=ANATOMIC_CONTEXT_NAME,
    ).serialize()


# --- mapping segments ---------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentInfo:
    """What the mapping needs to know about one segment: its ID, name and terminology string."""

    segment_id: str
    name: str
    terminology: str = ""


@dataclass(frozen=True)
class SegmentMapping:
    """One segment and the structure it stands for (``None``: ignored by the completion).

    ``matched_by`` is ``"terminology"``, ``"name"``, ``"user"`` or ``"none"``.
    """

    segment: SegmentInfo
    structure: Structure | None
    matched_by: str

    @property
    def label(self) -> int:
        """Table label value, 0 when unmapped."""
        return self.structure.label if self.structure is not None else 0


def match_segment(name: str, terminology: str, table: StructureTable) -> tuple[Structure | None, str]:
    """Structure for one segment: terminology code (and modifier) first, then name/synonyms."""
    entry = parse_terminology_entry(terminology)
    if entry.type_code and entry.type_code not in GENERIC_TYPE_CODES:
        structure = table.match_terminology(entry.type_code, entry.type_modifier_code or None)
        if structure is not None:
            return structure, "terminology"
    structure = table.match_name(name) if name else None
    if structure is not None:
        return structure, "name"
    return None, "none"


def map_segments(segments: Iterable[SegmentInfo], table: StructureTable) -> list[SegmentMapping]:
    """Map every segment (in the given order) onto the table; unmapped ones get ``None``.

    Several segments may map to one structure (their voxels are united in the input).
    """
    out = []
    for seg in segments:
        structure, how = match_segment(seg.name, seg.terminology, table)
        out.append(SegmentMapping(seg, structure, how))
    return out


def with_user_choice(mapping: SegmentMapping, structure: Structure | None) -> SegmentMapping:
    """The mapping after the user picked ``structure`` (``None`` = ignore) in the table."""
    return SegmentMapping(mapping.segment, structure, "user" if structure is not None else "none")


def mapped_labels(mappings: Sequence[SegmentMapping]) -> list[int]:
    """Table labels that at least one segment provides, sorted."""
    return sorted({m.label for m in mappings if m.structure is not None})


def default_structures_to_complete(mappings: Sequence[SegmentMapping], table: StructureTable) -> list[Structure]:
    """The structures no segment provides: what "Complete heart" produces by default."""
    given = set(mapped_labels(mappings))
    return [s for s in table if s.label not in given]


def segment_labels(mappings: Sequence[SegmentMapping]) -> dict[str, int]:
    """``{segment ID: table label}`` for the mapped segments (the input of the label-map export)."""
    return {m.segment.segment_id: m.label for m in mappings if m.structure is not None}


# --- the .term.json ---------------------------------------------------------------------------


def terminology_context(table: StructureTable, context_name: str = TERMINOLOGY_CONTEXT_NAME) -> dict:
    """A Slicer terminology context (the ``.term.json`` schema of dcmqi) for the table.

    One category (SNOMED CT "Anatomical Structure"); one type per structure with a SNOMED CT
    code, with ``3dSlicerLabel`` = the structure name and the table's colour as
    ``recommendedDisplayRGBValue``.
    """
    types = []
    for s in table:
        if not s.snomed_code:
            continue
        types.append(
            {
                "CodingSchemeDesignator": SNOMED_SCHEME,
                "CodeValue": s.snomed_code,
                "CodeMeaning": s.snomed_meaning or s.name,
                "SNOMEDCTConceptID": s.snomed_code,
                "3dSlicerLabel": s.name,
                "3dSlicerIntegerLabel": s.label,
                "recommendedDisplayRGBValue": list(s.color),
            }
        )
    return {
        "SegmentationCategoryTypeContextName": context_name,
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
        "SegmentationCodes": {
            "Category": [
                {
                    "CodingSchemeDesignator": SNOMED_SCHEME,
                    "CodeValue": SNOMED_CATEGORY_CODE,
                    "CodeMeaning": SNOMED_CATEGORY_MEANING,
                    "SNOMEDCTConceptID": SNOMED_CATEGORY_CODE,
                    "showAnatomy": False,
                    "Type": types,
                }
            ]
        },
    }


def write_terminology_context(path: str | Path, table: StructureTable | None = None) -> Path:
    """Write the ``.term.json`` for ``table`` (default table) atomically; returns the path."""
    path = Path(path)
    table = StructureTable.from_spec(table)
    text = json.dumps(terminology_context(table), indent=2) + "\n"
    return atomic_write_text(path, text)
