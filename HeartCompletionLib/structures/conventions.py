"""Other datasets' label numbering, mapped onto the structure table in one place.

A *convention* maps a source label value to a structure name (or synonym) of the table. Names go
through :meth:`StructureTable.match_name`, so TotalSegmentator names ("heart_ventricle_left") and
plain synonyms ("left ventricle") resolve without extra tables.

>>> from HeartCompletionLib.structures.table import StructureTable
>>> table = StructureTable.default()
>>> lut = label_lookup(table, "mmwhs")
>>> int(lut[500]), int(lut[205]), int(lut[1])
(3, 1, 0)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .table import StructureTable

#: MM-WHS (Multi-Modality Whole Heart Segmentation challenge) label values.
MMWHS = {
    205: "Myocardium",
    420: "LA",
    500: "LV",
    550: "RA",
    600: "RV",
    820: "Aorta",
    850: "PA",
}

#: TotalSegmentator ``heartchambers_highres`` numbering (its names resolve through synonyms).
TOTALSEGMENTATOR_HEARTCHAMBERS = {
    1: "heart_myocardium",
    2: "heart_atrium_left",
    3: "heart_ventricle_left",
    4: "heart_atrium_right",
    5: "heart_ventricle_right",
    6: "aorta",
    7: "pulmonary_artery",
}

BUILTIN_CONVENTIONS = {
    "mmwhs": MMWHS,
    "totalsegmentator": TOTALSEGMENTATOR_HEARTCHAMBERS,
}


def load_convention(spec: str | Path | dict | None, table: StructureTable) -> dict[int, int] | None:
    """Resolve a convention to ``{source value: table label}``.

    ``spec`` is ``None`` (the table's own values), a built-in name (``"mmwhs"``,
    ``"totalsegmentator"``), a dict, or a JSON file ``{"205": "Myocardium", ...}`` (values may
    also be integers = table labels). Unknown structure names raise ``ValueError`` naming them.
    """
    if spec is None or spec == "" or spec == "default":
        return None
    source = str(spec)
    if isinstance(spec, dict):
        raw = spec
    elif str(spec).lower() in BUILTIN_CONVENTIONS:
        raw = BUILTIN_CONVENTIONS[str(spec).lower()]
    else:
        path = Path(spec)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read label convention: {exc}") from exc
        if isinstance(raw, dict) and "labels" in raw and isinstance(raw["labels"], dict):
            raw = raw["labels"]
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a label convention must be a JSON object {{value: structure name}}, "
                         f"got a {type(raw).__name__}")
    mapping: dict[int, int] = {}
    unknown = []
    for key, value in raw.items():
        try:
            src = int(key)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: label value {key!r} is not an integer") from exc
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            label = int(value)
            if label != 0 and not 1 <= label <= len(table):
                unknown.append(value)
                continue
            mapping[src] = label
            continue
        structure = table.match_name(str(value))
        if structure is None:
            unknown.append(value)
            continue
        mapping[src] = structure.label
    if unknown:
        raise ValueError(f"{source}: names/labels not in the structure table: {unknown}; known: {table.names}")
    return mapping


def convention_structures(spec: str | Path | dict | None, table: StructureTable) -> list[str] | None:
    """Names of the table's structures a convention names (table order), ``None`` without a convention.

    This is what a dataset *can* annotate (DESIGN.md, phase 4): a structure its convention does not
    name is not annotated (unknown), not "absent". ``heart-prepare`` and ``heart-eval`` use it as the
    default annotated set of every case of a convention (a sidecar or ``--annotated`` still wins).

    >>> from HeartCompletionLib.structures.table import StructureTable
    >>> convention_structures({"1": "RV", "2": "Myocardium", "3": "LV"}, StructureTable.default())
    ['Myocardium', 'LV', 'RV']
    >>> convention_structures(None, StructureTable.default()) is None
    True
    """
    mapping = load_convention(spec, table)
    if mapping is None:
        return None
    labels = {label for label in mapping.values() if label > 0}
    return [s.name for s in table if s.label in labels]


def default_annotated(table: StructureTable, convention=None, annotated=None, sidecar=None) -> list[str]:
    """The structures a case annotates, by the one rule of ``heart-prepare`` and ``heart-eval``:
    a sidecar's list wins, then ``annotated`` (``--annotated``), then the structures the convention
    names, else every structure of the table. Names come back as the table's, in table order."""
    for names in (sidecar, annotated):
        if names is not None:
            wanted = {s.name for s in table.subset(names)}
            return [n for n in table.names if n in wanted]
    named = convention_structures(convention, table)
    return list(table.names) if named is None else named


def label_lookup(table: StructureTable, spec: str | Path | dict | None, max_value: int = 1024) -> np.ndarray:
    """A lookup array ``lut[source value] -> table label`` (0 for values the convention lacks)."""
    mapping = load_convention(spec, table)
    size = max(max_value, max(mapping, default=0) + 1) if mapping else max(max_value, len(table) + 1)
    lut = np.zeros(size, dtype=np.int16)
    if mapping is None:
        lut[1 : len(table) + 1] = np.arange(1, len(table) + 1)
    else:
        for src, label in mapping.items():
            if src >= 0:
                lut[src] = label
    return lut


def apply_convention(
    labels: np.ndarray, table: StructureTable, spec: str | Path | dict | None, source: str = "label map"
) -> np.ndarray:
    """Map a source label array onto the table's values (int16), warning about unknown values.

    Values not in the convention (or above K with no convention) become background, with one
    ``UserWarning`` naming ``source`` and the values.
    """
    values = np.unique(labels)
    if values.size and values.min() < 0:
        raise ValueError(f"{source}: negative label values {values[values < 0].tolist()} are not a label map")
    lut = label_lookup(table, spec, max_value=int(values.max()) + 1 if values.size else 1)
    known = set(np.nonzero(lut)[0].tolist()) | {0}
    ignored = [int(v) for v in values if int(v) not in known]
    if ignored:
        warnings.warn(
            f"{source}: label values {ignored} are not in the structure table/convention and are ignored",
            UserWarning,
            stacklevel=2,
        )
    return lut[labels.astype(np.int64, copy=False)]
