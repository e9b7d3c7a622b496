"""Integer reference executor: run a quantized map the way integer hardware would.

:func:`simulate` reads only the files of ``mapsave/<mapname>`` -- the graph structure from
``quant_model.onnx``, every number from ``quantinfo.pkl`` and ``quantparams.pkl`` -- and executes the
network with integer tensors. It imports neither PPQ nor onnxruntime nor torch, only numpy and onnx.

.. code-block:: python

    from maptools.quantization.reference import simulate
    outputs = simulate('digits_w4a4', {'input': images})                     # {'logits': float32 array}
    outputs, integers = simulate('digits_w4a4', images, return_integers=True)
    integers['/block1/conv1/Conv']                                           # what the tile outputs

Semantics
---------

Every tensor between operators is an integer tensor ``q`` with ``real = scale * (q - zero_point)``.

* ``QuantizeLinear -> [Clip] -> DequantizeLinear`` chains of the QDQ model are the quantization
  boundaries: ``q = clip(round_half_even(real / scale) + zero_point, qmin, qmax)``. Each one is matched to
  the ``TensorQuant`` of ``quantinfo.pkl`` of the same tensor name (falling back to the node's own
  initializers when no record carries that name); a record that disagrees with the node is an
  :class:`~maptools.errors.ArtifactError`. A QuantizeLinear applied to a tensor already held as integers
  with the same scale and zero point is exact (only the clip applies).
* ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` multiply-accumulate integers exactly: ``acc =
  sum((x - x_zp) * w) + bias`` with the integer weights and int32 biases of ``quantparams.pkl``, then
  requantize with the recorded scales: ``real = acc * (s_in * s_w[channel])``, ``q = clip(round_half_even(real
  / s_out) + zp_out, qmin, qmax)``. A Conv sums im2col columns, a ConvTranspose runs as the Conv of its
  zero-inserted input with the flipped kernel, Gemm (``transA``, ``transB``; ``alpha`` and ``beta`` scale
  the real values) and MatMul (with a constant weight or of two quantized activations) multiply their rows;
  all go through one accumulation step, :func:`~maptools.quantization.reference.mac.accumulate`. The
  products are summed by BLAS in float32 when every partial sum provably stays below 2**24, in float64
  below 2**53 (both exact: all intermediate values are representable integers), else by an int64 matmul.
  An input held at another scale than the operator's recorded input quantization (or not quantized at all)
  is first requantized to the recorded one, exactly as an integer chip fed from that record would need.
* Operators with an integer meaning act on the integers directly, which is exact: ``Relu``, ``MaxPool``,
  nearest ``Resize`` and the layout operators (``Flatten``, ``Reshape``, ``Transpose``, ``Squeeze``,
  ``Unsqueeze``, ``Identity``, ``Slice``, ``Split``, ``Concat`` and ``ScatterND`` of equally quantized
  inputs, ``Pad`` with a value on the integer grid or in edge/reflect/wrap mode).
* ``Add``, ``Sub``, ``Mul``, ``Div``, ``Clip``, ``AveragePool``, ``GlobalAveragePool``, linear ``Resize``,
  inference ``BatchNormalization``, ``Concat`` and ``ScatterND`` of differently quantized inputs and the
  activation functions ``Sigmoid``, ``HardSigmoid``, ``HardSwish`` and ``Tanh`` have dedicated float
  handlers: they dequantize, compute in float64 and the result is requantized.
* Every other supported operator (``Softmax``, ``PRelu``, ``LeakyRelu``, ``Erf``, ``Pow``, reductions,
  normalizations..., and the shape arithmetic ``Shape``, ``Gather``, ``Range``, ``Expand``,
  ``ConstantOfShape``, ``Cast``, ``Equal``, ``Where``...) runs in the generic float handler
  (:mod:`~maptools.quantization.reference.generic`): quantized inputs are dequantized to float64,
  integer and bool tensors stay as they are, and the node is evaluated by :mod:`onnx.reference`; the
  result is requantized like any float result. :data:`SUPPORTED_OPS` lists every operator type the
  executor runs; anything else, control flow (``If``, ``Loop``, ``Scan``) included, is refused with an
  :class:`~maptools.errors.UnsupportedOperatorError` naming the node when the map is loaded, before any
  computation.
* A MAC operator whose output has no record feeds an activation fused into it (``Conv -> Sigmoid``,
  ``Conv -> x * HardSigmoid(x)``, see :mod:`maptools.quantization.engine.fusion`): the activation reads
  the real accumulator value, ``acc * (s_in * s_w[channel])``, and only its result is requantized.
* After every operator that has a record in ``quantinfo.pkl``, its outputs are held at the record's
  ``outputs`` quantization (requantized if they were not already): these integers are what a tile sees,
  and what ``return_integers=True`` returns (the first output of each operator).

Inputs of the graph are float32 and quantized in float32 arithmetic, like ONNX ``QuantizeLinear``; every
internal requantization divides in float64.

Compute-in-memory mode
----------------------

``simulate(mapname, inputs, cim=spec)`` (or ``ReferenceExecutor.load(mapname, cim=spec)``) runs every MAC
with a constant weight (``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``) through the crossbar model of
:mod:`maptools.quantization.cim` with the operands of the node's record, and requantizes in the spec's
``requant`` arithmetic; ``cim=True`` uses the map's own spec and ADC calibration (``cim.json``). With an ideal
ADC (``adc_bits=None``) and ``requant='float'`` the results are bit-identical to the exact mode.
:mod:`~maptools.quantization.reference.crossbar` states what goes through the crossbar and how the zero
points and the bias enter.

Relation to PPQ's simulation
----------------------------

Where PPQ quantizes every tensor it hands to a MAC operator, this executor computes the same integers as
PPQ's fake-quantized float32 simulation, up to rounding ties of PPQ's float32 arithmetic (bit-exact on the
4-bit maps tried). PPQ 0.6.6 may however pass a tensor *unquantized* to some consumers although
``quantinfo.pkl`` records its quantization -- typically a residual ``Relu`` (or ``MaxPool``) output that feeds
both a ``Conv`` and an ``Add``: PPQ quantizes it only at the ``Add`` input, and the ``Conv`` multiplies float
values, which integer hardware cannot do. ``quant_model.onnx`` reproduces PPQ there (no QuantizeLinear on
that edge); this executor follows ``quantinfo.pkl`` and quantizes it, so its outputs differ from PPQ's and
onnxruntime's on such maps.

Package layout
--------------

:mod:`~maptools.quantization.reference.core` holds :func:`simulate`;
:mod:`~maptools.quantization.reference.executor` loads a map and walks its graph (:class:`ReferenceExecutor`,
one class); its MACs with a constant weight accumulate through one backend object,
:mod:`~maptools.quantization.reference.backends` (exact, or the crossbar of
:mod:`~maptools.quantization.reference.crossbar`);
:mod:`~maptools.quantization.reference.values` holds the value types and the (re)quantization arithmetic;
:mod:`~maptools.quantization.reference.registry` maps operator types to handlers, which live in one
module per family (``boundary``, ``mac``, ``activations``, ``elementwise``, ``layout``, ``pooling``,
``resize``, ``generic``) and see the executor only through
:class:`~maptools.quantization.reference.registry.Executor`. The package sits above the crossbar arithmetic
(:mod:`maptools.quantization.cim`) and below the map-level features (:mod:`maptools.quantization.cimmap`).
"""

from __future__ import annotations

from maptools.quantization.reference.core import simulate
from maptools.quantization.reference.executor import SUPPORTED_OPS, ReferenceExecutor

__all__ = ["SUPPORTED_OPS", "ReferenceExecutor", "simulate"]
