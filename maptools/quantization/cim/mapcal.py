"""A whole map on crossbars: the ADC calibration of every MAC, its storage, and the weight slices.

:func:`calibrate_map` runs the integer reference executor (exact MACs) on calibration batches, collects
the column partial sums of every crossbar MAC at the accumulate step (a hook that sees the im2col columns
and changes no result, see :mod:`~maptools.quantization.reference.crossbar`) and chooses each MAC's ADC
ranges with :func:`~maptools.quantization.cim.calibrate.calibrate_adc`'s method. The ranges are calibrated on
the exact executor's activations, the ones the quantization was calibrated on, not on those of a chip
whose earlier layers already carry ADC errors.

.. code-block:: python
   :class: needs-files

    from maptools.examples import digits
    from maptools.quantization import simulate
    from maptools.quantization.cim import CIMSpec, calibrate_map, write_map_calibration

    images, _ = digits.load_split("train")
    spec = CIMSpec.parse("rows=128,cell_bits=2,adc_bits=5,adc_range=calibrated")
    calibration = calibrate_map("digits_w4a4", [images[i:i + 64] for i in range(0, 512, 64)], spec)
    logits = simulate("digits_w4a4", images[:16], cim=spec, adc=calibration)["logits"]   # in memory
    calibration.save("digits_w4a4_adc5.json")          # a JSON file of your choosing, or:
    write_map_calibration("digits_w4a4", calibration)  # the map's cim.json, listed in its manifest
    logits = simulate("digits_w4a4", images[:16], cim=True)["logits"]                    # from cim.json

Where a calibration lives
-------------------------

A :class:`MapCalibration` is plain data, held in memory (``simulate(..., cim=spec, adc=calibration)``),
saved to and loaded from a JSON file the caller chooses (:meth:`MapCalibration.save`,
:meth:`MapCalibration.load`), or stored in the map itself as :data:`CIM_FILE` (``cim.json``) by
:func:`write_map_calibration`: the file is written atomically (a temporary file renamed over it) and
``manifest.json`` is rewritten atomically with its SHA-256, both under the map's writer lock, so every file
of the map stays listed with its hash. :func:`read_map_calibration` reads it back under the reader's shared
lock and checks the hash. A map holds one calibration (a new one replaces it); quantizing the map again
replaces the whole directory and so drops it. No pickle is involved anywhere.

A calibration records the :attr:`~maptools.quantization.reference.core.ReferenceExecutor.fingerprint` of
the crossbars it was made for (every MAC's operands and integer weights), and an executor of another map
refuses it. It is made from a :class:`~maptools.quantization.reference.core.ReferenceExecutor` as well as
from a map name, so it can be computed from in-memory artifacts before a map is written; a caller that
writes a map can add ``calibration.to_json()`` to its files as :data:`CIM_FILE`.

The spec stored is the one given with ``adc_range='calibrated'``; the ranges depend on ``rows``,
``cell_bits``, ``dac_bits``, ``adc_bits`` and ``weight_encoding``, not on ``cols`` or ``requant``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.quantization import artifacts, mapdir
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.calibrate import CALIBRATION_METHODS, AdcHistogram
from maptools.quantization.cim.mapping import slice_weights
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.format import CIM_FILE, weight_slices_key
from maptools.quantization.reference.core import ReferenceExecutor
from maptools.quantization.reference.crossbar import MacOperands

__all__ = [
    "CIM_FILE",
    "MapCalibration",
    "MapHistograms",
    "calibrate_map",
    "collect_histograms",
    "has_map_calibration",
    "map_weight_slices",
    "read_map_calibration",
    "write_map_calibration",
]

logger = logging.getLogger(__name__)

#: Version of :data:`CIM_FILE`'s layout.
CIM_FORMAT = 1

#: A map given by name, or an executor built from artifacts in memory.
MapSource = str | ReferenceExecutor


@dataclass(frozen=True, eq=False)
class MapCalibration:
    """The ADC ranges of every crossbar MAC of a map, for one crossbar.

    A calibration without ranges (``adc`` empty) may hold a spec with an ideal ADC or ``adc_range='full'``:
    it records the crossbar only, as ``quantize(..., cim=spec)`` stores it for such a spec, so that
    ``simulate(mapname, inputs, cim=True)`` runs the map's crossbar.

    Attributes:
        spec: The crossbar (``adc_bits`` set, ``adc_range='calibrated'``, when ``adc`` holds ranges).
        adc: Node name -> the MAC's :class:`~maptools.quantization.cim.adc.AdcCalibration`.
        method: How the ranges were chosen (``'mse'`` or ``'percentile'``).
        batches: Calibration batches run.
        fingerprint: The :attr:`~maptools.quantization.reference.core.ReferenceExecutor.fingerprint` of the
            executor calibrated ("" when unknown: not checked).
    """

    spec: CIMSpec
    adc: dict[str, AdcCalibration]
    method: str = "mse"
    batches: int = 0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.spec, CIMSpec):
            raise InvalidTypeError(f"MapCalibration.spec: got {type(self.spec).__name__}, expected a CIMSpec")
        if self.adc or (self.spec.adc_bits is not None and self.spec.adc_range == "calibrated"):
            if self.spec.adc_bits is None:
                raise InvalidArgumentError("MapCalibration.spec: adc_bits is None (an ideal ADC has no range)")
            if self.spec.adc_range != "calibrated":
                object.__setattr__(self, "spec", self.spec.replace(adc_range="calibrated"))
        for node, adc in self.adc.items():
            if not isinstance(adc, AdcCalibration):
                raise InvalidTypeError(f"MapCalibration.adc[{node!r}]: got {type(adc).__name__}, expected an "
                                       "AdcCalibration")

    def __eq__(self, other: object) -> bool:
        """Equal when every field and every range is equal (compared as their JSON form)."""
        return isinstance(other, MapCalibration) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    @property
    def clipped(self) -> dict[str, float]:
        """Node name -> the fraction of its calibration partial sums above their ADC range."""
        return {node: float((adc.clipped * adc.samples).sum() / max(1, adc.samples.sum()))
                for node, adc in self.adc.items()}

    # -- serialization (JSON, no pickle) -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {"format": CIM_FORMAT, "spec": self.spec.to_dict(), "method": self.method, "batches": self.batches,
                "fingerprint": self.fingerprint, "adc": {node: adc.to_dict() for node, adc in self.adc.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MapCalibration:
        """The calibration of :meth:`to_dict`'s form.

        Raises:
            ArtifactError: Another format, a missing key or malformed values.
        """
        try:
            if int(data.get("format", 0)) != CIM_FORMAT:
                raise ArtifactError(f"CIM calibration: format {data.get('format')!r}, expected {CIM_FORMAT}")
            adc = {str(node): AdcCalibration.from_dict(entry) for node, entry in dict(data["adc"]).items()}
            return cls(spec=CIMSpec.from_dict(dict(data["spec"])), adc=adc, method=str(data.get("method", "mse")),
                       batches=int(data.get("batches", 0)), fingerprint=str(data.get("fingerprint", "")))
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, InvalidArgumentError) as exc:
            raise ArtifactError(f"CIM calibration: malformed data ({exc})") from exc

    def to_json(self) -> bytes:
        """The JSON bytes of :data:`CIM_FILE` (sorted keys: equal calibrations give equal bytes)."""
        return (json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, what: str = "CIM calibration") -> MapCalibration:
        """The calibration of :meth:`to_json`'s bytes.

        Raises:
            ArtifactError: Not JSON, or malformed.
        """
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise ArtifactError(f"{what}: not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ArtifactError(f"{what}: expected a JSON object")
        return cls.from_dict(parsed)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON to ``path`` (atomically); returns the path."""
        path = Path(path)
        _atomic_write(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MapCalibration:
        """Read :meth:`save`'s file.

        Raises:
            ArtifactError: The file is unreadable or malformed.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read the CIM calibration ({exc})") from None
        return cls.from_json(data, str(path))


class MapHistograms:
    """The partial-sum histograms of every crossbar MAC of a map, from which ranges for any ADC width follow.

    The partial sums depend on ``rows``, ``cell_bits``, ``dac_bits`` and ``weight_encoding``, not on
    ``adc_bits``: one pass over the calibration data (:func:`collect_histograms`) serves every ADC width.

    Attributes:
        spec: The crossbar the partial sums were collected for.
        histograms: Node name -> its :class:`~maptools.quantization.cim.calibrate.AdcHistogram`.
        batches: Calibration batches run.
        fingerprint: The executor's fingerprint.
    """

    def __init__(self, spec: CIMSpec, histograms: dict[str, AdcHistogram], batches: int, fingerprint: str) -> None:
        self.spec = spec
        self.histograms = histograms
        self.batches = batches
        self.fingerprint = fingerprint

    def calibration(self, adc_bits: int | None = None, *, method: str = "mse",
                    percentile: float = 99.99) -> MapCalibration:
        """The ranges of every MAC for an ADC of ``adc_bits`` (None: the spec's).

        Raises:
            InvalidArgumentError: No ADC width, an unknown method or a bad percentile.
        """
        spec = self.spec if adc_bits is None else self.spec.replace(adc_bits=adc_bits)
        if spec.adc_bits is None:
            raise InvalidArgumentError("spec.adc_bits: None (an ideal ADC has no range to calibrate)")
        adc = {node: hist.calibration(spec.adc_bits, method=method, percentile=percentile)
               for node, hist in self.histograms.items()}
        return MapCalibration(spec=spec.replace(adc_range="calibrated"), adc=adc, method=method,
                              batches=self.batches, fingerprint=self.fingerprint)


def _executor(source: MapSource, mapsave_dir: str | os.PathLike | None) -> ReferenceExecutor:
    if isinstance(source, ReferenceExecutor):
        return source
    if isinstance(source, str):
        return ReferenceExecutor.load(source, mapsave_dir)
    raise InvalidTypeError(f"map: got {type(source).__name__}, expected a map name or a ReferenceExecutor")


def _batches(calibset: Any) -> Iterator[Any]:
    """The batches of a calibration set: a batch (dict or array) or an iterable of them."""
    if isinstance(calibset, (Mapping, np.ndarray)) or hasattr(calibset, "detach"):
        yield calibset
        return
    if isinstance(calibset, (str, bytes)) or not isinstance(calibset, Iterable):
        raise InvalidTypeError(f"calibset: got {type(calibset).__name__}, expected a batch (dict input name -> "
                               "array, or an array) or an iterable of batches")
    yield from calibset


def collect_histograms(source: MapSource, calibset: Any, spec: CIMSpec, *,
                       mapsave_dir: str | os.PathLike | None = None) -> MapHistograms:
    """Run the exact integer executor on ``calibset`` and histogram every crossbar MAC's partial sums.

    Args:
        source: A map name, or a :class:`~maptools.quantization.reference.core.ReferenceExecutor` (e.g.
            built from in-memory artifacts ``ReferenceExecutor(model, quantinfo, quantparams)``).
        calibset: A batch (dict input name -> array, or an array for a single-input map) or an iterable
            of batches (numpy arrays or torch tensors).
        spec: The crossbar (its ``adc_bits``, ``adc_range`` and ``requant`` are not used).
        mapsave_dir: The mapsave directory of a map name.

    Returns:
        The histograms, one per crossbar MAC.

    Raises:
        InvalidArgumentError: No batch, a map without crossbar MACs, or inputs the map does not take.
        InvalidTypeError: ``spec`` is not a CIMSpec or ``calibset`` is not batches.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    executor = _executor(source, mapsave_dir)
    histograms: dict[str, AdcHistogram] = {}

    def hook(operands: MacOperands, weights: np.ndarray, columns: np.ndarray) -> None:
        histogram = histograms.get(operands.node)
        if histogram is None:
            histogram = histograms[operands.node] = AdcHistogram(weights, spec=spec, **operands.kwargs())
        histogram.add(columns)

    hooked = executor.with_cim(None, mac_hook=hook)
    if not hooked.crossbar_nodes:
        raise InvalidArgumentError("map: has no MAC with a constant, quantized weight (nothing runs on crossbars)")
    batches = 0
    for batch in _batches(calibset):
        hooked.run(batch)
        batches += 1
    if batches == 0:
        raise InvalidArgumentError("calibset: holds no batch; expected at least one batch of the map's inputs")
    logger.info("collected the partial sums of %d crossbar MACs on %d batches (%s)", len(histograms), batches,
                spec)
    return MapHistograms(spec, histograms, batches, executor.fingerprint)


def calibrate_map(source: MapSource, calibset: Any, spec: CIMSpec, *, mapsave_dir: str | os.PathLike | None = None,
                  method: str = "mse", percentile: float = 99.99) -> MapCalibration:
    """Calibrate the ADC ranges of every crossbar MAC of a map on calibration data.

    Runs the exact integer executor on ``calibset``; the partial sums of each MAC's columns (before any
    ADC) are histogrammed per (row tile, weight slice, input plane) and each range chosen as
    :func:`~maptools.quantization.cim.calibrate.calibrate_adc` does.

    Args:
        source: A map name, or a :class:`~maptools.quantization.reference.core.ReferenceExecutor` built from
            in-memory artifacts.
        calibset: A batch or an iterable of batches (see :func:`collect_histograms`).
        spec: The crossbar; ``adc_bits`` must be set (``adc_range`` is stored as ``'calibrated'``).
        mapsave_dir: The mapsave directory of a map name.
        method: ``'mse'`` or ``'percentile'``.
        percentile: The percentile of ``method='percentile'``, in ``(0, 100]``.

    Returns:
        The per-node calibrations with the spec, ready for ``simulate(..., cim=calibration.spec,
        adc=calibration)``, :meth:`MapCalibration.save` or :func:`write_map_calibration`.

    Raises:
        MapNotFoundError: no such map.
        InvalidArgumentError: An ideal ADC, an unknown method, a bad percentile, no batch, or inputs the map
            does not take.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    if spec.adc_bits is None:
        raise InvalidArgumentError("spec.adc_bits: None (an ideal ADC has no range to calibrate)")
    if method not in CALIBRATION_METHODS:
        raise InvalidArgumentError(f"method: got {method!r}, expected one of {', '.join(CALIBRATION_METHODS)}")
    if not 0 < percentile <= 100:
        raise InvalidArgumentError(f"percentile: got {percentile!r}, expected a number in (0, 100]")
    return collect_histograms(source, calibset, spec, mapsave_dir=mapsave_dir).calibration(
        method=method, percentile=percentile)


def map_weight_slices(source: MapSource, spec: CIMSpec, *,
                      mapsave_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The cell digits of every crossbar MAC's weights, as the mapper programs them.

    Args:
        source: A map name or a :class:`~maptools.quantization.reference.core.ReferenceExecutor`.
        spec: The crossbar (``cell_bits`` and ``weight_encoding`` are used).
        mapsave_dir: The mapsave directory of a map name.

    Returns:
        ``{<node>_conv_weight_slices | <node>_gemm_weight_slices: uint8 digits}`` (the quantparams key of the
        weight with ``_slices`` appended, :func:`~maptools.quantization.format.weight_slices_key`), each
        ``(signs, S, *weight.shape)`` in the ONNX layout of the weight
        (:func:`~maptools.quantization.cim.mapping.slice_weights`; place them on arrays with
        :func:`~maptools.quantization.cim.mapping.tile_layout`).

    Raises:
        MapNotFoundError: no such map.
        InvalidArgumentError: a weight outside its record's range.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    executor = _executor(source, mapsave_dir)
    slices = {}
    for node, operands in executor.crossbar_operands():
        weight = executor.mac_weights(node).weight
        slices[weight_slices_key(node.name, node.op_type)] = slice_weights(weight, operands.weight_bits, spec,
                                                                          weight_min=operands.weight_min)
    return slices


# -- storage in the map ------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder, renamed over it once complete."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_map_calibration(mapname: str, calibration: MapCalibration, *, mapsave_dir: str | os.PathLike | None = None,
                          lock_timeout: float | None = None) -> Path:
    """Store a calibration in its map as :data:`CIM_FILE` and list it in ``manifest.json``.

    Under the map's writer lock (the one ``quantize`` holds to swap a map): the map is loaded and its
    fingerprint compared with the calibration's, ``cim.json`` is written atomically, then the manifest is
    rewritten atomically with the file's SHA-256 and size (every other entry unchanged). An earlier
    ``cim.json`` is replaced.

    Args:
        mapname: The map.
        calibration: A calibration made on this map (:func:`calibrate_map`).
        mapsave_dir: The mapsave directory.
        lock_timeout: Seconds to wait for another writer; None for the artifacts' default.

    Returns:
        The path of ``cim.json``.

    Raises:
        MapNotFoundError: no such map.
        MapBusyError: another writer held the map's lock for ``lock_timeout`` seconds.
        InvalidArgumentError: the calibration was made on another map.
        ArtifactError: the map's files are modified or unreadable.
    """
    if not isinstance(calibration, MapCalibration):
        raise InvalidTypeError(f"calibration: got {type(calibration).__name__}, expected a MapCalibration")
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    timeout = mapdir.LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    with mapdir.map_lock(directory, timeout):
        fingerprint = ReferenceExecutor.load(mapname, mapsave_dir).fingerprint
        if calibration.fingerprint and calibration.fingerprint != fingerprint:
            raise InvalidArgumentError(f"calibration: made on another map than {mapname!r} (its crossbar weights or "
                                       "operands differ); calibrate this map")
        data = calibration.to_json()
        manifest = artifacts.read_manifest(directory)
        _atomic_write(directory / CIM_FILE, data)
        manifest.setdefault("files", {})[CIM_FILE] = {"sha256": artifacts.sha256_of(data), "bytes": len(data)}
        _atomic_write(directory / artifacts.MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    logger.info("wrote the CIM calibration (%s) of map %r to %s", calibration.spec, mapname, directory / CIM_FILE)
    return directory / CIM_FILE


def has_map_calibration(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> bool:
    """Whether the map's manifest lists a :data:`CIM_FILE`."""
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    return CIM_FILE in artifacts.read_manifest(directory).get("files", {})


def read_map_calibration(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> MapCalibration:
    """The calibration stored in a map by :func:`write_map_calibration` (checked against the manifest).

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: the map has no ``cim.json``, or it is modified or malformed.
    """
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    with mapdir.map_lock(directory, mapdir.READ_WAIT, shared=True):
        if CIM_FILE not in artifacts.read_manifest(directory).get("files", {}):
            raise ArtifactError(
                f"map {mapname!r} has no CIM calibration ({CIM_FILE}); make one with "
                "maptools.quantization.cim.calibrate_map and store it with write_map_calibration, or pass a CIMSpec "
                "(and adc=) instead of cim=True")
        data = artifacts.read_artifact_bytes(mapname, CIM_FILE, mapsave_dir)
    return MapCalibration.from_json(data, f"{directory / CIM_FILE}")

