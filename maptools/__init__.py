"""maptools: the quantization stage of a hardware-mapping toolchain for compute-in-memory chips.

The public entry points live in :mod:`maptools.quantization`; every error derives from
:class:`maptools.MaptoolsError` (see :mod:`maptools.errors`, whose classes are re-exported here).
"""

from __future__ import annotations

import logging

from maptools import errors
from maptools.errors import *  # noqa: F403  (the error classes are part of the top-level API)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [*errors.__all__, "__version__"]
