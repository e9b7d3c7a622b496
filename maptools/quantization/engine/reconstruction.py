"""Block reconstruction with learned weight rounding: the ``best`` recipe's optimization (AdaRound / BRECQ /
QDrop style), written on PPQ's executor.

Rounding every weight to the nearest integer is what breaks networks at 4-bit weights: on an ImageNet
EfficientNet-Lite1 each layer's 4-bit weights alone keep about 20 dB of SNR, and 65 of them in a row leave
nothing of the logits. AdaRound (Nagel et al., 2020) learns, for every weight, whether to round down or up so
that the layer's *output* stays close to FP32; BRECQ (Li et al., 2021) does it for blocks of layers at once;
QDrop (Wei et al., 2022) randomly keeps some activations in float while doing so, which makes the learned
rounding hold up once every activation is quantized. :class:`BlockReconstructionPass` does this:

* the graph is cut into blocks of a few operators around each computing operator (PPQ's block builder); for
  each block, the quantized inputs (from the quantized graph) and the FP32 outputs (from the FP32 graph) of
  every calibration batch are cached;
* every weight of the block becomes ``scale * clip(floor(w / scale) + h(v), qmin, qmax)`` with a learned
  ``h(v) = clip(sigmoid(v) * 1.2 - 0.1, 0, 1)`` (:class:`LearnedRounding`), started at the fraction of
  ``w / scale`` (the nearest rounding's value);
* Adam trains the ``v`` on the reconstruction error of the block's outputs (squared error summed over each
  sample's features, averaged over the batch) plus ``rounding_weight`` times AdaRound's regularizer
  ``sum(1 - |2h - 1|^beta)``, ``beta`` annealed from 20 to 2 after a warm-up, which pushes each ``h`` to 0
  or 1; activations inside the block are quantized, except a random half of their elements each step
  (:class:`DroppedActivation`);
* then every weight is rounded by the sign of ``v`` (down or up, nothing else changes: the scales, the
  integer range and so the artifacts' format stay as calibrated) and the block keeps whichever of the
  learned and the nearest rounding reconstructs its outputs better.

The integers that end up in ``quantparams.pkl`` are ``floor(w / scale) + {0, 1}``: the same format, just
chosen better, and bit-true in PPQ's simulation, ``quant_model.onnx`` and the integer executor, since the
weight is stored as ``scale * integer`` before PPQ bakes it.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch

from maptools.quantization.engine.quiet import import_ppq

import_ppq()

from ppq.core import QuantizationProperty, QuantizationStates, TensorQuantizationConfig  # noqa: E402
from ppq.executor import TorchExecutor, TorchQuantizeDelegator  # noqa: E402
from ppq.IR import BaseGraph, QuantableOperation, Variable  # noqa: E402
from ppq.quantization.optim.training import LearnedStepSizePass  # noqa: E402
from ppq.quantization.qfunction import PPQuantFunction  # noqa: E402

__all__ = ["BlockReconstructionPass", "DroppedActivation", "LearnedRounding"]

logger = logging.getLogger(__name__)

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly


class LearnedRounding(TorchQuantizeDelegator):
    """A weight ``scale * clip(floor(w / scale) + h(v), qmin, qmax)`` with a learned rounding ``h(v)`` in [0, 1].

    Args:
        var: The weight variable (its float value is kept for :meth:`withdraw`).
        config: Its quantization config (symmetric, per channel or per tensor, zero offset).
    """

    def __init__(self, var: Variable, config: TensorQuantizationConfig) -> None:
        self.var, self.config = var, config
        self.original = var.value.detach().clone()
        weight = self.original.to(torch.float32)
        scale = config.scale.detach().to(weight.dtype)
        if config.policy.has_property(QuantizationProperty.PER_CHANNEL):
            scale = scale.view([-1 if axis == config.channel_axis else 1 for axis in range(weight.ndim)])
        self.scale = scale
        self.floor = torch.floor(weight / scale)
        fraction = (weight / scale - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = (-torch.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1)).requires_grad_(True)

    def soft(self) -> torch.Tensor:
        """The rounding ``h(v)`` in [0, 1]."""
        return ((_ZETA - _GAMMA) * torch.sigmoid(self.v) + _GAMMA).clamp(0.0, 1.0)

    def _value(self, rounding: torch.Tensor) -> torch.Tensor:
        integer = torch.clamp(self.floor + rounding, self.config.quant_min, self.config.quant_max)
        return integer * self.scale

    def __call__(self, tensor: torch.Tensor, config: TensorQuantizationConfig) -> torch.Tensor:  # noqa: ARG002
        return self._value(self.soft())

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2h - 1|^beta)``: 0 when every ``h`` is 0 or 1."""
        return (1.0 - (2.0 * self.soft() - 1.0).abs().pow(beta)).sum()

    def harden(self) -> None:
        """Store ``scale * integer`` with each weight rounded down or up by the sign of ``v``."""
        with torch.no_grad():
            self.var.value = self._value((self.v >= 0).to(self.floor.dtype)).to(self.original.dtype)

    def withdraw(self) -> None:
        """Put the float weight back (it is then rounded to nearest as usual)."""
        self.var.value = self.original.clone()

    def trainable_tensors(self) -> list[torch.Tensor]:
        """The rounding variables."""
        return [self.v]

    def finalize(self) -> None:
        """Nothing to do: :meth:`harden` or :meth:`withdraw` decided already."""


class DroppedActivation(TorchQuantizeDelegator):
    """QDrop: an activation quantized as calibrated, except a random share of its elements kept in float.

    Args:
        drop: The share of elements kept in float (0 quantizes everything).
        generator: The random generator (seeded by the pass, so the result is reproducible).
    """

    def __init__(self, drop: float, generator: torch.Generator) -> None:
        self.drop, self.generator = drop, generator

    def __call__(self, tensor: torch.Tensor, config: TensorQuantizationConfig) -> torch.Tensor:
        quantized = PPQuantFunction(tensor, config)
        if self.drop <= 0.0:
            return quantized
        keep = torch.rand(tensor.shape, generator=self.generator, device="cpu").to(tensor.device) < self.drop
        return torch.where(keep, tensor, quantized)

    def trainable_tensors(self) -> list[torch.Tensor]:
        """None: the activation scales stay as calibrated."""
        return []

    def withdraw(self) -> None:
        """Nothing to undo."""

    def finalize(self) -> None:
        """Nothing to store."""


class BlockReconstructionPass(LearnedStepSizePass):
    """Learned weight rounding, block by block (see the module documentation).

    It takes the place of PPQ's ``AdaroundPass`` in the pipeline (``setting.blockwise_reconstruction``);
    the settings come from the class attributes, which :class:`~maptools.quantization.engine.quantizer.
    LowBitQuantizer` sets from the recipe before the pipeline runs.
    """

    #: Training steps per block.
    steps = 400
    #: Adam's learning rate for the rounding variables (AdaRound's).
    lr = 1e-3
    #: Cached samples per training step.
    batch = 8
    #: Operators per block (PPQ's block builder).
    block_size = 4
    #: Weight of the rounding regularizer against the reconstruction error.
    rounding_weight = 0.01
    #: Share of the steps before the regularizer starts (AdaRound's warm-up).
    warmup = 0.2
    #: QDrop's share of activation elements kept in float while training.
    drop = 0.5
    #: Seed of the batch order and of QDrop's masks.
    seed = 0
    #: Where the cached block inputs and outputs live.
    collecting_device = "cpu"

    def __init__(self, *args, **kwargs) -> None:  # PPQ builds it with AdaroundPass's arguments; ours are above
        super().__init__(name="maptools block reconstruction")

    def optimize(self, graph: BaseGraph, dataloader, executor: TorchExecutor, collate_fn, **kwargs) -> None:
        """Reconstruct every block of ``graph`` on ``dataloader`` (the calibration batches)."""
        blocks = self.split_graph_into_blocks(graph=graph, executing_order=executor._executing_order,
                                              blocksize=self.block_size, interested_layers=[])
        started = time.perf_counter()
        rng = random.Random(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        kept = 0
        for index, block in enumerate(blocks):
            qt_inputs, fp_outputs = self.collect(graph=graph, block=block, executor=executor, dataloader=dataloader,
                                                 collate_fn=collate_fn, collecting_device=self.collecting_device)
            before, after = self._reconstruct(block, executor, qt_inputs, fp_outputs, rng, generator)
            kept += after < before
            logger.info("block %d/%d (%s -> %s): reconstruction error %.4g -> %.4g, %.0f s so far", index + 1,
                        len(blocks), block.sp.name, block.ep.name, before, min(before, after),
                        time.perf_counter() - started)
        logger.info("block reconstruction: learned rounding kept in %d of %d blocks, %.0f s", kept, len(blocks),
                    time.perf_counter() - started)

    def _block_error(self, block, executor: TorchExecutor, qt_inputs, fp_outputs) -> float:
        """Squared error of the block's outputs, summed per sample, averaged over the cached samples."""
        names = [var.name for var in block.ep.outputs]
        total = 0.0
        with torch.no_grad():
            for qt_input, fp_output in zip(qt_inputs, fp_outputs, strict=True):
                outputs = executor.partial_graph_forward(operations=block.rps, feed_dict=dict(qt_input),
                                                         output_names=names)
                for name, output in zip(names, outputs, strict=True):
                    total += float(((output - fp_output[name]) ** 2).sum()) / max(output.shape[0], 1)
        return total / max(len(qt_inputs), 1)

    def _reconstruct(self, block, executor: TorchExecutor, qt_inputs, fp_outputs, rng: random.Random,
                     generator: torch.Generator) -> tuple[float, float]:
        weights: dict[TensorQuantizationConfig, LearnedRounding] = {}
        activations: dict[TensorQuantizationConfig, DroppedActivation] = {}
        for op in block.rps:
            if not isinstance(op, QuantableOperation):
                continue
            for config, var in op.config_with_variable:
                if config.state != QuantizationStates.ACTIVATED:
                    continue
                if var.is_parameter and op.is_computing_op and var is op.inputs[1]:
                    weights[config] = LearnedRounding(var, config)
                elif not var.is_parameter:
                    activations[config] = DroppedActivation(self.drop, generator)
        if not weights:
            return 0.0, 0.0
        before = self._block_error(block, executor, qt_inputs, fp_outputs)
        delegators = {**activations, **weights}
        for config, delegator in delegators.items():
            executor.register_quantize_delegate(config=config, delegator=delegator)
        try:
            self._train(block, executor, qt_inputs, fp_outputs, list(weights.values()), rng)
        finally:
            for config in activations:
                executor.remove_quantize_delegate(config=config)
            for config, rounding in weights.items():
                executor.remove_quantize_delegate(config=config)
                rounding.harden()
        after = self._block_error(block, executor, qt_inputs, fp_outputs)
        if after > before:  # the nearest rounding was better for this block
            for rounding in weights.values():
                rounding.withdraw()
        return before, after

    @staticmethod
    def _batchable(block, executor: TorchExecutor, qt_inputs, names: list[str]) -> bool:
        """Whether cached samples can be run together (a Reshape to a constant batch of 1 cannot)."""
        if len(qt_inputs) < 2:
            return False
        feed = {name: torch.cat([qt_inputs[0][name], qt_inputs[1][name]]) for name in qt_inputs[0]}
        single = qt_inputs[0][next(iter(qt_inputs[0]))].shape[0]
        try:
            with torch.no_grad():
                outputs = executor.partial_graph_forward(operations=block.rps, feed_dict=feed, output_names=names)
        except Exception:  # noqa: BLE001 - any failure means: run the samples one by one
            return False
        return all(out.shape[0] == 2 * single for out in outputs)

    def _train(self, block, executor: TorchExecutor, qt_inputs, fp_outputs, weights: list[LearnedRounding],
               rng: random.Random) -> None:
        names = [var.name for var in block.ep.outputs]
        optimizer = torch.optim.Adam([t for w in weights for t in w.trainable_tensors()], lr=self.lr)
        start = int(self.warmup * self.steps)
        order = list(range(len(qt_inputs)))
        together = self._batchable(block, executor, qt_inputs, names)
        for step in range(self.steps):
            picked = rng.sample(order, min(self.batch, len(order)))
            groups = [picked] if together else [[i] for i in picked]
            optimizer.zero_grad()
            loss = 0.0
            for group in groups:
                feed = {name: torch.cat([qt_inputs[i][name] for i in group]) for name in qt_inputs[group[0]]}
                outputs = executor.partial_graph_forward(operations=block.rps, feed_dict=feed, output_names=names)
                for name, out in zip(names, outputs, strict=True):
                    target = torch.cat([fp_outputs[i][name] for i in group])
                    loss = loss + ((out - target) ** 2).sum() / len(picked)
            if step >= start:
                progress = (step - start) / max(self.steps - start, 1)
                beta = 2.0 + 0.5 * (20.0 - 2.0) * (1.0 + math.cos(math.pi * progress))
                loss = loss + self.rounding_weight * sum(w.regularizer(beta) for w in weights)
            loss.backward()
            optimizer.step()
