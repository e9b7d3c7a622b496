"""Importing and calling PPQ without its banner, prints, progress bars and CUDA warnings.

PPQ prints a banner on import, progress bars and reports while it works, and torch warns "No CUDA
runtime is found" when PPQ loads its extension helpers. A library must stay quiet: everything PPQ
writes is captured and forwarded to the ``maptools.ppq`` logger at DEBUG level.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

from maptools.quantization.progress import progress_enabled

__all__ = ["ppq_logger", "ppq_silenced"]

ppq_logger = logging.getLogger("maptools.ppq")


@contextlib.contextmanager
def ppq_silenced() -> Iterator[None]:
    """Capture stdout, stderr (unless :mod:`~maptools.quantization.progress` shows progress), warnings and noisy
    torch loggers."""
    buffer = io.StringIO()
    noisy = [logging.getLogger(name) for name in ("torch.utils.cpp_extension", "torch._subclasses")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(buffer))
            if not progress_enabled():
                stack.enter_context(contextlib.redirect_stderr(buffer))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)
        text = buffer.getvalue().strip()
        if text and ppq_logger.isEnabledFor(logging.DEBUG):
            for line in text.replace("\r", "\n").splitlines():
                if line.strip():
                    ppq_logger.debug(line.rstrip())
