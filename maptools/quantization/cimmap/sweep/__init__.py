"""How a map fares on a grid of crossbars: :func:`cim_sweep` and ``maptools cim-sweep``.

For every crossbar of the grid ``adc_bits x rows x cell_bits`` (with one ``dac_bits`` and weight encoding),
the map runs in the CIM mode of the integer reference executor (:mod:`maptools.quantization.reference.crossbar`)
twice, with full-range ADCs (``adc_range='full'``) and with ADC ranges calibrated on calibration data
(:func:`~maptools.quantization.cimmap.mapcal.calibrate_map`), and its outputs are compared with

* the **exact integer executor** (the same map with exact MACs): top-1 agreement for class-score outputs
  ``[N, C]``, SNR in dB and the fraction of output elements that are identical ("= int");
* **FP32**: the float model the map's manifest records (checked against its SHA-256), run by onnxruntime:
  top-1 agreement and SNR;
* the **labels**, when given (Python only): top-1 accuracy of the first class-score output.

Everything comes from the map's artifacts; nothing is re-quantized. The partial sums, and so the histograms
the ranges are chosen from, do not depend on ``adc_bits``: the calibration data runs once per
``(rows, cell_bits)`` and gives the ranges of every ADC width.

Data: the evaluation inputs are ``inputs`` (``--inputs DIR``), else ``batches`` random standard-normal
batches of the map's input shapes (seed ``seed``). The calibration data is ``calib`` (``--calib DIR``), else
the evaluation inputs themselves when they were given (in-sample, as the result's ``calibration_data``
says), else other random batches (seed ``seed + 1``, held out).

Device axes (``device``, ``prog_error``, ``drift_time``, ``chips``): every grid point then runs on ``chips``
simulated chips of every device (:mod:`~maptools.quantization.cim.device`), chip ``i`` seeded
``child_seed(seed, i)``, and reports each metric's mean over the chips with every chip's value
(:meth:`SweepPoint.spread`: mean, std, worst); the ADC ranges are still calibrated on exact cells.

The grid points run in parallel over a :class:`concurrent.futures.ProcessPoolExecutor` (``jobs`` worker
processes, default ``os.cpu_count()``; each with one BLAS thread); ``jobs=1`` runs in this process.

.. code-block:: python
   :class: needs-files

    from maptools.examples import digits
    from maptools.quantization.cimmap import cim_sweep

    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    result = cim_sweep("digits_w4a4", [test], calib=[train], labels=labels, adc_bits=range(3, 11),
                       rows=(64, 128, 256), cell_bits=(1, 2))
    print(result.table())
    result.save("sweep.json")
    result.plot("sweep.png")
"""

from __future__ import annotations

from maptools.quantization.cimmap.sweep.command import run_cli
from maptools.quantization.cimmap.sweep.grid import DEFAULT_BATCHES as DEFAULT_BATCHES
from maptools.quantization.cimmap.sweep.grid import cim_sweep, parse_int_list
from maptools.quantization.cimmap.sweep.result import ADC_RANGE_KINDS, SweepPoint, SweepResult

__all__ = ["ADC_RANGE_KINDS", "SweepPoint", "SweepResult", "cim_sweep", "parse_int_list", "run_cli"]
