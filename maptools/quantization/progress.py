"""Progress of a long run: PPQ's progress bars switch, and the count the command line's progress line shows.

It lives outside :mod:`maptools.quantization.engine`, whose import imports PPQ, so that the command line
can set it and still reject bad arguments before PPQ (and torch) are imported;
:func:`maptools.quantization.engine.quiet.ppq_silenced` reads the switch.

The loops that take minutes (PPQ's passes over the calibration batches, the error analysis over the
held-out batches, the layer-wise analysis over the operators) go through :func:`counted`; the command
line's progress line (:func:`progress_line`) then says which pass, how far it is, and about how long is
left of it, instead of repeating the stage's name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["Counted", "counted", "progress_enabled", "progress_line", "reset_progress", "show_progress"]

T = TypeVar("T")

_state: dict[str, object] = {"enabled": False, "task": None}


def show_progress(enabled: bool) -> None:
    """Let PPQ's progress bars (written to stderr) through; the command line does this on a terminal."""
    _state["enabled"] = bool(enabled)


def progress_enabled() -> bool:
    """Whether :func:`show_progress` is on."""
    return bool(_state["enabled"])


class Counted(list[T]):
    """A list whose every pass over it is counted: pass number, items done, and the time it took so far."""

    def __init__(self, label: str, items: Iterable[T]) -> None:
        super().__init__(items)
        self.label = label
        self.passes = 0
        self.done = 0
        self.started = time.monotonic()

    def __iter__(self) -> Iterator[T]:
        self.passes, self.done, self.started = self.passes + 1, 0, time.monotonic()
        _state["task"] = self
        for item in super().__iter__():
            yield item
            self.done += 1

    def line(self, now: float | None = None) -> str:
        """``<label> pass <p>: <done>/<total>, about <s> s left of it`` (the estimate once an item is done)."""
        now = time.monotonic() if now is None else now
        text = f"{self.label}" + (f" pass {self.passes}" if self.passes > 1 else "") + f": {self.done}/{len(self)}"
        if 0 < self.done < len(self):
            left = (now - self.started) / self.done * (len(self) - self.done)
            text += f", about {left:.0f} s left of it"
        return text


def counted(label: str, items: Iterable[T]) -> Counted[T]:
    """``items`` as a :class:`Counted` list that the progress line reports while it is iterated."""
    return Counted(label, items)


def progress_line() -> str | None:
    """The count of the loop running (or last run), for the progress line; None before any."""
    task = _state["task"]
    return task.line() if isinstance(task, Counted) else None


def reset_progress() -> None:
    """Forget the last loop (a new command starts)."""
    _state["task"] = None
