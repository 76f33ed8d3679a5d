"""The Slicer panel's background completion process: its line protocol and the parent side.

The process is ``heart-complete`` itself (:mod:`.complete_cli`) run as ``python -m
HeartCompletionLib.inference.complete_cli --protocol lines --checkpoint CK --input IN.nrrd --output OUT.nrrd
--device auto|cpu|cuda [--table TABLE.json] [--structures LAA PA] [--replace] [--decode fast|exact]``:
the same options, checks and exit codes as for people; :func:`build_command` writes that line.
``CK`` is a checkpoint file or a registered model name (:mod:`HeartCompletionLib.model.registry`; its warning is
printed as a log line). ``--table``, the table the caller wrote the input with, must be the
checkpoint's (refused otherwise, both lists in the message). The result is written atomically in
the input's geometry (never over the input). With ``--protocol lines`` the command prints one
machine-readable line per event on stdout instead of a progress bar:

``HC-PROGRESS <fraction 0..1> <message>``, ``HC-RESULT <json>`` (once per completed case, at its
end: ``output``, ``completed_labels``, ``given_labels``, ``timings``, ``total_seconds``) and
``HC-ERROR <message>`` (one line); any other line is plain log text. Exit status
(:class:`~HeartCompletionLib.errors.ExitCode`): 0 (``OK``) done, also when there is nothing to
complete; 2 (``USAGE`` = ``BAD_INPUT``) refused before any input is read (options, checkpoint,
table, a missing input, an output equal to the input; the message names the file or option);
1 (``FAILED``) the case failed (an unreadable label map, no recognised structure, ...) or any
other failure. Cancel = terminate the process: the output is only ever replaced whole, so a
killed run leaves nothing half-written.

The module polls a :class:`CompletionProcess` from a ``qt.QTimer``; tests poll it in a loop.

>>> parse_line(format_progress(0.25, "decoding")).fraction
0.25
>>> parse_line("HC-RESULT {\\"completed_labels\\": [8]}").payload["completed_labels"]
[8]
>>> parse_line("loading weights").kind
'log'
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PROGRESS_PREFIX = "HC-PROGRESS"
RESULT_PREFIX = "HC-RESULT"
ERROR_PREFIX = "HC-ERROR"
#: the module the child process runs (``python -m CHILD_MODULE``): ``heart-complete``
CHILD_MODULE = "HeartCompletionLib.inference.complete_cli"
#: the (hidden) option of ``heart-complete`` that prints the lines below instead of a progress bar
PROTOCOL_OPTION = ("--protocol", "lines")
#: ``completion.DECODE_MODES`` / ``DEFAULT_DECODE`` (repeated: this module is imported by the panel without numpy work)
DECODE_MODES, DEFAULT_DECODE = ("fast", "exact"), "fast"


@dataclass(frozen=True)
class ProcessEvent:
    """One parsed output line: ``kind`` is ``progress``, ``result``, ``error``, ``log`` or
    ``exit`` (the process ended; ``payload["returncode"]``)."""

    kind: str
    message: str = ""
    fraction: float | None = None
    payload: dict = field(default_factory=dict)


def format_progress(fraction: float, message: str) -> str:
    return f"{PROGRESS_PREFIX} {min(max(float(fraction), 0.0), 1.0):.4f} {message}".rstrip()


def parse_line(line: str) -> ProcessEvent:
    """Parse one stdout line of the process (see the module docstring for the protocol)."""
    line = line.rstrip("\r\n")
    head, _, rest = line.partition(" ")
    if head == PROGRESS_PREFIX:
        value, _, message = rest.partition(" ")
        try:
            return ProcessEvent("progress", message, fraction=float(value))
        except ValueError:
            return ProcessEvent("log", line)
    if head == RESULT_PREFIX:
        try:
            return ProcessEvent("result", "", payload=json.loads(rest))
        except json.JSONDecodeError:
            return ProcessEvent("log", line)
    if head == ERROR_PREFIX:
        return ProcessEvent("error", rest)
    return ProcessEvent("log", line)


def torch_status() -> dict:
    """What the panel shows: whether torch is importable, its version, CUDA availability."""
    try:
        import torch
    except ImportError:
        return {"installed": False, "version": None, "cuda_available": False, "cuda_version": None, "gpu": None}
    cuda = bool(torch.cuda.is_available())
    return {
        "installed": True,
        "version": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


# --- the parent side ---------------------------------------------------------------------------


def build_command(
    checkpoint: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    structures: Sequence[str] | None = None,
    replace: bool = False,
    device: str = "auto",
    python_executable: str | None = None,
    table: str | Path | None = None,
    decode: str | None = None,
    fit_steps: int | None = None,
) -> list[str]:
    """The command line that runs a completion in a fresh Python process: ``heart-complete``'s module
    with ``--protocol lines``.

    ``checkpoint``: a file or a registered model name; ``table``: the structure table JSON the
    input label map was written with (the process refuses a checkpoint trained on another one);
    ``decode``: ``"fast"`` or ``"exact"`` (None: the library default, fast); ``fit_steps``: steps
    of fitting the latents to the given structures (None: the library default).
    """
    command = [python_executable or sys.executable, "-m", CHILD_MODULE, *PROTOCOL_OPTION]
    command += ["--checkpoint", str(checkpoint), "--input", str(input_path), "--output", str(output_path)]
    command += ["--device", device]
    if table is not None:
        command += ["--table", str(table)]
    if structures:
        command += ["--structures", *[str(s) for s in structures]]
    if replace:
        command.append("--replace")
    if decode is not None:
        command += ["--decode", str(decode)]
    if fit_steps is not None:
        command += ["--fit_steps", str(int(fit_steps))]
    return command


class CompletionProcess:
    """A running completion process, read without blocking.

    A reader thread turns stdout lines into :class:`ProcessEvent` s; :meth:`poll` returns those
    that arrived (call it from a timer), the last one being ``exit`` when the process ended.

    Usage::

        process = CompletionProcess(build_command(checkpoint, "in.nrrd", "out.nrrd"))
        events = process.poll()  # from a timer; process.cancel() to stop
    """

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | None = None) -> None:
        environment = dict(os.environ if env is None else env)
        # The child must import this package even when it is not installed (Slicer puts it in
        # a module folder that only the GUI process has on sys.path).
        package_parent = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [environment.get("PYTHONPATH")])])
        environment["PYTHONUNBUFFERED"] = "1"
        self.command = list(command)
        self.returncode: int | None = None
        self._events: queue.Queue[ProcessEvent] = queue.Queue()
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=environment,
            cwd=cwd,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._events.put(parse_line(line))
        self._events.put(ProcessEvent("exit", payload={"returncode": self._process.wait()}))

    def poll(self) -> list[ProcessEvent]:
        """Events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event.kind == "exit":
                self.returncode = int(event.payload["returncode"])
            events.append(event)

    @property
    def running(self) -> bool:
        return self.returncode is None

    def cancel(self, timeout_s: float = 5.0) -> None:
        """Terminate the process (then kill it if it does not stop within ``timeout_s``)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def wait(self, timeout_s: float | None = None) -> list[ProcessEvent]:
        """Block until the process ends (tests and scripts); returns all remaining events."""
        events: list[ProcessEvent] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.running:
            events += self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"completion process did not finish within {timeout_s} s: {self.command}")
            time.sleep(0.05)
        return events + self.poll()
