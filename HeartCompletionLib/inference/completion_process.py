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

**A warm worker** (``--serve``, hidden; :class:`CompletionWorker`): the same module started with
``--protocol lines --serve --checkpoint CK --device D`` loads the model once, prints ``HC-READY``
and then completes one request after another. A request is one line on its stdin: a JSON list of
the per-case options (``["--input", "IN.nrrd", "--output", "OUT.nrrd", "--table", "T.json",
...]``, :func:`build_request`), checked exactly as on the command line. It answers with the
lines above and ends each request with ``HC-DONE <exit status>``. It exits at the end of its stdin
(the parent closed it, or died) or after :data:`WORKER_IDLE_S` seconds without a request. The
panel keeps one for its model and device, so a second completion does not pay for starting Python,
importing torch and loading the model again (about 3 s on a laptop; ``docs/slicer.md``). Cancel
still terminates the process; the next completion starts a new one.

The module polls a :class:`CompletionProcess` or a :class:`WorkerJob` from a ``qt.QTimer``;
tests poll them in a loop.

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
#: a worker (``--serve``): its model is loaded and it reads requests; ``HC-DONE <status>`` ends each
READY_PREFIX = "HC-READY"
DONE_PREFIX = "HC-DONE"
#: the (hidden) option of ``heart-complete`` that makes it a worker reading requests on stdin
SERVE_OPTION = "--serve"
#: seconds a worker waits for its next request before it exits by itself (its memory goes back)
WORKER_IDLE_S = 900.0
#: the module the child process runs (``python -m CHILD_MODULE``): ``heart-complete``
CHILD_MODULE = "HeartCompletionLib.inference.complete_cli"
#: the (hidden) option of ``heart-complete`` that prints the lines below instead of a progress bar
PROTOCOL_OPTION = ("--protocol", "lines")
#: ``completion.DECODE_MODES`` / ``DEFAULT_DECODE`` (repeated: this module is imported by the panel without numpy work)
DECODE_MODES, DEFAULT_DECODE = ("fast", "exact"), "fast"


@dataclass(frozen=True)
class ProcessEvent:
    """One parsed output line: ``kind`` is ``progress``, ``result``, ``error``, ``log`` or
    ``exit`` (the process, or a worker's request, ended; ``payload["returncode"]``); from a worker
    also ``ready`` and ``done`` (``payload["returncode"]``)."""

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
    if head == READY_PREFIX and not rest:
        return ProcessEvent("ready")
    if head == DONE_PREFIX:
        try:
            return ProcessEvent("done", payload={"returncode": int(rest)})
        except ValueError:
            return ProcessEvent("log", line)
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


def build_request(
    input_path: str | Path,
    output_path: str | Path,
    structures: Sequence[str] | None = None,
    replace: bool = False,
    table: str | Path | None = None,
    decode: str | None = None,
    fit_steps: int | None = None,
    crop_output: bool = False,
) -> list[str]:
    """The options of one case, ``heart-complete``'s own: a fresh process takes them after its
    model and device (:func:`build_command`), a worker takes them as one request
    (:meth:`CompletionWorker.submit`).

    ``table``: the structure table JSON the input label map was written with (the process refuses
    a checkpoint trained on another one); ``decode``: ``"fast"`` or ``"exact"`` (None: the library
    default, fast); ``fit_steps``: steps of fitting the latents to the given structures (None: the
    library default); ``crop_output``: write only the box around the result's labelled voxels, on the
    input's lattice (``--crop_output``; the Slicer panel places it by its offset).
    """
    request = ["--input", str(input_path), "--output", str(output_path)]
    if table is not None:
        request += ["--table", str(table)]
    if structures:
        request += ["--structures", *[str(s) for s in structures]]
    if replace:
        request.append("--replace")
    if decode is not None:
        request += ["--decode", str(decode)]
    if fit_steps is not None:
        request += ["--fit_steps", str(int(fit_steps))]
    if crop_output:
        request.append("--crop_output")
    return request


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
    crop_output: bool = False,
) -> list[str]:
    """The command line that runs one completion in a fresh Python process: ``heart-complete``'s
    module with ``--protocol lines``; ``checkpoint``: a file or a registered model name; the case's
    options as in :func:`build_request`.
    """
    command = [python_executable or sys.executable, "-m", CHILD_MODULE, *PROTOCOL_OPTION]
    command += ["--checkpoint", str(checkpoint), "--device", device]
    return command + build_request(input_path, output_path, structures, replace, table, decode, fit_steps, crop_output)


def build_worker_command(
    checkpoint: str | Path, device: str = "auto", python_executable: str | None = None, idle_s: float | None = None
) -> list[str]:
    """The command line of a worker (:class:`CompletionWorker`) serving ``checkpoint`` (a file or a
    registered model name) on ``device``; ``idle_s``: seconds without a request before it exits
    (default :data:`WORKER_IDLE_S`)."""
    command = [python_executable or sys.executable, "-m", CHILD_MODULE, *PROTOCOL_OPTION, SERVE_OPTION]
    command += ["--checkpoint", str(checkpoint), "--device", device]
    if idle_s is not None:
        command += ["--idle_s", f"{float(idle_s):g}"]
    return command


def _child_environment(env: dict | None) -> dict:
    """The child's environment: it must import this package even when it is not installed (Slicer
    puts it in a module folder that only the GUI process has on sys.path), and print unbuffered."""
    environment = dict(os.environ if env is None else env)
    package_parent = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [environment.get("PYTHONPATH")])])
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminate ``process`` (then kill it if it does not stop within ``timeout_s``)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Run:
    """Events of one run, the last being ``exit``: :meth:`poll`, :meth:`wait`, ``returncode``,
    ``running`` (what the panel and the tests use of a run); subclasses define :meth:`cancel`."""

    command: list

    def __init__(self) -> None:
        self.returncode: int | None = None
        self._events: queue.Queue[ProcessEvent] = queue.Queue()

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
        raise NotImplementedError

    def wait(self, timeout_s: float | None = None) -> list[ProcessEvent]:
        """Block until the run ends (tests and scripts); returns all remaining events."""
        events: list[ProcessEvent] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.running:
            events += self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"completion did not finish within {timeout_s} s: {self.command}")
            time.sleep(0.05)
        return events + self.poll()


def _popen(command: list, env: dict | None, cwd: str | None, stdin=None) -> subprocess.Popen:
    return subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", env=_child_environment(env), cwd=cwd)


class CompletionProcess(_Run):
    """A running completion process, read without blocking.

    A reader thread turns stdout lines into :class:`ProcessEvent` s; :meth:`poll` returns those
    that arrived (call it from a timer), the last one being ``exit`` when the process ended.

    Usage::

        process = CompletionProcess(build_command(checkpoint, "in.nrrd", "out.nrrd"))
        events = process.poll()  # from a timer; process.cancel() to stop
    """

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | None = None) -> None:
        super().__init__()
        self.command = list(command)
        self._process = _popen(self.command, env, cwd)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._events.put(parse_line(line))
        self._events.put(ProcessEvent("exit", payload={"returncode": self._process.wait()}))

    def cancel(self, timeout_s: float = 5.0) -> None:
        """Terminate the process (then kill it if it does not stop within ``timeout_s``)."""
        _stop(self._process, timeout_s)


class WorkerJob(_Run):
    """One request of a :class:`CompletionWorker`, polled like a :class:`CompletionProcess`: its
    events end with ``exit``, whose ``returncode`` is the request's exit status (the worker's own
    if it ended before answering; 1 if that was 0). :meth:`cancel` terminates the worker: a
    completion cannot be stopped half-way any other way."""

    def __init__(self, worker: CompletionWorker, request: Sequence[str]) -> None:
        super().__init__()
        self.worker, self.command = worker, [*worker.command, *request]
        self._process = worker._process

    def cancel(self, timeout_s: float = 5.0) -> None:
        self.worker.terminate(timeout_s)


class CompletionWorker:
    """A warm ``heart-complete --serve`` process (:func:`build_worker_command`): the model is loaded
    once, then :meth:`submit` hands it one case after another (one at a time).

    ``key``: what the caller tells workers apart by (the panel: Python, checkpoint file and its
    modification time, device). Lines the worker prints before the first request (loading, a
    registered model's warning, a start-up error) go to that request.

    Usage::

        worker = CompletionWorker(build_worker_command("model.safetensors", "cpu"))
        job = worker.submit(build_request("in.nrrd", "out.nrrd"))
        events = job.wait()        # or job.poll() from a timer
        worker.close()
    """

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | None = None, key=None) -> None:
        self.command, self.key = list(command), key
        self.ready = False  # the model is loaded
        self._lock = threading.Lock()
        self._job: WorkerJob | None = None
        self._backlog: list[ProcessEvent] = []  # lines before the first request
        self._exit: int | None = None
        self._process = _popen(self.command, env, cwd, stdin=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        """The process runs (it may still be loading the model)."""
        return self._exit is None and self._process.poll() is None

    @property
    def busy(self) -> bool:
        """A request is being completed."""
        with self._lock:
            return self._job is not None

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = parse_line(line)
            with self._lock:
                if event.kind == "ready":
                    self.ready = True
                elif self._job is None:
                    self._backlog.append(event)
                elif event.kind == "done":
                    self._job._events.put(ProcessEvent("exit", payload=event.payload))
                    self._job = None
                else:
                    self._job._events.put(event)
        code = self._process.wait()
        with self._lock:
            self._exit = code
            if self._job is not None:  # it ended (or was terminated) while completing a request
                self._job._events.put(ProcessEvent("exit", payload={"returncode": code or 1}))
                self._job = None

    def submit(self, request: Sequence[str]) -> WorkerJob:
        """Send one case (:func:`build_request`'s options); returns its :class:`WorkerJob`. A worker
        that has already ended answers with its exit status."""
        with self._lock:
            if self._job is not None:
                raise RuntimeError("this worker is already completing a request")
            job = WorkerJob(self, request)
            for event in self._backlog:
                job._events.put(event)
            self._backlog = []
            if self._exit is not None:
                job._events.put(ProcessEvent("exit", payload={"returncode": self._exit or 1}))
                return job
            self._job = job
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps([str(a) for a in request]) + "\n")
            self._process.stdin.flush()
        except (OSError, ValueError):
            pass  # the worker has ended: the reader thread gives the job its exit status
        return job

    def terminate(self, timeout_s: float = 5.0) -> None:
        """Stop the worker now (a request it is completing ends with a nonzero status)."""
        _stop(self._process, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """End the worker: close its stdin (it exits once the request it may be completing is
        done), then terminate it if it has not exited within ``timeout_s``; one still loading its
        model is terminated at once (nothing to finish, and nobody should wait for it)."""
        if not self.ready:
            self.terminate(timeout_s)
            return
        try:
            if self._process.stdin is not None:
                self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(self._process, timeout_s)
