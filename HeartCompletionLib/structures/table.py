"""The structure table: the one place that says which cardiac structures exist.

The table is data (``structures_default.json`` next to this file), not code. A configuration may extend it
(``"extends": "default"`` plus extra structures, e.g. SVC, IVC, coronary sinus); a checkpoint
carries the table it was trained with (:meth:`StructureTable.to_dict`).

Label value on disk = class index + 1; 0 is background. ``K = len(table)``.

>>> table = StructureTable.default()
>>> len(table), table[0].name, table.by_name("LV").label
(10, 'Myocardium', 3)
>>> table.match_name("heart_ventricle_left").name
'LV'
>>> table.match_terminology("68786006", modifier_code="7771000").name
'LAA'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_TABLE_PATH = Path(__file__).with_name("structures_default.json")

#: SNOMED CT category of every structure in the table ("Anatomical Structure").
SNOMED_CATEGORY_CODE = "123037004"
SNOMED_CATEGORY_MEANING = "Anatomical Structure"
SNOMED_SCHEME = "SCT"


def normalize_name(name: str) -> str:
    """Canonical form used to compare segment names and synonyms.

    Lower case, underscores/dashes/dots/parentheses as spaces, collapsed whitespace.
    ``"Heart_Ventricle-Left "`` -> ``"heart ventricle left"``.
    """
    text = re.sub(r"[_\-\.\(\)/,]+", " ", name.strip().lower())
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Structure:
    """One cardiac structure.

    ``label`` is its value in label maps (1..K); ``index`` (= label - 1) its class index in the
    network's outputs and one-hot inputs. ``color`` is RGB 0..255.
    """

    label: int
    name: str
    description: str = ""
    color: tuple[int, int, int] = (128, 128, 128)
    snomed_code: str | None = None
    snomed_meaning: str = ""
    synonyms: tuple[str, ...] = ()
    #: other (code, modifier) pairs accepted when reading terminology, e.g. TotalSegmentator's LAA.
    snomed_alternatives: tuple[tuple[str, str | None], ...] = ()

    @property
    def index(self) -> int:
        return self.label - 1

    @property
    def color_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "name": self.name,
            "description": self.description,
            "color": list(self.color),
            "snomed_code": self.snomed_code,
            "snomed_meaning": self.snomed_meaning,
            "synonyms": list(self.synonyms),
            "snomed_alternatives": [
                {"code": code, "modifier": modifier} for code, modifier in self.snomed_alternatives
            ],
        }

    @classmethod
    def from_dict(cls, entry: dict) -> Structure:
        try:
            label = int(entry["label"])
            name = str(entry["name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"structure entry needs an integer 'label' and a 'name': {entry!r}") from exc
        check_name(name, "structure name")
        for synonym in entry.get("synonyms", ()):
            check_name(str(synonym), f"synonym of {name!r}")
        color = tuple(int(c) for c in entry.get("color", (128, 128, 128)))
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise ValueError(f"structure {name!r}: color must be three integers 0..255, got {color}")
        alternatives = tuple(
            (str(alt["code"]), None if alt.get("modifier") is None else str(alt["modifier"]))
            for alt in entry.get("snomed_alternatives", ())
        )
        return cls(
            label=label,
            name=name,
            description=str(entry.get("description", "")),
            color=color,  # type: ignore[arg-type]
            snomed_code=None if entry.get("snomed_code") is None else str(entry["snomed_code"]),
            snomed_meaning=str(entry.get("snomed_meaning", "")),
            synonyms=tuple(str(s) for s in entry.get("synonyms", ())),
            snomed_alternatives=alternatives,
        )


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is usable as a segment name in every output (one line of a ``.seg.nrrd``
    header, a CSV cell, a file name part); else ``ValueError`` saying why."""
    import unicodedata

    if not name.strip():
        raise ValueError(f"{what} {name!r} is empty")
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        raise ValueError(f"{what} {name!r} contains control character(s) {bad}")
    if len(name) > 200:
        raise ValueError(f"{what} {name[:40]!r}... is {len(name)} characters long (at most 200)")
    return name


@dataclass(frozen=True)
class StructureTable:
    """An ordered table of structures with labels 1..K (contiguous, so label = index + 1)."""

    structures: tuple[Structure, ...]
    name: str = "custom"
    _by_key: dict = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        labels = [s.label for s in self.structures]
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(
                f"structure table {self.name!r}: labels must be 1..K in order (label = class index + 1), got {labels}"
            )
        names = [s.name for s in self.structures]
        if len(set(names)) != len(names):
            raise ValueError(f"structure table {self.name!r}: duplicate structure names in {names}")
        lookup: dict[str, Structure] = {}
        for s in self.structures:
            for key in (s.name, *s.synonyms):
                norm = normalize_name(key)
                if norm in lookup and lookup[norm] is not s:
                    raise ValueError(
                        f"structure table {self.name!r}: name/synonym {key!r} is used by both "
                        f"{lookup[norm].name!r} and {s.name!r}"
                    )
                lookup[norm] = s
        object.__setattr__(self, "_by_key", lookup)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def default(cls) -> StructureTable:
        """The ten structures of DESIGN.md."""
        return cls.from_json(DEFAULT_TABLE_PATH)

    @classmethod
    def from_json(cls, path: str | Path) -> StructureTable:
        """Read a table file. ``"extends": "default"`` (or a path) appends to another table."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read structure table: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a structure table must be a JSON object {{\"structures\": [...]}}, "
                             f"got a {type(data).__name__}")
        base: list[Structure] = []
        extends = data.get("extends")
        if extends:
            base_path = DEFAULT_TABLE_PATH if extends == "default" else (path.parent / extends)
            base = list(cls.from_json(base_path).structures)
        try:
            extra = [Structure.from_dict(e) for e in data.get("structures", [])]
            return cls(tuple(base + extra), name=str(data.get("name", path.stem)))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def from_spec(cls, spec: str | Path | StructureTable | None) -> StructureTable:
        """``None``/"default" -> default table; a path -> :meth:`from_json`; a table -> itself."""
        if spec is None or spec == "default":
            return cls.default()
        if isinstance(spec, StructureTable):
            return spec
        return cls.from_json(spec)

    def to_dict(self) -> dict:
        return {"name": self.name, "structures": [s.to_dict() for s in self.structures]}

    @classmethod
    def from_dict(cls, data: dict) -> StructureTable:
        return cls(tuple(Structure.from_dict(e) for e in data["structures"]), name=str(data.get("name", "custom")))

    def subset(self, names: Iterable[str]) -> list[Structure]:
        """Structures for a list of names or synonyms; raises ``KeyError`` naming unknown ones."""
        out = []
        unknown = []
        for n in names:
            s = self.match_name(n)
            if s is None:
                unknown.append(n)
            else:
                out.append(s)
        if unknown:
            raise KeyError(f"unknown structure name(s) {unknown}; known: {self.names}")
        return out

    # --- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.structures)

    def __iter__(self):
        return iter(self.structures)

    def __getitem__(self, index: int) -> Structure:
        return self.structures[index]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.structures]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.structures]

    def by_name(self, name: str) -> Structure:
        """Exact name (case-insensitive) or synonym; ``KeyError`` when unknown."""
        s = self.match_name(name)
        if s is None:
            raise KeyError(f"unknown structure {name!r}; known: {self.names}")
        return s

    def by_label(self, label: int) -> Structure:
        if not 1 <= int(label) <= len(self):
            raise KeyError(f"label {label} is not in the structure table (1..{len(self)})")
        return self.structures[int(label) - 1]

    def match_name(self, name: str) -> Structure | None:
        """Map a segment name / synonym (any case, ``_``/``-`` as spaces) to a structure."""
        return self._by_key.get(normalize_name(name))

    def match_terminology(self, type_code: str | None, modifier_code: str | None = None) -> Structure | None:
        """Map a SNOMED CT type code (and optional modifier) to a structure, or ``None``."""
        if not type_code:
            return None
        for s in self.structures:
            if s.snomed_code == type_code:
                return s
        for s in self.structures:
            for code, modifier in s.snomed_alternatives:
                if code == type_code and (modifier is None or modifier == modifier_code):
                    return s
        return None

    def is_compatible(self, other: StructureTable) -> bool:
        """Same structures in the same order (what a checkpoint's outputs depend on)."""
        return self.names == other.names

    def describe_difference(self, other: StructureTable) -> str:
        return f"{self.names} vs {other.names}"


def indices_of(table: StructureTable, names: Sequence[str]) -> list[int]:
    """Class indices (0..K-1) for structure names or synonyms."""
    return [s.index for s in table.subset(names)]
