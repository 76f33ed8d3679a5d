"""Regenerate the module's ``.term.json`` from a structure table (:mod:`.segment_mapping`)::

    python -m HeartCompletionLib.structures.segment_mapping_cli --output HeartCompletion/Resources/HeartCompletion.term.json
"""

from __future__ import annotations

import argparse
from typing import Sequence

from HeartCompletionLib.errors import ExitCode

from .segment_mapping import write_terminology_context
from .table import StructureTable


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the module's ``.term.json`` from a structure table."""
    parser = argparse.ArgumentParser(
        prog="python -m HeartCompletionLib.structures.segment_mapping_cli",
        description="Write the Slicer terminology context (.term.json) generated from the structure table.",
    )
    parser.add_argument("--output", required=True, help="path of the .term.json to write")
    parser.add_argument("--table", default=None, help="structure table JSON (default: the ten structures)")
    args = parser.parse_args(argv)
    path = write_terminology_context(args.output, StructureTable.from_spec(args.table))
    print(f"wrote {path}")
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
