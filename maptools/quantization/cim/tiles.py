"""How a MAC operator's integer weights are placed on crossbar arrays: :func:`mac_matrix` and :func:`tile_layout`.

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
stored in cells of ``c`` bits (:func:`~maptools.quantization.cim.slicing.slice_weights`):

* ``'offset'``: ``v = w + 2^(b-1)`` (``0 <= v < 2^b``) in ``S = ceil(b / c)`` unsigned digits,
  ``v = sum_s 2^(c*s) * v_s`` with ``v_s = (v >> c*s) & (2^c - 1)``, one column per slice. The chip
  subtracts ``2^(b-1) * sum_k x_k`` digitally.
* ``'differential'``: ``w = w+ - w-`` with ``w+ = max(w, 0)``, ``w- = max(-w, 0)``, each in
  ``S = ceil(m / c)`` digits where ``m`` is the bit length of the largest magnitude,
  ``max(-weight_min, 2^(b-1) - 1)`` (``m = b`` for the full two's-complement range, ``b - 1`` for a
  symmetric ``weight_min = -(2^(b-1) - 1)``), one column per slice and sign.

Slice 0 is the least significant. :func:`~maptools.quantization.cim.slicing.combine_slices` inverts the split.

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
  (:attr:`TileLayout.arrays <maptools.quantization.cim.tiles.TileLayout.arrays>`). Groups are laid out
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

import math
from dataclasses import dataclass

import numpy as np

from maptools.errors import InvalidArgumentError
from maptools.quantization.cim.slicing import WeightFormat, weight_format
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.format import MAC_OPS

__all__ = ["ArrayTile", "TileLayout", "crossbar_column", "mac_matrix", "tile_layout"]


def mac_matrix(weight: np.ndarray, op_type: str, group: int = 1, *, trans_b: bool = False) -> np.ndarray:
    """The ``(G, M, K)`` weight matrices of a MAC operator, in the order the executor accumulates them.

    Args:
        weight: The ONNX weight tensor (any dtype; pass ``np.arange(size).reshape(shape)`` to follow
            positions).
        op_type: ``'Conv'``, ``'ConvTranspose'``, ``'Gemm'`` or ``'MatMul'``.
        group: The Conv/ConvTranspose ``group`` attribute (1 for Gemm and MatMul).
        trans_b: The Gemm ``transB`` attribute.

    Raises:
        InvalidArgumentError: An unknown operator type, or a weight shape that does not fit it.
    """
    w = np.asarray(weight)
    if op_type not in MAC_OPS:
        raise InvalidArgumentError(f"op_type: got {op_type!r}, expected one of {', '.join(MAC_OPS)}")
    if isinstance(group, bool) or not isinstance(group, int | np.integer) or group < 1:
        raise InvalidArgumentError(f"group: got {group!r}, expected an integer >= 1")
    if op_type in ("Conv", "ConvTranspose"):
        if w.ndim < 3 or w.shape[0] % group:
            raise InvalidArgumentError(f"{op_type} weight: got shape {list(w.shape)} with group {group}, expected "
                                       f"(channels, channels per group, *kernel) with channels divisible by group")
        if op_type == "Conv":
            return w.reshape(group, w.shape[0] // group, -1)
        kernel = w.shape[2:]
        cg, mg = w.shape[0] // group, w.shape[1]
        flipped = w[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)]
        return flipped.reshape(group, cg, mg, *kernel).swapaxes(1, 2).reshape(group, mg, -1)
    if group != 1:
        raise InvalidArgumentError(f"group: got {group} for {op_type}, expected 1")
    if op_type == "Gemm":
        if w.ndim != 2:
            raise InvalidArgumentError(f"Gemm weight: got shape {list(w.shape)}, expected 2-D")
        return (w if trans_b else w.T)[None]
    if w.ndim < 2:
        raise InvalidArgumentError(f"MatMul weight: got shape {list(w.shape)}, expected (..., K, N)")
    return np.swapaxes(w, -1, -2).reshape(-1, w.shape[-1], w.shape[-2])


def crossbar_column(fmt: WeightFormat, channels_per_array: int, channel: np.ndarray | int,
                    slice_index: np.ndarray | int, sign: np.ndarray | int) -> np.ndarray:
    """The crossbar column (within its array) of a slice and sign of an output channel; broadcasts.

    Channel ``m`` takes ``W = signs * S`` adjacent columns from ``(m % Q) * W``, slice-major and sign-minor.
    """
    local = np.asarray(channel) % channels_per_array
    return local * fmt.columns_per_weight + np.asarray(slice_index) * fmt.signs + np.asarray(sign)


@dataclass(frozen=True)
class ArrayTile:
    """One crossbar array of a layer: which weights it holds.

    Cell ``(r, j)`` holds digit ``slices[column_sign[j], column_slice[j]]`` of the weight at matrix entry
    ``(group, column_channel[j], rows[r])``; rows and columns past ``len(rows)`` and ``len(column_channel)``
    are unused (cells at 0).

    Attributes:
        index: Position in :attr:`TileLayout.arrays`, ``(group * T + row_tile) * U + col_tile``.
        group: The weight matrix (Conv group) ``g``.
        row_tile: The row tile ``t``.
        col_tile: The column tile ``u``.
        rows: im2col index ``k`` on each used crossbar row (consecutive).
        column_channel: Output channel (within the group) of each used column.
        column_slice: Weight slice of each used column (0 = least significant).
        column_sign: Sign of each used column (0: positive or offset weight, 1: negative weight).
    """

    index: int
    group: int
    row_tile: int
    col_tile: int
    rows: np.ndarray
    column_channel: np.ndarray
    column_slice: np.ndarray
    column_sign: np.ndarray


@dataclass(frozen=True)
class TileLayout:
    """The placement of one MAC's weights on crossbar arrays (see the module docstring for the rules).

    Attributes:
        op_type: The operator type.
        weight_shape: The ONNX weight shape.
        spec: The crossbar.
        format: Bits, signs and slices of the weights.
        groups: Number of weight matrices ``G``.
        out_channels: Output channels per matrix ``M``.
        depth: Dot-product length ``K``.
        row_tiles: ``T = ceil(K / rows)``.
        channels_per_array: ``Q = floor(cols / columns_per_weight)``.
        col_tiles: ``U = ceil(M / Q)``.
        source_index: ``(G, M, K)`` flat (C-order) index into the ONNX weight of each matrix entry.
    """

    op_type: str
    weight_shape: tuple[int, ...]
    spec: CIMSpec
    format: WeightFormat
    groups: int
    out_channels: int
    depth: int
    row_tiles: int
    channels_per_array: int
    col_tiles: int
    source_index: np.ndarray

    @property
    def columns_per_weight(self) -> int:
        """Columns per output channel ``W = signs * S``."""
        return self.format.columns_per_weight

    @property
    def num_arrays(self) -> int:
        """Arrays the layer needs, ``G * T * U``."""
        return self.groups * self.row_tiles * self.col_tiles

    @property
    def used_cells(self) -> int:
        """Cells that hold a weight digit, ``G * K * M * W``."""
        return self.groups * self.depth * self.out_channels * self.columns_per_weight

    @property
    def utilization(self) -> float:
        """Fraction of the cells of all its arrays that hold a weight digit."""
        return self.used_cells / (self.num_arrays * self.spec.rows * self.spec.cols)

    def row_range(self, row_tile: int) -> tuple[int, int]:
        """The im2col indices ``start, stop`` of row tile ``t`` (``stop`` exclusive)."""
        if not 0 <= row_tile < self.row_tiles:
            raise InvalidArgumentError(f"row_tile: got {row_tile}, expected 0..{self.row_tiles - 1}")
        return row_tile * self.spec.rows, min(self.depth, (row_tile + 1) * self.spec.rows)

    def row_of(self, k: int) -> tuple[int, int]:
        """``(row tile, crossbar row)`` of im2col index ``k``."""
        if not 0 <= k < self.depth:
            raise InvalidArgumentError(f"k: got {k}, expected 0..{self.depth - 1}")
        return divmod(k, self.spec.rows)

    def column_of(self, channel: int, slice_index: int, sign: int = 0) -> tuple[int, int]:
        """``(column tile, crossbar column)`` of one slice and sign of output channel ``channel``."""
        fmt = self.format
        if not (0 <= channel < self.out_channels and 0 <= slice_index < fmt.slices and 0 <= sign < fmt.signs):
            raise InvalidArgumentError(
                f"column_of({channel}, {slice_index}, {sign}): expected channel 0..{self.out_channels - 1}, "
                f"slice 0..{fmt.slices - 1}, sign 0..{fmt.signs - 1}"
            )
        col_tile, local = divmod(channel, self.channels_per_array)
        return col_tile, int(crossbar_column(fmt, self.channels_per_array, channel, slice_index, sign))

    @property
    def arrays(self) -> list[ArrayTile]:
        """Every array of the layer, group-major, then row tile, then column tile."""
        fmt, q = self.format, self.channels_per_array
        tiles = []
        for g in range(self.groups):
            for t in range(self.row_tiles):
                start, stop = self.row_range(t)
                for u in range(self.col_tiles):
                    channels = np.arange(u * q, min(self.out_channels, (u + 1) * q))
                    local = np.arange(fmt.columns_per_weight)
                    tiles.append(ArrayTile(
                        index=len(tiles), group=g, row_tile=t, col_tile=u, rows=np.arange(start, stop),
                        column_channel=np.repeat(channels, fmt.columns_per_weight),
                        column_slice=np.tile(local // fmt.signs, channels.size),
                        column_sign=np.tile(local % fmt.signs, channels.size),
                    ))
        return tiles

    def crossbar(self, slices: np.ndarray, tile: ArrayTile) -> np.ndarray:
        """The digits array ``tile`` is programmed with, ``(len(tile.rows), len(tile.column_channel))``.

        Args:
            slices: :func:`slice_weights` of the ONNX weight, ``(signs, S, *weight_shape)``.
            tile: One of :attr:`arrays`.
        """
        d = np.asarray(slices)
        if d.shape != (self.format.signs, self.format.slices, *self.weight_shape):
            raise InvalidArgumentError(f"slices: got shape {list(d.shape)}, expected "
                                       f"{[self.format.signs, self.format.slices, *self.weight_shape]}")
        flat = d.reshape(self.format.signs, self.format.slices, -1)
        src = self.source_index[tile.group][np.ix_(tile.column_channel, tile.rows)].T  # (rows, columns)
        return flat[tile.column_sign[None, :], tile.column_slice[None, :], src]

    def __str__(self) -> str:
        fmt, spec = self.format, self.spec
        groups = f" ({self.groups} groups)" if self.groups > 1 else ""
        return (f"{self.op_type} {self.out_channels} x {self.depth}{groups}: {_count(self.row_tiles, 'row tile')} x "
                f"{_count(self.col_tiles, 'column tile')} = {_count(self.num_arrays, 'array')} of {spec.rows} x "
                f"{spec.cols}, "
                f"{fmt.columns_per_weight} columns per weight ({fmt.encoding}, {fmt.slices} slices of "
                f"{fmt.cell_bits} bits), {100 * self.utilization:.1f} % of cells used")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def tile_layout(weight_shape: tuple[int, ...] | list[int], op_type: str, group: int, weight_bits: int,
                spec: CIMSpec, *, trans_b: bool = False, weight_min: int | None = None) -> TileLayout:
    """The placement of a MAC operator's weights on ``spec``'s arrays.

    Args:
        weight_shape: The ONNX weight shape (as in quantparams).
        op_type: ``'Conv'``, ``'ConvTranspose'``, ``'Gemm'`` or ``'MatMul'``.
        group: The ``group`` attribute (1 for Gemm and MatMul).
        weight_bits: Weight bit width (the record's ``weight_bits``).
        spec: The crossbar.
        trans_b: The Gemm ``transB`` attribute.
        weight_min: The smallest weight integer (the record's ``weight_min``); None for ``-2^(b-1)``.

    Raises:
        InvalidArgumentError: A weight shape that does not fit the operator, invalid bits, or an array with
            fewer columns than one output channel needs.
    """
    fmt = weight_format(weight_bits, spec, weight_min)
    shape = tuple(int(n) for n in weight_shape)
    if any(n < 1 for n in shape):
        raise InvalidArgumentError(f"weight_shape: got {list(shape)}, expected positive sizes")
    source = mac_matrix(np.arange(math.prod(shape), dtype=np.int64).reshape(shape), op_type, group, trans_b=trans_b)
    groups, m, k = source.shape
    q = spec.cols // fmt.columns_per_weight
    if q == 0:
        raise InvalidArgumentError(f"spec.cols: got {spec.cols}, expected at least {fmt.columns_per_weight} (the "
                                   f"columns of one {fmt.bits}-bit {fmt.encoding} weight in {fmt.cell_bits}-bit cells)")
    return TileLayout(op_type=op_type, weight_shape=shape, spec=spec, format=fmt, groups=groups, out_channels=m,
                      depth=k, row_tiles=math.ceil(k / spec.rows), channels_per_array=q, col_tiles=math.ceil(m / q),
                      source_index=np.ascontiguousarray(source))
