"""The project's common base exception.

Every error that HeartCompletion raises on purpose for bad input, a bad file or an environment
it cannot work in derives from :class:`HeartCompletionError`, so a caller (a command line, the
Slicer panel's background process, a test) can tell "the project refused, with a message that
names the file and the problem" from a bug. The specific classes keep their historical
built-in bases too (``LabelMapError`` is still a ``ValueError``, ``DataGateError`` still a
``RuntimeError``), so existing ``except`` clauses keep working.

>>> from HeartCompletionLib.io.labelmap_files import LabelMapError
>>> issubclass(LabelMapError, HeartCompletionError), issubclass(LabelMapError, ValueError)
(True, True)

:class:`ExitCode` is the exit status of every command line of the project (``heart-*`` and the
``python -m HeartCompletionLib.*_cli`` tools, the Slicer panel's background process included):

>>> int(ExitCode.OK), int(ExitCode.FAILED), int(ExitCode.USAGE)
(0, 1, 2)
"""

from __future__ import annotations

from enum import IntEnum


class HeartCompletionError(Exception):
    """Base of the project's own errors; the message names the file (or option) and the problem."""


class ExitCode(IntEnum):
    """Exit status of every command (an ``int``: ``sys.exit(ExitCode.USAGE)`` exits with 2).

    - ``OK`` (0): everything asked for was done.
    - ``FAILED`` (1): the run went on but something failed: a case of a batch could not be
      prepared, completed or evaluated (the others were), a checked dataset has bad cases, or the
      Slicer panel's background process failed for a reason other than its input.
    - ``USAGE`` (2): refused before any work, with a message naming the option or file: bad
      options (argparse's own exit status for them), a missing or unusable input, checkpoint or
      configuration, nothing to work on. ``BAD_INPUT`` is the same value, the name the background
      process uses for "the input (label map, checkpoint, table) was refused".
    """

    OK = 0
    FAILED = 1
    USAGE = 2
    BAD_INPUT = 2  # alias of USAGE
