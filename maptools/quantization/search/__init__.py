"""Mixed-precision search under a crossbar budget: :func:`search` and ``maptools search``.

Per-layer (weight, activation) bits from the chip's allowed set, found by a greedy walk on layer-wise
sensitivities and crossbar costs (:mod:`~maptools.quantization.search.front`), measured for real on held-out
data, resumable through a content-hashed cache, on the local process pool or a Dask cluster. See :doc:`/search`.
"""

from __future__ import annotations

from maptools.quantization.search.evaluate import top1_agreement
from maptools.quantization.search.result import SearchResult
from maptools.quantization.search.run import search

__all__ = ["SearchResult", "search", "top1_agreement"]
