"""How a MAC operator's integer weights are placed on crossbar arrays.

This module fixes the layout that the arithmetic model (:mod:`~maptools.quantization.cim.arithmetic`)
assumes and that a mapper must follow for the simulation to describe its chip.

The weight matrix
-----------------

Every MAC reaches the crossbar as ``G`` weight matrices of shape ``(M, K)`` (:func:`mac_matrix`), exactly
the ``weights`` that the reference executor hands to
:func:`~maptools.quantization.reference.mac.accumulate`:

* ``Conv``, weight ``(M_total, Cin/G, kh, kw)`` (or 1-D ``(M_total, Cin/G, k)``) with ``group=G``: group
  ``g`` holds output channels ``g*M .. (g+1)*M - 1`` (``M = M_total / G``) and the dot-product index is the
  C-order flattening of one filter, ``k = (c * kh + i) * kw + j`` for input channel ``c`` of the group and
  kernel tap ``(i, j)`` -- the im2col row order.
* ``ConvTranspose``, weight ``(Cin, M, kh, kw)`` (``M`` output channels per group): it runs as the Conv of
  its zero-inserted input with the spatially flipped kernel, so matrix entry ``(g, m, (c * kh + i) * kw + j)``
  is ONNX weight ``[g * Cin/G + c, m, kh - 1 - i, kw - 1 - j]``.
* ``Gemm`` (``B`` of shape ``(K, N)``, or ``(N, K)`` with ``transB=1``) and ``MatMul`` with a constant
  ``(K, N)`` weight: one matrix ``(M=N, K)``, the transposed weight (``transB=1``: the weight itself). A
  MatMul weight with leading batch axes ``(..., K, N)`` gives one matrix per batch entry (``G`` = their
  product).

``TileLayout.source_index`` maps each matrix entry ``(g, m, k)`` to its flat (C-order) index in the ONNX
weight tensor, so a mapper need not reimplement these rules.

Slices and signs
----------------

A ``b``-bit weight (integers ``weight_min .. 2^(b-1) - 1``, ``weight_min`` defaulting to ``-2^(b-1)``) is
stored in cells of ``c`` bits (:func:`slice_weights`):

* ``'offset'``: ``v = w + 2^(b-1)`` (``0 <= v < 2^b``) in ``S = ceil(b / c)`` unsigned digits,
  ``v = sum_s 2^(c*s) * v_s`` with ``v_s = (v >> c*s) & (2^c - 1)``, one column per slice. The chip
  subtracts ``2^(b-1) * sum_k x_k`` digitally.
* ``'differential'``: ``w = w+ - w-`` with ``w+ = max(w, 0)``, ``w- = max(-w, 0)``, each in
  ``S = ceil(m / c)`` digits where ``m`` is the bit length of the largest magnitude,
  ``max(-weight_min, 2^(b-1) - 1)`` (``m = b`` for the full two's-complement range, ``b - 1`` for a
  symmetric ``weight_min = -(2^(b-1) - 1)``), one column per slice and sign.

Slice 0 is the least significant. :func:`combine_slices` inverts the split.

Tiles
-----

For one weight matrix ``(M, K)`` (:func:`tile_layout`):

* **Rows.** The dot product is cut into ``T = ceil(K / R)`` row tiles of consecutive im2col indices: row tile
  ``t`` holds ``k = t*R .. min(K, (t+1)*R) - 1``, and index ``k`` sits on crossbar row ``k - t*R``. The last
  tile may be partly empty; its unused rows carry no weight (cells at 0).
* **Columns.** Each output channel occupies ``W = signs * S`` adjacent columns (``signs`` = 2 for
  differential, 1 for offset), ordered slice-major, sign-minor: local column ``j = s * signs + sign`` holds
  slice ``s`` of sign ``sign`` (0: ``w+`` or the offset weight, 1: ``w-``), so a differential pair is
  adjacent. A channel is never split across arrays: an array holds ``Q = floor(C / W)`` channels, and
  channels ``u*Q .. (u+1)*Q - 1`` go to column tile ``u``, channel ``m`` at columns
  ``(m - u*Q) * W .. (m - u*Q + 1) * W - 1``. There are ``U = ceil(M / Q)`` column tiles (which is
  ``ceil(M * W / C)`` whenever ``W`` divides ``C``).
* **Arrays.** Group ``g``, row tile ``t`` and column tile ``u`` form one array, ``G * T * U`` in all
  (:attr:`TileLayout.arrays <maptools.quantization.cim.mapping.TileLayout.arrays>`). Groups are laid out
  separately here; packing several groups block-diagonally into one array (unused cells at 0) leaves every
  column's partial sum, and so the arithmetic, unchanged.

Every column has its own ADC conversion and the shift-and-add is digital, so the column tiling does not
change any number the arithmetic model computes; the row tiling does (each row tile's partial sums are
digitized separately).

.. code-block:: python

    import numpy as np
    from maptools.quantization.cim import CIMSpec, slice_weights, tile_layout

    spec = CIMSpec(rows=256, cols=256, cell_bits=2)
    layout = tile_layout((64, 64, 3, 3), "Conv", 1, 4, spec)   # K = 576
    print(layout)          # Conv 64 x 576: 3 row tiles x 1 column tile = 3 arrays of 256 x 256, ...
    weight = np.random.default_rng(0).integers(-8, 8, size=(64, 64, 3, 3))
    slices = slice_weights(weight, 4, spec)                    # (2 signs, 2 slices, 64, 64, 3, 3) digits
    cells = layout.crossbar(slices, layout.arrays[0])          # what array 0 is programmed with
"""

from __future__ import annotations

from maptools.quantization.cim.slicing import (
    WeightFormat,
    combine_slices,
    slice_weights,
    weight_format,
)
from maptools.quantization.cim.slicing import as_int_weights as as_int_weights
from maptools.quantization.cim.slicing import weight_digits as weight_digits
from maptools.quantization.cim.tiles import MAC_OPS, ArrayTile, TileLayout, mac_matrix, tile_layout

__all__ = [
    "MAC_OPS",
    "ArrayTile",
    "TileLayout",
    "WeightFormat",
    "combine_slices",
    "mac_matrix",
    "slice_weights",
    "tile_layout",
    "weight_format",
]
