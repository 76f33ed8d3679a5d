"""Ending a command's process without Python's teardown.

Once ``import torch`` has run, the interpreter's own teardown at exit (its modules and the native
libraries behind them released one by one) takes 0.7-0.9 s on the 2-core development machine,
and nothing the user asked for happens in it. For ``heart-complete`` on one file that is a
seventh of a 1 mm completion started from the command line (docs/benchmarks.md, session 16).

:func:`exit_after` runs a command's ``main`` and ends the process the way a normal exit does up
to that teardown: it runs the ``atexit`` handlers (logging's flush, the clean-up of ``tempfile``
and ``weakref.finalize``, multiprocessing's), flushes the standard streams and then leaves with
``os._exit``. While a non-daemon thread still runs (a normal exit would wait for it) it makes the
normal exit instead. The exit status is the one a normal exit would give:
``main``'s return value or ``SystemExit`` code (``None`` is 0, a message is printed and gives 1),
and 120 when the final flush of the standard streams fails. An exception from ``main`` other
than ``SystemExit`` takes the normal path (traceback, status 1).

A command's ``main`` itself stays an ordinary function that returns its status, so tests and
other Python code call it as before; only the process entry points go through :func:`exit_after`:
``heart-complete``'s (:func:`.complete_cli.run`: the console script and ``python -m``, the Slicer
panel's background process included). The training commands keep the ordinary exit: their runs
are minutes long, and the distributed ones' process groups are not to be cut short.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable, NoReturn

#: status of a process whose final flush of stdout or stderr failed (as CPython gives)
FLUSH_FAILED = 120


def _other_threads_running() -> bool:
    main = threading.main_thread()
    return any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate())


def exit_after(main: Callable[[], object]) -> NoReturn:
    """Run ``main()`` and end the process with its status, skipping the interpreter's teardown
    (module docstring). Falls back to an ordinary ``sys.exit`` where that could change anything:
    another non-daemon thread still running, or no way to run the ``atexit`` handlers."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    import atexit

    run_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; what a normal exit calls
    if run_handlers is None or _other_threads_running():
        sys.exit(code)
    if code is None or isinstance(code, int):  # sys.exit's mapping: None -> 0, an integer -> itself
        status = int(code or 0)
    else:  # a message: printed, status 1
        print(code, file=sys.stderr)
        status = 1
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream, as a normal exit reports it
            status = FLUSH_FAILED
    os._exit(status)
