"""Old module name of ``heart-complete``, kept as a thin alias of :mod:`HeartCompletionLib.complete_cli`.

The command moved to the inference side (it is also the Slicer panel's background process);
``python -m heart_training.complete_cli`` still runs it, with the same options and exit codes.
Still imported by tests outside the completion command's own (``test_model_registry``,
``test_fast_decode``, ``test_file_rules``, ``test_output_grid``) and named in ``docs/real_data.md``;
remove it once they use ``HeartCompletionLib.complete_cli``.
"""

from __future__ import annotations

from HeartCompletionLib import complete_cli as _command
from HeartCompletionLib.complete_cli import CliError, _jobs, _parser  # noqa: F401 - the old names

__all__ = ["CliError", "main"]


def main(argv=None):
    """``heart-complete`` (:func:`HeartCompletionLib.complete_cli.main`)."""
    return _command.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
