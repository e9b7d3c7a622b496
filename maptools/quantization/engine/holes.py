"""Fan-out tensors PPQ leaves in float although a consumer reads them as integers: closed after quantizing.

PPQ 0.6.6 quantizes a tensor that fans out (a residual block's ReLU feeding a Conv and an Add) on one edge
only when its alignment overlaps the producer's output config with a consumer's input config;
:func:`close_quantization_holes` quantizes the producer's output at the dominating config, so every
consumer reads the integers a chip would hold. The graph is changed in place, after PPQ's passes.
"""

from __future__ import annotations

from maptools.quantization.engine.facade import (
    BaseGraph,
    QuantableOperation,
    QuantizationStates,
)

__all__ = ["close_quantization_holes"]


def close_quantization_holes(graph: BaseGraph) -> list[str]:
    """Quantize tensors PPQ would hand unquantized to a consumer that expects integers.

    When an operator's output fans out (a residual block's ReLU feeding both a Conv and an Add), PPQ's
    alignment can leave the output config overlapped by the Add's input config: PPQ then quantizes the
    tensor only on the Add's edge and the Conv computes on floats, although its input config (and so
    ``quantinfo.pkl``) says the input is quantized. A chip computes every MAC on integers, so the
    producer's output is quantized here at the same (dominating) scale; the Add's quantization of it
    becomes an identity.

    With ``layer_bits``, a consumer may requantize the tensor to its own bits (a 4-bit Conv reading the
    output of a ReLU6 that a residual ``Add`` keeps at 8 bits). PPQ then rounds the float tensor once,
    to 4 bits, while the chip (and ``quantinfo.pkl``: the ReLU6 output is 8-bit) materializes the 8-bit
    tensor and requantizes it: the producer's output is quantized here too, so PPQ, onnxruntime and
    the integer executor all round twice.

    Args:
        graph: The quantized PPQ graph.

    Returns:
        ``'producer -> consumer'`` for every tensor quantized.
    """
    live = QuantizationStates.is_activated
    closed = []
    for op in graph.topological_sort():
        if not isinstance(op, QuantableOperation):
            continue
        for config, var in zip(op.config.output_quantization_config, op.outputs, strict=True):
            if live(config.state) or config.dominated_by is config or not live(config.dominated_by.state):
                continue
            for dest in var.dest_ops:
                if not isinstance(dest, QuantableOperation) or dest.type in ("Relu", "Clip"):
                    continue  # Q(relu(x)) == relu(Q(x)): a fused activation is not a hole
                dest_config = dest.config.input_quantization_config[dest.inputs.index(var)]
                if dest.config.output_quantization_config and (
                        dest_config.dominated_by is dest.config.output_quantization_config[0].dominated_by):
                    continue  # an activation fused into its producer (Conv -> Sigmoid) reads the accumulator
                if not live(dest_config.state) or dest_config.dominated_by is not config.dominated_by:
                    # quantized with the dominating config's scale: its bit width and range too (they
                    # differ when layer_bits gives the consumer other bits than the producer)
                    root = config.dominated_by
                    config.policy, config.num_of_bits = root.policy, root.num_of_bits
                    config.quant_min, config.quant_max = root.quant_min, root.quant_max
                    config.state = QuantizationStates.ACTIVATED
                    closed.append(f"{op.name} -> {dest.name}")
                    break
    return closed
