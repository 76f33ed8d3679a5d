"""Run logging on rank 0: JSONL (``log.jsonl``), TensorBoard (``tensorboard/``), the console.

Every record is one JSON object per line (``{"split": "train"|"val"|"info", "step": ..., ...}``),
so a run can be plotted or compared without TensorBoard. Per-structure IoU is logged under the
structure's name (``iou/LV``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra (pip install heartcompletion[train])
                self.info("tensorboard is not installed: logging to log.jsonl only")

    def log(self, split: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(float(v)) if isinstance(v, (int, float)) else v for k, v in values.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    self.writer.add_scalar(f"{split}/{key}", float(value), step)

    def info(self, message: str) -> None:
        """A line on the console (kept clear of the progress bar) and in the JSONL log."""
        if not self.enabled:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except ImportError:
            print(message, file=sys.stderr)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": "info", "time": round(time.time(), 3), "message": message}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
