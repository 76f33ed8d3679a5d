"""The warm completion worker (``heart-complete --protocol lines --serve``) and its parent side.

The Slicer panel keeps one worker per model and device, so only its first completion pays for
starting Python, importing torch and loading the model. These tests check that a worker's answers
are those of a fresh process (same voxels, same lines), that a bad request is refused the way the
command line refuses it and does not end the worker, and that a worker ends when it should: at
the end of its stdin, when cancelled, after its idle time, or at once when it cannot start.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.errors import ExitCode
from HeartCompletionLib.inference import completion_process
from HeartCompletionLib.inference.complete_cli import main
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.structures.table import StructureTable

MODEL = "synthetic-demo"  # the bundled model: a real, trained field, fast at 3 mm
TABLE = StructureTable.default()


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> Path:
    """A synthetic heart at 3 mm without Aorta, PA and LAA, as NRRD (what the panel writes)."""
    heart = synthetic_label_map(seed=2, spacing_mm=3.0)
    dropped = [TABLE.by_name(n).label for n in ("Aorta", "PA", "LAA")]
    labels = np.where(np.isin(heart.labels, dropped), 0, heart.labels)
    return write_label_map(LabelMap(labels, heart.ijk_to_ras), tmp_path_factory.mktemp("worker") / "input.nrrd")


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_worker_answers_like_fresh_processes(partial, tmp_path):
    """Two requests to one process: the same voxels and the same kinds of lines as two fresh
    ``heart-complete`` processes, and the process is still there for a third."""
    requests = [completion_process.build_request(partial, tmp_path / "all.nrrd"),
                completion_process.build_request(partial, tmp_path / "laa.nrrd", ["LAA"], decode="exact", fit_steps=5)]
    worker = completion_process.CompletionWorker(completion_process.build_worker_command(MODEL, "cpu"))
    try:
        pid = worker._process.pid
        for index, request in enumerate(requests):
            job = worker.submit(request)
            with pytest.raises(RuntimeError, match="already completing"):
                worker.submit(request)
            events = job.wait(timeout_s=300)
            assert job.returncode == 0, [e.message for e in events]
            assert not worker.busy and worker.alive and worker._process.pid == pid
            fractions = [e.fraction for e in events if e.kind == "progress"]
            assert fractions == sorted(fractions) and fractions[-1] == 1.0
            (result,) = [e.payload for e in events if e.kind == "result"]
            assert Path(result["output"]) == Path(request[3]).resolve()
            assert any("synthetic hearts only" in e.message for e in events), "the model's warning, every request"
            assert events[-1].kind == "exit" and [e.kind for e in events].count("exit") == 1
            loading = [e for e in events if e.kind == "progress" and e.message == f"loading {MODEL}"]
            assert worker.ready and len(loading) == (1 if index == 0 else 0)  # the model is loaded once
        for request in requests:  # the same cases in fresh processes
            fresh = tmp_path / ("fresh_" + Path(request[3]).name)
            command = completion_process.build_command(MODEL, partial, fresh, device="cpu")
            command = command[: command.index("--input")] + [*request[:3], str(fresh), *request[4:]]
            process = completion_process.CompletionProcess(command)
            assert process.wait(timeout_s=300) and process.returncode == 0
            np.testing.assert_array_equal(read_label_map(fresh).labels, read_label_map(request[3]).labels)
        assert set(np.unique(read_label_map(tmp_path / "laa.nrrd").labels)) >= {TABLE.by_name("LAA").label}
    finally:
        worker.close()
    assert not worker.alive and worker._process.returncode == 0  # end of stdin: a clean exit


def test_serve_refuses_bad_requests_and_keeps_serving(partial, tmp_path, monkeypatch, capsys):
    """The protocol itself, in this process: each request ends with ``HC-DONE <status>``; a bad
    one is refused as the command line refuses it (status 2, the file or option named), and the
    next request is still completed."""
    nine = tmp_path / "nine.json"
    nine.write_text(json.dumps(StructureTable(TABLE.structures[:9], name="nine").to_dict()))
    good = tmp_path / "good.nrrd"
    requests = [
        "this is not JSON",
        json.dumps({"--input": str(partial)}),
        json.dumps(["--input", str(tmp_path / "missing.nrrd"), "--output", str(tmp_path / "o.nrrd")]),
        json.dumps(["--input", str(partial), "--output", str(tmp_path / "o.nrrd"), "--device", "cuda"]),
        json.dumps(["--input", str(partial), "--output", str(tmp_path / "o.nrrd"), "--table", str(nine)]),
        json.dumps(["--input", str(partial), "--output", str(partial)]),
        json.dumps(["--input", str(partial), "--output", str(tmp_path / "o.nrrd"), "--structures", "Spleen"]),
        json.dumps(["--output", str(tmp_path / "o.nrrd")]),
        "",
        json.dumps(completion_process.build_request(partial, good, fit_steps=3)),
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(requests) + "\n"))
    code = main(["--protocol", "lines", "--serve", "--checkpoint", MODEL, "--device", "cpu", "--threads", "1"])
    assert code == ExitCode.OK  # the end of stdin
    events = [completion_process.parse_line(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0].kind == "progress" and events[1].kind == "ready"
    done = [e.payload["returncode"] for e in events if e.kind == "done"]
    assert done == [ExitCode.USAGE] * 8 + [ExitCode.OK]  # the empty line is no request
    errors = [e.message for e in events if e.kind == "error"]
    assert len(errors) == 8
    assert "JSON list" in errors[0] and "JSON list" in errors[1]
    assert "missing.nrrd" in errors[2] and "not found" in errors[2]
    assert "--device" in errors[3] and "one model on one device" in errors[3]
    assert "trained on other structures" in errors[4] and "PV" in errors[4]
    assert "would overwrite the input" in errors[5]
    assert "Spleen" in errors[6]
    assert "--input" in errors[7] and "required" in errors[7]
    assert not (tmp_path / "o.nrrd").exists()
    assert good.is_file() and [e for e in events if e.kind == "result"][0].payload["output"] == str(good.resolve())


def test_a_worker_that_cannot_start_answers_its_first_request(tmp_path):
    worker = completion_process.CompletionWorker(completion_process.build_worker_command(MODEL, "no-such-device"))
    job = worker.submit(completion_process.build_request(tmp_path / "in.nrrd", tmp_path / "out.nrrd"))
    events = job.wait(timeout_s=120)
    assert job.returncode == ExitCode.USAGE
    assert any(e.kind == "error" and "no-such-device" in e.message for e in events)
    assert wait_until(lambda: not worker.alive, 30)
    again = worker.submit(completion_process.build_request(tmp_path / "in.nrrd", tmp_path / "out.nrrd"))
    assert again.wait(timeout_s=5)[-1].kind == "exit" and again.returncode == ExitCode.USAGE


def test_an_idle_worker_exits_and_a_cancelled_one_is_gone(partial, tmp_path):
    idle = completion_process.CompletionWorker(completion_process.build_worker_command(MODEL, "cpu", idle_s=0.5))
    cancelled = completion_process.CompletionWorker(completion_process.build_worker_command(MODEL, "cpu"))
    try:
        assert wait_until(lambda: not idle.alive, 120), "the idle worker did not exit"
        assert idle._process.returncode == 0
        job = idle.submit(completion_process.build_request(partial, tmp_path / "late.nrrd"))
        events = job.wait(timeout_s=5)
        assert job.returncode == ExitCode.FAILED  # nothing answered it
        assert any("no request for 0.5 s" in e.message for e in events)
        assert not (tmp_path / "late.nrrd").exists()

        job = cancelled.submit(completion_process.build_request(partial, tmp_path / "cancelled.nrrd"))
        job.cancel()
        events = job.wait(timeout_s=30)
        assert job.returncode not in (None, 0) and events[-1].kind == "exit"
        assert not cancelled.alive and not (tmp_path / "cancelled.nrrd").exists()
    finally:
        idle.close()
        cancelled.close()
    loading = completion_process.CompletionWorker(completion_process.build_worker_command(MODEL, "cpu"))
    started = time.monotonic()
    loading.close()  # still loading: terminated at once, nobody waits for the model to load
    assert not loading.alive and not loading.ready and time.monotonic() - started < 5


def test_parse_worker_lines():
    assert completion_process.parse_line("HC-READY").kind == "ready"
    done = completion_process.parse_line("HC-DONE 2\n")
    assert done.kind == "done" and done.payload == {"returncode": 2}
    assert completion_process.parse_line("HC-DONE soon").kind == "log"
    assert completion_process.parse_line("HC-READY now").kind == "log"


def test_build_worker_command_and_request_are_heart_completes_options():
    from HeartCompletionLib.inference.complete_cli import _parser

    command = completion_process.build_worker_command("ck", "cpu", "py", idle_s=30)
    assert command[:6] == ["py", "-m", completion_process.CHILD_MODULE, "--protocol", "lines", "--serve"]
    args = _parser(serve=True).parse_args(command[3:])
    assert (args.serve, args.checkpoint, args.device, args.idle_s, args.input) == (True, "ck", "cpu", 30.0, None)
    request = completion_process.build_request("in.nrrd", "out.nrrd", ["LAA", "PA"], True, "t.json", "exact", 7)
    args = _parser().parse_args(["--checkpoint", "ck", *request])
    assert (args.input, args.output, args.structures, args.replace, args.table, args.decode, args.fit_steps) == (
        "in.nrrd", "out.nrrd", ["LAA", "PA"], True, "t.json", "exact", 7)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--checkpoint", "ck"])  # people must name the input and the output


def test_a_worker_warms_up_only_while_no_request_waits(monkeypatch, capsys):
    """Started ahead (nothing on stdin yet), a worker runs one small completion so that its first
    request is as fast as the later ones; a failure there is only logged. With a request already
    waiting (started by Apply) it goes straight to the request."""
    import os

    from HeartCompletionLib.inference import complete_cli, completion

    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "r") as reader, os.fdopen(write_end, "w") as writer:
        assert complete_cli._request_waiting(reader) is False
        writer.write("[]\n")
        writer.flush()
        assert complete_cli._request_waiting(reader) is True
    assert complete_cli._request_waiting(io.StringIO("[]\n")) is False  # cannot be asked: warm up

    calls = []
    monkeypatch.setattr(completion, "complete_label_map", lambda *a, **k: calls.append(k) or 1 / 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["--protocol", "lines", "--serve", "--checkpoint", MODEL, "--device", "cpu"]) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert calls and calls[0]["fit_steps"] == 2 and calls[0]["device"] == "cpu"
    (failed,) = [line for line in lines if line.startswith("warm-up completion failed")]
    assert "ZeroDivisionError" in failed and lines.index(failed) < lines.index("HC-READY")
