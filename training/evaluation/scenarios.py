"""Named evaluation scenarios: which structures the model gets, which ones are scored.

A scenario turns the structures a case holds (its labels present in the label map) into

- ``input_labels``: the structures given to the completion (the rest of the case is hidden),
- ``scored_labels``: the structures compared against the case's own label map,
- ``replace``: whether the given structures are re-predicted too (only ``full`` and
  ``annotated``, which score the model's *reconstruction* of what it was given).

Scenarios (all selectable with ``--scenarios``; ``all`` = every one, ``default`` = :data:`DEFAULT_SCENARIOS`):

``full``
    every present structure given and scored, ``replace=True`` (reconstruction, phase 1).
``missing_<Structure>``
    that one structure hidden and scored (e.g. ``missing_LAA``); ``missing_*`` selects all K.
``drop_k``
    2-5 random present structures hidden and scored (phase 2); the draw depends only on
    ``(seed, case id)``, so every run, method and machine sees the same inputs.
``subset_A`` / ``subset_B``
    the named input subsets of phase 3 (A = Myocardium, LA, LV, RA, RV; B = Aorta, PA, LAA,
    Coronary, PV); everything else is scored.
``annotated``
    the case's own annotated set (phase 4: a real partially labelled dataset): every structure
    the case holds is given and reconstructed with ``replace=True``. Only annotated structures
    have a reference, so they are the only ones that can be scored; the completions of the
    others are produced but have nothing to be compared with. On a fully labelled case this
    equals ``full``.

Only structures present in a case are ever hidden or scored (a partially labelled case has no
reference for the others). A scenario with no input or nothing to score on a case is skipped
(:func:`case_scenario` returns ``None``), and ``heart-eval`` reports how many were skipped.

>>> from HeartCompletionLib.structures.table import StructureTable
>>> table = StructureTable.default()
>>> s = case_scenario("subset_A", table, present_labels=range(1, 11), case_id="case_000")
>>> s.input_labels, s.scored_labels, s.replace
([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], False)
>>> case_scenario("missing_LAA", table, [1, 2, 3, 8], "c").scored_labels
[8]
>>> case_scenario("missing_LAA", table, [1, 2, 3], "c") is None   # nothing to score
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from HeartCompletionLib.structures.table import StructureTable

#: phase-3 input subsets (DESIGN.md); names resolve through the table (synonyms allowed).
SUBSETS = {
    "subset_A": ("Myocardium", "LA", "LV", "RA", "RV"),
    "subset_B": ("Aorta", "PA", "LAA", "Coronary", "PV"),
}
DROP_K_RANGE = (2, 5)
#: what ``--scenarios default`` runs: one of each kind, every single-missing structure included.
DEFAULT_SCENARIOS = ("full", "drop_k", "subset_A", "subset_B", "missing_*")


@dataclass(frozen=True)
class CaseScenario:
    """One scenario applied to one case (labels are table label values, sorted)."""

    name: str
    input_labels: list = field(default_factory=list)
    scored_labels: list = field(default_factory=list)
    replace: bool = False


def scenario_names(table: StructureTable) -> list[str]:
    """Every scenario name available for a structure table, in report order."""
    names = ["full", "annotated", "drop_k", *SUBSETS]
    names += [f"missing_{s.name}" for s in table]
    return names


def resolve_scenarios(specs: Iterable[str] | None, table: StructureTable) -> list[str]:
    """Expand ``--scenarios`` arguments into scenario names (order kept, duplicates removed).

    Accepts names, ``all``, ``default``, ``missing_*`` and ``missing_<synonym>`` (mapped to the
    table's name). Unknown names raise ``ValueError`` listing the known ones.
    """
    specs = list(specs) if specs else ["default"]
    known = scenario_names(table)
    out: list[str] = []
    for spec in specs:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                out += known
            elif part == "default":
                out += resolve_scenarios(DEFAULT_SCENARIOS, table)
            elif part == "missing_*":
                out += [f"missing_{s.name}" for s in table]
            elif part.startswith("missing_") and part not in known:
                structure = table.match_name(part[len("missing_"):])
                if structure is None:
                    raise ValueError(f"unknown structure in scenario {part!r}; known structures: {table.names}")
                out.append(f"missing_{structure.name}")
            elif part in known:
                out.append(part)
            else:
                raise ValueError(f"unknown scenario {part!r}; known: all, default, missing_*, {', '.join(known)}")
    return list(dict.fromkeys(out))


def case_rng(seed: int, case_id: str, purpose: str = "drop_k") -> np.random.Generator:
    """A generator that depends only on ``(seed, case id, purpose)``, stable across processes
    (Python's ``hash`` is salted per process, so a digest is used instead)."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}:{case_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _labels_of(table: StructureTable, names: Sequence[str]) -> list[int]:
    return sorted(s.label for s in table.subset(names))


def case_scenario(
    name: str,
    table: StructureTable,
    present_labels: Iterable[int],
    case_id: str,
    seed: int = 0,
) -> CaseScenario | None:
    """Apply scenario ``name`` to a case holding ``present_labels``; ``None`` when it does not
    apply (no input structure left, or nothing to score)."""
    present = sorted({int(v) for v in present_labels if 1 <= int(v) <= len(table)})
    if name in ("full", "annotated"):
        return CaseScenario(name, present, present, replace=True) if present else None
    if name == "drop_k":
        rng = case_rng(seed, case_id)
        lo, hi = DROP_K_RANGE
        # keep at least one input structure; a case with fewer than 3 structures drops fewer
        k = int(rng.integers(lo, hi + 1))
        k = min(k, len(present) - 1)
        if k < 1:
            return None
        hidden = sorted(int(v) for v in rng.choice(present, size=k, replace=False))
    elif name in SUBSETS:
        given = set(_labels_of(table, SUBSETS[name]))
        hidden = [v for v in present if v not in given]
    elif name.startswith("missing_"):
        hidden = [v for v in _labels_of(table, [name[len("missing_"):]]) if v in present]
    else:
        raise ValueError(f"unknown scenario {name!r}; known: {scenario_names(table)}")
    inputs = [v for v in present if v not in hidden]
    if not inputs or not hidden:
        return None
    return CaseScenario(name, inputs, hidden, replace=False)
