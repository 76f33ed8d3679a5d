"""The project's common base exception.

Every error that HeartCompletion raises on purpose for bad input, a bad file or an environment
it cannot work in derives from :class:`HeartCompletionError`, so a caller (a command line, the
Slicer panel's background process, a test) can tell "the project refused, with a message that
names the file and the problem" from a bug. The specific classes keep their historical
built-in bases too (``LabelMapError`` is still a ``ValueError``, ``DataGateError`` still a
``RuntimeError``), so existing ``except`` clauses keep working.

>>> from HeartCompletionLib.labelmap_io import LabelMapError
>>> issubclass(LabelMapError, HeartCompletionError), issubclass(LabelMapError, ValueError)
(True, True)
"""

from __future__ import annotations


class HeartCompletionError(Exception):
    """Base of the project's own errors; the message names the file (or option) and the problem."""
