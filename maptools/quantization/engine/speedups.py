"""Faster PPQ calibration, with results identical to PPQ's own to the bit.

PPQ 0.6.6 spends most of a calibration-only quantization in places that do more work than needed:

* **Weights re-quantized on every forward.** Between parameter calibration and the final parameter baking,
  the executor fake-quantizes every weight on every calibration forward, although weight scales are
  fixed by then. :func:`accelerated_pipeline` wraps PPQ's runtime calibration pass so that, for the
  duration of the pass only, each activated weight is replaced by its fake-quantized value (computed
  once, with the executor's own quantization function) and marked baked; afterwards the float weight and
  its state come back, so every later pass (alignment, LSQ, bias correction, baking) sees what PPQ would
  have given it. The forwards compute on the same values, so the calibration is the same.
* **The percentile observer's ``torch.kthvalue``.** It selects the 0.01% and 99.99% order statistics of
  each activation with two full selections. :class:`TopkPercentileObserver` takes the same two order
  statistics from ``torch.topk`` with k the few elements beyond the percentile: the same values (an order
  statistic does not depend on the algorithm that finds it), several times faster on CPU.
* **The MSE observer's Python loop.** It scores every candidate range with a Python loop over 2048
  histogram bins; :func:`vectorized_mse_loss` computes the same float64 sums with numpy.

All are scoped: :func:`fast_observers` swaps the observer in PPQ's observer table and the MSE scoring
method only while maptools' own quantization runs and puts PPQ's back afterwards, and the pipeline
wrapper is applied to maptools' quantizer instance only. PPQ used directly in the same process is not
affected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator

import numpy as np
import torch

from maptools.quantization.engine.quiet import import_ppq

import_ppq()

from ppq.core import QuantizationProperty, QuantizationStates  # noqa: E402
from ppq.core.config import PPQ_CONFIG  # noqa: E402
from ppq.IR import BaseGraph, QuantableOperation  # noqa: E402
from ppq.quantization.observer import OBSERVER_TABLE  # noqa: E402
from ppq.quantization.observer.range import TorchMSEObserver, TorchPercentileObserver  # noqa: E402
from ppq.quantization.optim import QuantizationOptimizationPass, RuntimeCalibrationPass  # noqa: E402
from ppq.quantization.optim.base import QuantizationOptimizationPipeline  # noqa: E402
from ppq.quantization.qfunction import PPQuantFunction  # noqa: E402

__all__ = ["TopkPercentileObserver", "accelerated_pipeline", "fast_observers", "vectorized_mse_loss",
           "weights_baked"]


@contextlib.contextmanager
def weights_baked(graph: BaseGraph, skip: Collection = ()) -> Iterator[int]:
    """Within the block, every activated parameter holds its fake-quantized value and is marked baked.

    Args:
        graph: The PPQ graph.
        skip: Quantization configs to leave alone (those an executor quantizes with a delegate).

    Yields the number of parameters baked. On exit each of them gets back its original tensor (the same
    object) and its ``ACTIVATED`` state.
    """
    baked = []
    try:
        for op in graph.operations.values():
            if not isinstance(op, QuantableOperation) or op._dequantized:
                continue
            for config, var in op.config_with_variable:
                if (var.is_parameter and config.state == QuantizationStates.ACTIVATED and var.value is not None
                        and config not in skip):
                    original = var.value
                    var.value = PPQuantFunction(original, config)
                    config.state = QuantizationStates.BAKED
                    baked.append((config, var, original))
        yield len(baked)
    finally:
        for config, var, original in baked:
            if config.state == QuantizationStates.BAKED:  # a pass that changed the state keeps its change
                config.state = QuantizationStates.ACTIVATED
            var.value = original


class _BakedWeightsPass(QuantizationOptimizationPass):
    """Run a pass (here: runtime calibration) with the weights baked, see :func:`weights_baked`."""

    def __init__(self, inner: QuantizationOptimizationPass) -> None:
        super().__init__(name=inner.name)
        self.inner = inner

    def optimize(self, graph: BaseGraph, **kwargs) -> None:
        delegates = getattr(kwargs.get("executor"), "_delegates", None) or {}
        with weights_baked(graph, skip=set(delegates)):
            self.inner.optimize(graph=graph, **kwargs)


Builder = Callable[..., QuantizationOptimizationPipeline]


def accelerated_pipeline(build: Builder) -> Builder:
    """Wrap a quantizer's ``build_quant_pipeline``: runtime calibration passes run with baked weights."""

    def build_quant_pipeline(setting, *args, **kwargs) -> QuantizationOptimizationPipeline:
        pipeline = build(setting, *args, **kwargs)
        return QuantizationOptimizationPipeline(
            [_BakedWeightsPass(p) if isinstance(p, RuntimeCalibrationPass) else p for p in pipeline])

    return build_quant_pipeline


class TopkPercentileObserver(TorchPercentileObserver):
    """PPQ's percentile observer with its two ``torch.kthvalue`` calls replaced by ``torch.topk``.

    Per-tensor on the CPU, the k-th smallest element is the last of the k smallest and the k-th (from the
    bottom) largest is the last of the ``numel - k + 1`` largest: the same values as PPQ's, found by two
    partial selections of a few elements. Everything else (other policies, CUDA, rendering) is PPQ's.
    """

    @torch.no_grad()
    def observe(self, value: torch.Tensor):
        config = self._quant_cfg
        if (config.state != QuantizationStates.INITIAL or not isinstance(value, torch.Tensor)
                or value.numel() == 0 or (PPQ_CONFIG.USING_CUDA_KERNEL and value.is_cuda)
                or not config.policy.has_property(QuantizationProperty.PER_TENSOR)):
            return super().observe(value)
        numel = value.numel()
        min_idx, max_idx = int(numel * (1 - self._percentile)), int(numel * self._percentile)
        min_idx = max(0, min_idx) + 1  # 1-based ranks, as PPQ's kthvalue
        max_idx = min(max_idx, numel - 1) + 1
        flat = value.flatten()
        _min = torch.topk(flat, k=min_idx, largest=False, sorted=True)[0][-1].view(1, -1)
        _max = torch.topk(flat, k=numel - max_idx + 1, largest=True, sorted=True)[0][-1].view(1, -1)
        self._percentile_collector.append(torch.cat([_max, _min], dim=-1))


def vectorized_mse_loss(self: TorchMSEObserver, histogram: list, start: int, step: int, end: int) -> float:
    """PPQ's ``TorchMSEObserver.compute_mse_loss`` computed by numpy, to the same float64 value.

    PPQ scores every candidate clipping range by looping over the 2048 histogram bins in Python (thousands of
    candidates per tensor below 8 bits, more when asymmetric). Here the per-bin errors are numpy arrays built
    with the same integer and float64 operations, and the loss is their sequential running sum
    (``np.add.accumulate``, not numpy's pairwise ``sum``): the same additions in the same order, so the same
    loss to the last bit, and the same range chosen. :func:`fast_observers` installs it on PPQ's class for
    the duration of maptools' quantization (PPQ tests the observer's exact type, so it cannot be a subclass).
    """
    if PPQ_CONFIG.USING_CUDA_KERNEL:
        return _PPQ_MSE_LOSS(self, histogram, start, step, end)
    cached = getattr(self, "_maptools_histogram", None)
    if cached is None or cached[0] is not histogram:  # the list is held, so its id is never reused
        bins = np.asarray(histogram, dtype=np.int64)
        cached = (histogram, bins, sum(histogram), np.arange(bins.size, dtype=np.int64))
        self._maptools_histogram = cached
    _, bins, num_of_elements, idx = cached
    l_idx = (idx - start) % step
    r_idx = step - l_idx - 1
    inside = np.where(l_idx == r_idx, l_idx + 0.25, np.minimum(l_idx + 0.5, r_idx + 0.5))
    error = np.where(idx < start, (start - idx - 1) + 0.5, np.where(idx > end, (idx - end) + 0.5, inside))
    terms = (bins * error * error) / num_of_elements
    return float(np.add.accumulate(terms)[-1]) if terms.size else 0.0


_PPQ_MSE_LOSS = TorchMSEObserver.compute_mse_loss


#: PPQ observer name -> maptools' faster, equivalent observer.
FAST_OBSERVERS = {"percentile": TopkPercentileObserver}


@contextlib.contextmanager
def fast_observers() -> Iterator[None]:
    """Within the block, PPQ builds :data:`FAST_OBSERVERS` instead of its own and scores MSE candidates with
    :func:`vectorized_mse_loss`; PPQ's table and method are restored on exit."""
    saved = {name: OBSERVER_TABLE.get(name) for name in FAST_OBSERVERS}
    OBSERVER_TABLE.update(FAST_OBSERVERS)
    TorchMSEObserver.compute_mse_loss = vectorized_mse_loss
    try:
        yield
    finally:
        TorchMSEObserver.compute_mse_loss = _PPQ_MSE_LOSS
        for name, observer in saved.items():
            if observer is None:
                OBSERVER_TABLE.pop(name, None)
            else:
                OBSERVER_TABLE[name] = observer
