"""The child side of the Slicer panel's background completion process (protocol: :mod:`.completion_process`).

Run as ``python -m HeartCompletionLib.completion_process_cli --checkpoint CK --input IN.nrrd
--output OUT.nrrd [--table TABLE.json] [--structures LAA PA] [--replace] [--device auto|cpu|cuda]
[--threads N] [--decode fast|exact]`` (:func:`.completion_process.build_command` writes this line);
it prints ``HC-PROGRESS``/``HC-RESULT``/``HC-ERROR`` lines on stdout and exits with
:class:`~HeartCompletionLib.errors.ExitCode` ``OK`` (0), ``BAD_INPUT`` (2: the message names the
file) or ``FAILED`` (1: any other failure).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

from .completion_process import DECODE_MODES, DEFAULT_DECODE, ERROR_PREFIX, RESULT_PREFIX, format_progress
from .errors import ExitCode


def _emit(line: str) -> None:
    print(line, flush=True)


def _one_line(exc: BaseException) -> str:
    """An error message on one protocol line (multi-line messages, e.g. two structure lists, joined)."""
    return " | ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m HeartCompletionLib.completion_process_cli",
        description=(
            "Complete a partial heart label map in a background process (used by the Slicer module). "
            "Prints HC-PROGRESS / HC-RESULT / HC-ERROR lines on stdout."
        ),
    )
    parser.add_argument("--checkpoint", required=True,
                        help="inference checkpoint (.safetensors) or a registered model name (an existing file wins)")
    parser.add_argument("--input", required=True,
                        help="input label map (.nrrd/.nii/.nii.gz/.seg.nrrd) in the checkpoint table's values")
    parser.add_argument("--output", required=True,
                        help="output label map; written atomically in the input's geometry; never the input itself")
    parser.add_argument("--table", default=None,
                        help="structure table JSON the input was written with; the checkpoint must have the same "
                        "structures (refused otherwise)")
    parser.add_argument("--structures", nargs="*", default=None, help="structures to produce (default: the missing ones)")
    parser.add_argument("--replace", action="store_true", help="also replace structures present in the input")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--decode", default=DEFAULT_DECODE, choices=DECODE_MODES,
                        help="fine-level decoding: fast (interpolate inside fine cells, decode exactly where a label "
                        f"could change) or exact (every voxel near a surface; the reference); default {DEFAULT_DECODE}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    try:
        from .checkpoint import CheckpointError
        from .labelmap_io import LabelMapError, read_label_map, write_label_map
    except ImportError as exc:  # torch or a reader is missing in this Python
        _emit(f"{ERROR_PREFIX} cannot import the completion code: {exc}")
        return ExitCode.FAILED
    try:
        _check_output(Path(args.input), Path(args.output))
        checkpoint = _load_checkpoint(args)
        _emit(format_progress(0.04, f"reading {args.input}"))
        label_map = read_label_map(args.input, table=checkpoint.table)
        result = run(label_map, args, checkpoint)
        write_label_map(result.label_map, args.output, table=checkpoint.table)
        for message in result.messages:  # "nothing to complete", removed islands, ...
            _emit(message)
    except (LabelMapError, CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:  # input or arguments
        _emit(f"{ERROR_PREFIX} {_one_line(exc)}")
        return ExitCode.BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - every failure must reach the panel as one line
        _emit(f"{ERROR_PREFIX} {type(exc).__name__}: {_one_line(exc)}")
        return ExitCode.FAILED
    payload = {
        "output": str(Path(args.output).resolve()),
        "completed_labels": [int(v) for v in result.completed_labels],
        "given_labels": [int(v) for v in result.given_labels],
        "timings": {k: float(v) for k, v in dict(result.timings).items()},
        "total_seconds": time.perf_counter() - started,
    }
    _emit(format_progress(1.0, "done"))
    _emit(f"{RESULT_PREFIX} {json.dumps(payload)}")
    return ExitCode.OK


def _check_output(input_path: Path, output_path: Path) -> None:
    """Refuse an output that is the input (the input is never modified)."""
    same = output_path.resolve() == input_path.resolve()
    if not same and output_path.exists() and input_path.exists():
        same = os.path.samefile(output_path, input_path)  # hard links
    if same:
        raise ValueError(f"{output_path}: the output would overwrite the input {input_path}; choose another output")


def _load_checkpoint(args: argparse.Namespace):
    """The checkpoint of ``--checkpoint`` (file or registered name), checked against ``--table``."""
    from .completion import check_device, resolve_structures
    from .model_registry import load_model
    from .structures import StructureTable

    check_device(args.device)  # an unavailable CUDA is refused before anything is read
    _emit(format_progress(0.01, f"loading {Path(str(args.checkpoint)).name}"))
    expected = StructureTable.from_spec(args.table) if args.table else None
    checkpoint, entry = load_model(args.checkpoint, expected_table=expected, device="cpu")
    if entry is not None:  # a plain log line: the panel shows it in its log
        _emit(f"warning: model {entry.name!r} ({entry.path}): {entry.warning}")
    if args.structures:  # an unknown name is refused before the input is read
        try:
            resolve_structures(checkpoint.table, args.structures)
        except KeyError as exc:
            raise ValueError(f"--structures: {exc.args[0]}") from None
    return checkpoint


def run(label_map, args: argparse.Namespace, checkpoint=None):
    """Complete ``label_map`` with progress lines on stdout (loads ``args.checkpoint`` if not given)."""
    from .completion import complete_label_map

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if checkpoint is None:
        checkpoint = _load_checkpoint(args)
    structures = args.structures or None
    return complete_label_map(
        label_map,
        checkpoint,
        structures=structures,
        replace=args.replace,
        device=args.device,
        decode=getattr(args, "decode", DEFAULT_DECODE),
        progress=lambda fraction, message: _emit(format_progress(0.05 + 0.9 * fraction, message)),
    )


if __name__ == "__main__":
    raise SystemExit(main())
