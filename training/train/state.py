"""The resumable training state: ONE file ``state_last.pt`` next to the run's logs.

It holds the model and optimizer/scheduler state, the step, the data position (epoch and items
consumed of this rank's plan), the best validation metric, and every RNG state (python, numpy,
torch CPU and CUDA), so ``heart-train --resume`` continues exactly where the run stopped. It is
written to a temporary file in the same folder and moved into place (a kill mid-write leaves
the previous state intact) and read back with ``torch.load(weights_only=True)`` (no pickled code).
The inference checkpoint (``.safetensors``) is a separate file, see
:mod:`HeartCompletionLib.model.checkpoint`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from HeartCompletionLib.atomic_io import atomic_open
from HeartCompletionLib.errors import HeartCompletionError

STATE_NAME = "state_last.pt"
STATE_VERSION = 1
#: keys :meth:`Trainer.resume` reads
STATE_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "consumed", "best", "rng", "world_size")


class TrainStateError(HeartCompletionError, RuntimeError):
    """A training state that cannot be read or written; the message names the file."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[1], tuple(py[0]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict) -> Path:
    """Write ``state`` atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            torch.save({"version": STATE_VERSION, **state}, handle)
    except (OSError, RuntimeError) as exc:  # full disk (torch wraps it in RuntimeError), read-only folder
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise TrainStateError(f"{path}: cannot save the training state ({reason}); the previous state file is "
                              "intact, free space and continue with --resume") from exc
    return path


def load_state(path: Path) -> dict:
    """Read a state file; a clear error naming the file when it is not one of ours."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is "not a usable state file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc):
            reason = "it holds objects other than tensors and plain data, and loading them could execute code"
        raise TrainStateError(f"{path}: cannot read the training state: {reason}. Move it away to start this run "
                              "from step 0, or point --output_dir at another run") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainStateError(f"{path}: not a heart-train state file of version {STATE_VERSION}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise TrainStateError(f"{path}: incomplete training state (missing {missing})")
    return state
