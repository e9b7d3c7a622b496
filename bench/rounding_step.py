"""Cost of one learned-rounding step of a corpus network's depthwise layers, as built now and as built before.

A step of a depthwise layer at 4-bit activations gathers the sampled rows' input patches of the quantized and of
the FP32 network (QDrop), draws a mask over every element, mixes, and runs the per-channel product and its
gradient. Before, each of these made a fresh tensor of the patches' size and the mask came from ``torch.rand``
and a boolean ``where``; now the patches land in buffers reused from step to step
(:class:`~maptools.quantization.engine.learned_rounding._StepInputs`) and the mask comes from bytes of 64-bit draws
compared in float arithmetic (:class:`~maptools.quantization.engine.learned_rounding._Drops`). Both variants run the
same product and loss on random data of each layer's shape (read from the corpus model at its input size: channels,
taps, output map), 64 calibration images, the cache's positions per image (128, or every position of a smaller
map), ``sample`` 512 rows per step.

The table gives milliseconds per step (median of the repetitions) and the depthwise layers' total for the
default steps (``iterations * depthwise_factor`` each), the part of ``best`` at W4A4 that dominated its time.

Usage::

    python bench/rounding_step.py                       # Lite1, one thread, writes docs/benchmarks_rounding_step.json
    python bench/rounding_step.py --threads 2 --out -   # print only
    python bench/rounding_step.py --model efficientnet_lite2 --out -
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import weight_spread  # noqa: E402
from corpus import registry  # noqa: E402

from maptools.quantization.engine.channelwise import is_depthwise  # noqa: E402
from maptools.quantization.engine.learned_rounding import DEFAULTS, _Cache, _Drops, _StepInputs  # noqa: E402

IMAGES = 64


def depthwise_shapes(name: str) -> list[tuple[int, int, int, int]]:
    """The corpus model's depthwise Convs (:func:`~maptools.quantization.engine.channelwise.is_depthwise`, on the
    graph PPQ gets) as (channels, kernel taps, output positions, how many such layers), in graph order of first
    appearance; the output sizes from ONNX shape inference at the model's input size."""
    model = registry.get(name)
    proto = weight_spread.prepared_graph(model.path, model.input_shapes)
    inferred = onnx.shape_inference.infer_shapes(proto).graph.value_info
    outputs = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in inferred}
    counts: dict[tuple[int, int, int], int] = {}
    for op in weight_spread.mac_operators(proto, 8):
        if not is_depthwise(op):
            continue
        weight = op.inputs[1].value
        height, width = outputs[op.outputs[0].name][2:]
        key = (int(weight.shape[0]), int(weight.shape[2] * weight.shape[3]), height * width)
        counts[key] = counts.get(key, 0) + 1
    return [(*key, count) for key, count in counts.items()]


def _before(cache: _Cache, sample: int, weight: torch.Tensor, rows: torch.Generator,
            drops: torch.Generator) -> Callable[[], None]:
    """One step as built before: fresh gathers, ``torch.rand`` and a boolean ``where``."""
    def step() -> None:
        index = torch.randint(cache.train, (sample,), generator=rows)
        patches = cache.patches.index_select(1, index)
        drop = torch.rand(patches.shape, generator=drops) < DEFAULTS.qdrop
        patches = torch.where(drop, cache.fp_patches.index_select(1, index), patches)
        _loss(patches, weight, cache.targets.index_select(0, index)).backward()
    return step


def _now(cache: _Cache, sample: int, weight: torch.Tensor, rows: torch.Generator,
         drops: torch.Generator) -> Callable[[], None]:
    """One step as built now: :class:`_StepInputs` with :class:`_Drops`."""
    inputs = _StepInputs(cache, sample, _Drops(DEFAULTS.qdrop, drops))

    def step() -> None:
        index = torch.randint(cache.train, (sample,), generator=rows)
        _loss(inputs(index), weight, cache.targets.index_select(0, index)).backward()
    return step


def _loss(patches: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The depthwise layer's reconstruction loss (ReLU6 after it), as learned rounding computes it."""
    out = torch.bmm(patches, weight.transpose(1, 2)).transpose(0, 1).reshape(patches.shape[1], -1)
    return ((torch.clamp(out, 0.0, 6.0) - targets) ** 2).sum(dim=1).mean()


def _median_ms(step: Callable[[], None], steps: int, reps: int) -> float:
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def measure(model: str = "efficientnet_lite1", steps: int = 10, reps: int = 3) -> list[dict]:
    """Milliseconds per step of each depthwise shape of the corpus ``model``, before and now."""
    rows = []
    for channels, taps, positions, count in depthwise_shapes(model):
        generator = torch.Generator().manual_seed(0)
        cached = IMAGES * min(DEFAULTS.positions, positions)
        patches = torch.randn(channels, cached, taps, generator=generator)
        cache = _Cache(patches, torch.randn(cached, channels, generator=generator), cached - cached // 8,
                       patches + 0.05 * torch.randn(patches.shape, generator=generator))
        weight = torch.randn(channels, 1, taps, generator=generator, requires_grad=True)
        sample = min(DEFAULTS.sample, cache.train)
        row = {"channels": channels, "taps": taps, "cached_rows": cached, "layers": count}
        for name, build in (("before", _before), ("now", _now)):
            step = build(cache, sample, weight, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
            row[f"{name}_ms"] = round(_median_ms(step, steps, reps), 2)
        rows.append(row)
        print(f"[step] {channels:5d} ch x {taps:2d} taps, {cached:5d} rows: before {row['before_ms']:7.1f} ms, "
              f"now {row['now_ms']:6.1f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite1", help="corpus model whose depthwise layers are timed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--steps", type=int, default=10, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_rounding_step.json"),
                        help="JSON to write ('-': none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.model, args.steps, args.reps)
    per_layer = DEFAULTS.iterations * DEFAULTS.depthwise_factor
    totals = {name: round(sum(r[f"{name}_ms"] * r["layers"] for r in rows) * per_layer / 1e3, 1)
              for name in ("before", "now")}
    layers = sum(r["layers"] for r in rows)
    print(f"[step] {layers} depthwise layers x {per_layer} steps: before {totals['before']:.0f} s, "
          f"now {totals['now']:.0f} s ({totals['before'] / totals['now']:.1f}x), {args.threads} thread(s)")
    if args.out != "-":
        command = "python bench/rounding_step.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        Path(args.out).write_text(json.dumps({"command": command, "model": args.model, "threads": args.threads,
                                              "torch": torch.__version__,
                                              "steps_per_layer": per_layer, "seconds_depthwise_layers": totals,
                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
