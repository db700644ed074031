"""What the command-line tools (``python -m tsparse.train``, ``tsparse.eval``, ``tsparse.infer``)
share: a user's mistake ends in ONE line on stderr naming the file, argument or key, and exit
status 2 - not a traceback.

* :class:`ArgumentParser` - argparse whose errors (unknown flag, a value that is not a number,
  a missing required flag) are that one line (``<prog>: error: <what> (see --help)``) instead
  of the usage block and the error.
* :class:`UsageError` - raised by a tool's own argument checks (``--batch-size 0``, ...).
* :func:`run` - calls a tool's main and turns the errors a user can cause (a bad flag, config
  key or value: ``ValueError`` and its subclasses - JSON, YAML as rewrapped, Unicode; a file
  that is missing, unreadable, not an image: ``OSError``) into that line. Anything else is a
  bug and keeps its traceback. ``--debug`` on the command line or ``TSPARSE_DEBUG=1`` in the
  environment shows the traceback of every error.
* :func:`one_line_warnings` - warnings raised while a tool runs (e.g. boxes dropped from a data
  file) print as one line each, ``<prog>: warning: <message>``, without Python's source line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

__all__ = ["ArgumentParser", "UsageError", "run", "debug_requested", "one_line", "one_line_warnings"]


class UsageError(ValueError):
    """A bad command-line argument; the message names it (``--limit must be >= 0, got -1``)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a parsing error as one :class:`UsageError` line (``--help`` still
    prints the usage). Adds ``--debug`` (tracebacks for every error)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the full traceback of an error (also: TSPARSE_DEBUG=1)")

    def error(self, message):  # noqa: D401 - argparse's hook
        raise UsageError(f"{message} (see --help)")


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """``--debug`` among the arguments, or ``TSPARSE_DEBUG=1`` in the environment."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in list(argv) or os.environ.get("TSPARSE_DEBUG", "0").strip() == "1"


def one_line(err: BaseException) -> str:
    """The exception's message on one line (whitespace runs, newlines included, become one space;
    an exception without a message gives its type's name)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename!r}"
    return text or type(err).__name__


#: The errors a user can cause through arguments, configs and data files.
USER_ERRORS: tuple = (ValueError, OSError)


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """Within the block, each warning prints as ``<prog>: warning: <message>`` (one line) on
    stderr; Python's default shows the file, line number and source line of where it was raised."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file,
              flush=True)

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]], prog: str) -> int:
    """Runs ``main(argv)``; a user error (see the module docs) prints one line on stderr and
    returns 2, Ctrl-C returns 130 with one line. With ``--debug`` / ``TSPARSE_DEBUG=1`` errors
    propagate with their traceback."""
    debug = debug_requested(argv)
    try:
        with one_line_warnings(prog):
            return main(argv)
    except SystemExit:
        raise  # --help, or a tool's own exit status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        where = _raised_outside_tsparse(e)
        hint = f" (raised in {where}; --debug shows the traceback)" if where else ""
        print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 2


def _raised_outside_tsparse(err: BaseException) -> Optional[str]:
    """The module an error was raised in when that is not tsparse itself (a library's own
    error, which may be a bug rather than the user's mistake), else ``None``."""
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if path.startswith(_PKG_DIR + os.sep):
        return None
    return tb.tb_frame.f_globals.get("__name__") or os.path.basename(path)


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
