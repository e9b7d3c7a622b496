"""The ``maptools`` command line (also ``python -m maptools``).

Sub-commands: ``quantize``, ``inspect``, ``verify``, ``demo``, ``cim-sweep`` and ``search``. Exit codes: 0
success; 2 bad usage or bad input (a one-line error on stderr, no traceback); 1 an unexpected internal error.
``verify`` exits 0 when every execution ran (or the integer executor refused an operator it does not support:
the table says which), 3 when another execution could not run (PPQ's graph not rebuilt, a modified artifact), 2
when none could.
Results go to stdout; logs, notices and, when stderr is not a terminal, a progress line every
:data:`HEARTBEAT_SECONDS` go to stderr.

The package: :func:`main` here (with the console logging and the progress lines);
:mod:`~maptools.cli.parser` builds the argument parser; :mod:`~maptools.cli.commands` holds the sub-command bodies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from maptools.cli.commands import _COMMANDS, _LONG_COMMANDS
from maptools.cli.parser import _build_parser, _UsageError
from maptools.cli.parser import _input_spec as _input_spec
from maptools.errors import MaptoolsError
from maptools.quantization.progress import progress_line, reset_progress

__all__ = ["main"]

logger = logging.getLogger("maptools.cli")

#: Seconds between two progress lines.
HEARTBEAT_SECONDS = 5.0
#: Third-party loggers that are noisy at DEBUG (PIL: a line per PNG chunk; matplotlib: font matching).
_QUIETED = ("PIL", "matplotlib")


class _StageHandler(logging.Handler):
    """Remembers the last INFO message of the ``maptools`` loggers: the stage a progress line names."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stage = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().splitlines()
        if text and record.name != "maptools.ppq":
            self.stage = text[0] if len(text[0]) <= 160 else text[0][:159] + "…"


@contextlib.contextmanager
def _heartbeat(command: str, enabled: bool) -> Iterator[None]:
    """Print ``maptools <command>: <elapsed> s, <stage> [<count>]`` on stderr every :data:`HEARTBEAT_SECONDS`.

    ``<count>`` is the loop running (:func:`~maptools.quantization.progress.progress_line`): which pass over the
    calibration batches, how many of them are done and about how long is left of the pass.
    """
    if not enabled:
        yield
        return
    stages = _StageHandler()
    package = logging.getLogger("maptools")
    level = package.level
    if package.getEffectiveLevel() > logging.INFO:  # the INFO records must exist; the console handler filters them
        package.setLevel(logging.INFO)
    package.addHandler(stages)
    stop = threading.Event()
    started = time.monotonic()
    stream = sys.stderr

    reset_progress()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            count = progress_line()
            print(f"maptools {command}: {time.monotonic() - started:.0f} s, {stages.stage}"
                  + (f" [{count}]" if count else ""), file=stream, flush=True)

    thread = threading.Thread(target=beat, name="maptools-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        package.removeHandler(stages)
        package.setLevel(level)


@contextlib.contextmanager
def _console_logging(verbose: int) -> Iterator[None]:
    """Log to stderr at the verbosity asked for, and restore the logging setup afterwards."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)  # filters here, so a logger opened to INFO (the heartbeat's) adds no output
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = root.level, {name: logging.getLogger(name).level for name in _QUIETED}
    root.addHandler(handler)
    root.setLevel(level)
    for name in _QUIETED:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, old in saved[1].items():
            logging.getLogger(name).setLevel(old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    with _console_logging(args.verbose):
        try:
            with _heartbeat(args.command, args.command in _LONG_COMMANDS and not sys.stderr.isatty()):
                return _COMMANDS[args.command](args)
        except MaptoolsError as exc:
            print(f"maptools {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # output piped into `head` and the like
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            return 0
        except KeyboardInterrupt:
            print("maptools: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # an internal error: the traceback once, at -vv, for the bug report
            logger.debug("internal error", exc_info=True)
            hint = "" if args.verbose >= 2 else " (run with -vv for details)"
            print(f"maptools {args.command}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
            return 1
