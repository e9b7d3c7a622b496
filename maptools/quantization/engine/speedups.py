"""Faster PPQ calibration, with results identical to PPQ's own to the bit, and nothing in PPQ changed.

:class:`FastCalibrationPass` is PPQ's runtime calibration pass, which the quantizer builds in its place:
during the pass each weight holds its fake-quantized value, computed once (:func:`weights_baked`), instead
of being re-quantized on every forward; its percentile observers take their order statistics from
``torch.topk`` (:class:`TopkPercentileObserver`) and its MSE observers score candidate ranges in numpy
(:func:`vectorized_mse_loss`). Those observers are maptools' instances in the pass's own hooks; PPQ's
observer table and classes are never touched. What each speed-up saves is on :ref:`bench-recipes`.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Collection, Iterator

import numpy as np
import torch

from maptools.quantization.engine.facade import (
    PPQ_CONFIG,
    BaseGraph,
    PPQuantFunction,
    QuantableOperation,
    QuantizationProperty,
    QuantizationStates,
    RuntimeCalibrationPass,
    TorchMSEObserver,
    TorchPercentileObserver,
)

__all__ = ["FAST_OBSERVERS", "FastCalibrationPass", "TopkPercentileObserver", "install_fast_observers",
           "vectorized_mse_loss", "weights_baked"]


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

    PPQ loops over the histogram bins in Python; here the per-bin errors are numpy arrays built with the same
    integer and float64 operations, summed sequentially (``np.add.accumulate``, not numpy's pairwise ``sum``):
    the same additions in the same order, so the same loss to the last bit. :func:`install_fast_observers`
    binds it to maptools' own MSE observer instances.
    """
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


#: PPQ observer class -> maptools' faster, equivalent subclass.
FAST_OBSERVERS = {TorchPercentileObserver: TopkPercentileObserver}


def install_fast_observers(observer_table: dict) -> int:
    """Swap the observers of one PPQ calibration hook (config -> observer) for maptools' faster ones, in place.

    A percentile observer becomes a :class:`TopkPercentileObserver`; an MSE observer keeps its type (PPQ's pass
    tests it exactly) and scores candidates with :func:`vectorized_mse_loss`, bound to that instance only.
    Returns how many observers were changed.
    """
    changed = 0
    for config, observer in observer_table.items():
        fast = FAST_OBSERVERS.get(type(observer))
        if fast is not None:
            observer_table[config] = fast(watch_on=observer._watch_on, quant_cfg=observer._quant_cfg)
            changed += 1
        elif (type(observer) is TorchMSEObserver and not PPQ_CONFIG.USING_CUDA_KERNEL
              and "compute_mse_loss" not in vars(observer)):
            observer.compute_mse_loss = types.MethodType(vectorized_mse_loss, observer)
            changed += 1
    return changed


class FastCalibrationPass(RuntimeCalibrationPass):
    """PPQ's runtime calibration with the weights baked during the pass and maptools' faster observers."""

    def optimize(self, graph: BaseGraph, **kwargs) -> None:  # noqa: D102 - PPQ's signature
        delegates = getattr(kwargs.get("executor"), "_delegates", None) or {}
        with weights_baked(graph, skip=set(delegates)):
            super().optimize(graph=graph, **kwargs)

    def calibrate(self, desc: str, dataloader, executor, hooks: dict, output_names=None) -> None:  # noqa: D102
        for observer in self._observers.values():
            install_fast_observers(observer._hook._observer_table)
        super().calibrate(desc=desc, dataloader=dataloader, executor=executor, hooks=hooks, output_names=output_names)
