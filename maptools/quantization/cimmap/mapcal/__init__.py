"""A whole map on crossbars: the ADC calibration of every MAC, its storage, and the weight slices.

:func:`calibrate_map` runs the integer reference executor (exact MACs) on calibration batches, collects
the column partial sums of every crossbar MAC at the accumulate step (a hook that sees the im2col columns
and changes no result, see :mod:`~maptools.quantization.reference.crossbar`) and chooses each MAC's ADC
ranges with :func:`~maptools.quantization.cim.calibrate.calibrate_adc`'s method. The ranges are calibrated on
the exact executor's activations, the ones the quantization was calibrated on, not on those of a chip
whose earlier layers already carry ADC errors. With ``device=`` (and ``seed=``) the activations stay exact
but each MAC's partial sums are read from a simulated chip's programmed, noisy cells, so the ranges fit the
noisy sums (:doc:`/cim`, "Noise-aware ADC calibration").

.. code-block:: python
   :class: needs-files

    from maptools.examples import digits
    from maptools.quantization import simulate
    from maptools.quantization.cim import CIMSpec
    from maptools.quantization.cimmap import calibrate_map, write_map_calibration

    images, _ = digits.load_split("train")
    spec = CIMSpec.parse("rows=128,cell_bits=2,adc_bits=5,adc_range=calibrated")
    calibration = calibrate_map("digits_w4a4", [images[i:i + 64] for i in range(0, 512, 64)], spec)
    logits = simulate("digits_w4a4", images[:16], cim=spec, adc=calibration)["logits"]   # in memory
    calibration.save("digits_w4a4_adc5.json")          # a JSON file of your choosing, or:
    write_map_calibration("digits_w4a4", calibration)  # the map's cim.json, listed in its manifest
    logits = simulate("digits_w4a4", images[:16], cim=True)["logits"]                    # from cim.json

Where a calibration lives
-------------------------

A :class:`~maptools.quantization.cim.mapcalibration.MapCalibration` is plain data, held in memory
(``simulate(..., cim=spec, adc=calibration)``), saved to and loaded from a JSON file the caller chooses
(:meth:`~maptools.quantization.cim.mapcalibration.MapCalibration.save`,
:meth:`~maptools.quantization.cim.mapcalibration.MapCalibration.load`), or stored in the map itself as
:data:`~maptools.quantization.format.CIM_FILE` (``cim.json``) by :func:`write_map_calibration`: the file is
written atomically (a temporary file renamed over it) and ``manifest.json`` is rewritten atomically with its
SHA-256, both under the map's writer lock, so every file of the map stays listed with its hash.
:func:`~maptools.quantization.cim.mapcalibration.read_map_calibration` reads it back under the reader's shared
lock and checks the hash. A map holds one calibration (a new one replaces it); quantizing the map again
replaces the whole directory and so drops it. No pickle is involved anywhere.

A calibration records the :attr:`~maptools.quantization.reference.executor.ReferenceExecutor.fingerprint` of
the crossbars it was made for (every MAC's operands and integer weights), and an executor of another map
refuses it. It is made from a :class:`~maptools.quantization.reference.executor.ReferenceExecutor` as well as
from a map name, so it can be computed from in-memory artifacts before a map is written; a caller that
writes a map can add ``calibration.to_json()`` to its files as :data:`~maptools.quantization.format.CIM_FILE`.

The spec stored is the one given with ``adc_range='calibrated'``; the ranges depend on ``rows``,
``cell_bits``, ``dac_bits``, ``adc_bits`` and ``weight_encoding``, not on ``cols`` or ``requant``.
"""

from __future__ import annotations

from maptools.quantization.cimmap.mapcal.histograms import MapHistograms, calibrate_map, collect_histograms
from maptools.quantization.cimmap.mapcal.histograms import MapSource as MapSource
from maptools.quantization.cimmap.mapcal.slices import map_weight_slices
from maptools.quantization.cimmap.mapcal.write import write_map_calibration

__all__ = [
    "MapHistograms",
    "calibrate_map",
    "collect_histograms",
    "map_weight_slices",
    "write_map_calibration",
]
