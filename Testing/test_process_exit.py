"""``HeartCompletionLib.inference.process_exit``: a command's process ends with main's status, its output
flushed and its atexit handlers run, without the interpreter's teardown; a normal exit where that
could change anything. Each case is a small script run in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: an object torn down with the module globals at a normal exit (not at all with exit_after)
PREAMBLE = textwrap.dedent("""\
    import atexit, sys, threading, time
    from HeartCompletionLib.inference.process_exit import exit_after

    class Teardown:
        def __del__(self):
            sys.stderr.write("TORN-DOWN\\n")
            sys.stderr.flush()

    KEEP = Teardown()
""")


def run_script(body: str, tmp_path, *args):
    script = tmp_path / "command.py"
    script.write_text(PREAMBLE + textwrap.dedent(body), encoding="utf-8")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)


def test_status_output_and_atexit_handlers_without_teardown(tmp_path):
    marker = tmp_path / "atexit.txt"
    proc = run_script(f"""
        import shutil, tempfile, weakref

        class Holder:
            pass

        HOLDER = Holder()

        def main():
            atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
            scratch = tempfile.mkdtemp(dir={str(tmp_path)!r}, prefix="scratch_")
            weakref.finalize(HOLDER, shutil.rmtree, scratch)  # cleaned at exit like a TemporaryDirectory
            sys.stdout.write("x" * 100_000)  # block-buffered on a pipe: still there at the end
            return 3

        exit_after(main)
    """, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "x" * 100_000
    assert marker.read_text() == "ran"
    assert not list(tmp_path.glob("scratch_*")), "a weakref.finalize clean-up did not run"
    assert "TORN-DOWN" not in proc.stderr  # the teardown was skipped


def test_a_normal_exit_tears_down(tmp_path):
    """The control of the test above: without exit_after the same object is torn down."""
    proc = run_script("sys.exit(0)\n", tmp_path)
    assert proc.returncode == 0
    assert "TORN-DOWN" in proc.stderr


@pytest.mark.parametrize("code,status,stderr", [(None, 0, ""), (0, 0, ""), (2, 2, ""), ("'bad thing'", 1, "bad thing")])
def test_system_exit_codes_as_python_gives_them(tmp_path, code, status, stderr):
    proc = run_script(f"""
        def main():
            sys.exit({code})

        exit_after(main)
    """, tmp_path)
    assert proc.returncode == status, proc.stderr
    assert stderr in proc.stderr
    assert "TORN-DOWN" not in proc.stderr


def test_argparse_help_and_errors(tmp_path):
    body = """
        import argparse

        def main():
            p = argparse.ArgumentParser(prog="demo")
            p.add_argument("--n", type=int, required=True)
            return p.parse_args().n

        exit_after(main)
    """
    assert run_script(body, tmp_path, "--n", "5").returncode == 5
    helped = run_script(body, tmp_path, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: demo")
    refused = run_script(body, tmp_path, "--n", "x")
    assert refused.returncode == 2 and "invalid int value" in refused.stderr


def test_a_running_thread_gets_a_normal_exit(tmp_path):
    """A normal exit waits for non-daemon threads; so does exit_after, by falling back to it."""
    marker = tmp_path / "thread.txt"
    proc = run_script(f"""
        def work():
            time.sleep(0.5)
            open({str(marker)!r}, "w").write("finished")

        def main():
            threading.Thread(target=work).start()
            return 4

        exit_after(main)
    """, tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert marker.read_text() == "finished"
    assert "TORN-DOWN" in proc.stderr  # the fallback is the ordinary exit


def test_a_bug_in_main_gets_its_traceback(tmp_path):
    proc = run_script("""
        def main():
            raise RuntimeError("a bug")

        exit_after(main)
    """, tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr


def test_a_failed_final_flush_gives_120(tmp_path):
    proc = run_script("""
        class Broken:
            def write(self, text):
                return len(text)

            def flush(self):
                raise BrokenPipeError(32, "Broken pipe")

        def main():
            sys.stdout = Broken()
            return 0

        exit_after(main)
    """, tmp_path)
    assert proc.returncode == 120, proc.stderr
