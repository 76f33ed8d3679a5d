"""Show (and check) an inference checkpoint (:mod:`.checkpoint`) without loading unsafe code::

    python -m HeartCompletionLib.model.checkpoint_cli heart_phase3.safetensors          # one-line summary
    python -m HeartCompletionLib.model.checkpoint_cli heart_phase3.safetensors --load   # also check the weights
    python -m HeartCompletionLib.model.checkpoint_cli heart_phase3.safetensors --json   # all metadata

Exit status (:class:`~HeartCompletionLib.errors.ExitCode`): 0, or 2 for a checkpoint it refuses.
"""

from __future__ import annotations

import argparse
import json

from HeartCompletionLib.errors import ExitCode

from .checkpoint import (
    SUFFIX,
    CheckpointError,
    describe_checkpoint,
    load_inference_checkpoint,
    read_checkpoint_metadata,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m HeartCompletionLib.model.checkpoint_cli",
        description="Show (and check) a HeartCompletion inference checkpoint without loading unsafe code.",
    )
    parser.add_argument("checkpoint", help=f"inference checkpoint ({SUFFIX})")
    parser.add_argument("--load", action="store_true", help="also load the weights into the model (full check)")
    parser.add_argument("--json", action="store_true", help="print the whole metadata as JSON")
    args = parser.parse_args(argv)
    try:
        meta = read_checkpoint_metadata(args.checkpoint)
        if args.load:
            load_inference_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        parser.exit(ExitCode.USAGE, f"error: {exc}\n")
    print(json.dumps(meta, indent=2) if args.json else f"{args.checkpoint}: {describe_checkpoint(meta)}")
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
