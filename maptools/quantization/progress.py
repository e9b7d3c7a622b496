"""The switch for PPQ's progress bars, set by the command line before PPQ is imported.

It lives outside :mod:`maptools.quantization.engine`, whose import imports PPQ, so that the command line
can set it and still reject bad arguments before PPQ (and torch) are imported;
:func:`maptools.quantization.engine.quiet.ppq_silenced` reads it.
"""

from __future__ import annotations

__all__ = ["progress_enabled", "show_progress"]

_state = {"enabled": False}


def show_progress(enabled: bool) -> None:
    """Let PPQ's progress bars (written to stderr) through; the command line does this on a terminal."""
    _state["enabled"] = bool(enabled)


def progress_enabled() -> bool:
    """Whether :func:`show_progress` is on."""
    return _state["enabled"]
