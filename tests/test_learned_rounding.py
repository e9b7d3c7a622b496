"""Learned rounding (AdaRound on sampled positions): a trained layer's error, the artifacts' integers, the options."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maptools import InvalidArgumentError, InvalidTypeError
from maptools.cli import main
from maptools.examples import digits
from maptools.quantization import quantize, read_quantinfo, read_quantparams, verify
from maptools.quantization.artifacts import MANIFEST, REPORT_JSON
from maptools.quantization.engine import LowBitSpec, PPQSession, learned_rounding
from maptools.quantization.engine.augment import FLAT_GREYS, augment_batches, flat_batches, image_count
from maptools.quantization.engine.learned_rounding import DEFAULTS, RoundingSettings
from maptools.quantization.engine.recipes import build_setting
from maptools.quantization.format import weight_key
from maptools.quantization.model import check_input_shapes, load_model, prepare_model

MOBILE = digits.MODEL_PATH.parent / "digits_mobile.onnx"
#: A trained 1x1 expansion Conv (fused ReLU6) of the bundled mobile CNN.
LAYER = "/block1/expand/expand.0/Conv"
SHAPES = {"input": list(digits.INPUT_SHAPE)}


def _ablation_bench():
    """bench/rounding_ablation.py, whose digits W4 session the test shares (it is a script, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "rounding_ablation.py"
    spec = importlib.util.spec_from_file_location("rounding_ablation_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _ablation_bench()


def _session(rounding: RoundingSettings | None, images: int = 256, activation_bits: int = 8) -> PPQSession:
    """The mobile CNN at W4 and ``activation_bits``, calibrated on the first ``images`` training digits."""
    return ablation.quantized(rounding, images, activation_bits)


def _layer_error(session: PPQSession, images: np.ndarray, target: str) -> float:
    """Mean squared error of the layer's output (after its ReLU6) against FP32 on ``images``."""
    batch = {"input": torch.from_numpy(images)}
    quant = session.forward(batch, output_names=[target])[target]
    ref = session.forward(batch, quantized=False, output_names=[target])[target]
    return float(np.mean((quant.astype(np.float64) - ref) ** 2))


def test_learned_rounding_reduces_a_trained_layers_error_on_held_out_images():
    """Only LAYER learns its rounding (its calibrated scale and bias kept); its output on held-out digits (never
    seen while learning) is compared with nearest rounding, every other layer identical in both."""
    nearest = _session(None)
    learned = _session(RoundingSettings(iterations=500, layers=(LAYER,), scale_candidates=0, bias_lr=0))
    (record,) = learned.rounding_results
    relu = learned.graph.variables[record.target].source_op
    assert relu.type == "Clip" and relu.inputs[0].source_op.name == LAYER  # the fused ReLU6 is in the loss
    images = digits.load_split("test")[0][:256]
    before, after = _layer_error(nearest, images, record.target), _layer_error(learned, images, record.target)
    assert before / after >= 1.3, (before, after)
    assert record.name == LAYER and record.error_nearest / record.error_learned >= 1.3 and record.iterations == 500
    assert 0.01 < record.changed < 0.5
    key = weight_key(LAYER, "Conv")
    learned_q, nearest_q = learned.quantparams()[key], nearest.quantparams()[key]
    assert learned_q.dtype == nearest_q.dtype and 0.01 < np.mean(learned_q != nearest_q) < 0.5
    assert np.abs(learned_q.astype(int) - nearest_q).max() == 1  # learned: the other neighbour, never further
    others = [k for k in nearest.quantparams() if k.endswith("_weight") and k != key]
    assert all(np.array_equal(learned.quantparams()[k], nearest.quantparams()[k]) for k in others)


#: A trained depthwise 3x3 Conv (9 taps per channel, fused ReLU6) of the bundled mobile CNN.
DEPTHWISE = "/block2/depthwise/depthwise.0/Conv"


def test_searched_scale_and_learned_bias_lower_a_depthwise_layers_error_beyond_rounding():
    """On a depthwise layer the weight scale searched per channel against the output error and the bias learned
    with the rounding lower the error on held-out digits beyond learned rounding alone; the written scale and bias
    are those PPQ quantizes with (the integers read back are the learned ones)."""
    alone = _session(RoundingSettings(iterations=500, layers=(DEPTHWISE,), scale_candidates=0, bias_lr=0))
    joint = _session(RoundingSettings(iterations=500, layers=(DEPTHWISE,)))
    (record,) = joint.rounding_results
    images = digits.load_split("test")[0][:256]
    before, after = _layer_error(alone, images, record.target), _layer_error(joint, images, record.target)
    assert before / after >= 1.12, (before, after)
    op = joint.graph.operations[DEPTHWISE]
    scale = op.config.input_quantization_config[1].scale.reshape(-1)
    calibrated = alone.graph.operations[DEPTHWISE].config.input_quantization_config[1].scale.reshape(-1)
    assert 0.1 < float((scale != calibrated).float().mean()) < 1.0  # some channels rescaled, within the range
    assert bool(((scale / calibrated >= 0.5 - 1e-6) & (scale / calibrated <= 1.2 + 1e-6)).all())
    bias, bias_alone = op.inputs[2].value, alone.graph.operations[DEPTHWISE].inputs[2].value
    assert float((bias - bias_alone).abs().max()) > 1e-3
    assert np.array_equal(joint.quantparams()[weight_key(DEPTHWISE, "Conv")], record.integers.numpy())


#: A trained 1x1 projection Conv of the bundled mobile CNN: no activation after it, its target is its output.
PROJECT = "/block1/project/project.0/Conv"


def test_a_linear_layer_learns_on_every_position_with_its_least_squares_bias():
    """A layer without an activation after it is learned on the exact quadratic loss of every calibration
    position, its bias set to the least-squares one: on held-out digits its error falls further than with sampled
    positions and an Adam-learned bias, and on the calibration digits its mean output is FP32's, channel by
    channel (the mean shift of the quantized layers before it absorbed)."""
    nearest = _session(None)
    quadratic = _session(RoundingSettings(iterations=300, layers=(PROJECT,), quadratic=True))
    sampled = _session(RoundingSettings(iterations=300, layers=(PROJECT,)))
    (record,) = quadratic.rounding_results
    (sampled_record,) = sampled.rounding_results
    assert record.target == record.name + "_output_0" or record.target.endswith("Conv_output_0")
    height_width = 8 * 8  # the block's map: every position of every image enters the loss
    assert record.positions == 256 * height_width and record.sample == 224 * height_width
    assert sampled_record.sample == DEFAULTS.sample  # sampled: 512 of the cached positions per step
    images = digits.load_split("test")[0][:256]
    errors = [_layer_error(s, images, record.target) for s in (nearest, sampled, quadratic)]
    assert errors[0] / errors[2] >= 1.5 and errors[2] < errors[1], errors
    train = digits.load_split("train")[0][:224]  # the batches the loss saw (the last 32 are held out)
    batch = {"input": torch.from_numpy(train)}
    shifts = []
    for session in (quadratic, nearest):
        quant = session.forward(batch, output_names=[record.target])[record.target].astype(np.float64)
        ref = session.forward(batch, quantized=False, output_names=[record.target])[record.target]
        shifts.append(np.abs((quant - ref).mean(axis=(0, 2, 3))).max() / ref.std())
    assert shifts[0] < 0.005 and shifts[1] > 5 * shifts[0], shifts  # the mean shift nearest rounding leaves, gone


#: The trained depthwise 3x3 Conv (fused ReLU6) that only PROJECT reads: a pair learned together.
PAIRED = "/block1/depthwise/depthwise.0/Conv"


def _paired_ratio(**fields) -> tuple[float, learned_rounding.LayerRounding, learned_rounding.LayerRounding]:
    """PAIRED and PROJECT learned one after the other and learned with ``fields``: the projection's output error on 256
    held-out digits of the first over the second, and the second's two records (checked: named, targets, integers)."""
    apart = _session(RoundingSettings(layers=(PAIRED, PROJECT)))
    paired = _session(RoundingSettings(layers=(PAIRED, PROJECT), **fields))
    first, second = paired.rounding_results
    assert (first.name, second.name) == (PAIRED, PROJECT)
    assert first.target == second.target == paired.graph.operations[PROJECT].outputs[0].name
    for record in (first, second):
        assert np.array_equal(paired.quantparams()[weight_key(record.name, "Conv")], record.integers.numpy())
    images = digits.load_split("test")[0][:256]
    errors = [_layer_error(session, images, second.target) for session in (apart, paired)]
    return errors[0] / errors[1], first, second


def test_a_depthwise_layer_learned_with_the_1x1_conv_after_it_lowers_that_convs_error():
    """With ``pairs`` (W4A8) the depthwise Conv and the 1x1 projection after it are learned together against the
    projection's FP32 output (the depthwise output quantized to 8 bits between them, as PPQ does): on held-out
    digits the projection's output error is lower than with the two learned one after the other; both records carry
    the pair's held-out error and the depthwise layer's steps, and the artifacts the learned integers of both."""
    ratio, first, second = _paired_ratio(pairs=True)
    assert ratio >= 1.05, ratio  # 1.08-1.11 measured on seeds 0-2
    assert first.error_nearest == second.error_nearest and first.error_learned == second.error_learned
    assert first.error_nearest / first.error_learned >= 1.5
    assert first.iterations == second.iterations == DEFAULTS.iterations * DEFAULTS.depthwise_factor


def test_only_a_depthwise_layer_whose_output_only_a_1x1_conv_reads_is_paired():
    """In the mobile CNN only block 1's depthwise Conv feeds a 1x1 Conv directly; the other two feed a squeeze-and-
    excitation gate, which a pair's positions cannot hold, and are learned alone against their own output."""
    session = _session(RoundingSettings(iterations=8, pairs=True))
    records = session.rounding_results
    paired = [(a.name, b.name) for a, b in zip(records, records[1:], strict=False) if a.target == b.target]
    assert paired == [(PAIRED, PROJECT)]
    depthwise = [r for r in records if r.name.endswith("depthwise.0/Conv")]
    assert len(depthwise) == 3 and len(records) == 16
    assert all(r.target == session.graph.operations[r.name].outputs[0].name.replace("depthwise.0/Conv_output_0",
                                                                                     "depthwise.2/Mul_output_0")
               for r in depthwise[1:])


def test_a_pairs_biases_tuned_together_after_each_layer_is_learned_lower_the_1x1_convs_error():
    """With ``pair_biases`` (W4A8) the depthwise Conv and the projection after it are each learned alone, then both
    biases are tuned against the projection's FP32 output: on held-out digits the projection's output error is lower
    than with the two learned one after the other (1.046-1.062x on seeds 0-2; 0.993-1.002x with the tuning left
    out, so the gain is the joint bias); both records carry the pair's held-out error and their own steps."""
    ratio, first, second = _paired_ratio(pair_biases=True)
    assert ratio >= 1.03, ratio
    assert first.error_learned == second.error_learned and first.error_nearest / first.error_learned >= 2.0
    assert (first.iterations, second.iterations) == (DEFAULTS.iterations * DEFAULTS.depthwise_factor,
                                                     DEFAULTS.iterations)


def test_qdrop_applies_below_its_activation_width_setting():
    """QDrop is off at 8-bit inputs by default: the projection's learned integers change with ``qdrop_below_bits=9``
    (QDrop on at W4A8) and are the default's again with ``qdrop=0``."""
    def integers(**fields) -> np.ndarray:
        session = _session(RoundingSettings(layers=(PROJECT,), iterations=100, **fields))
        return session.quantparams()[weight_key(PROJECT, "Conv")]

    default = integers()
    assert not np.array_equal(integers(qdrop_below_bits=9), default)
    assert np.array_equal(integers(qdrop_below_bits=9, qdrop=0.0), default)


@pytest.mark.parametrize("qdrop", [0.0, 0.1, 0.5, 0.75, 1.0])
def test_qdrop_masks_are_zero_or_one_at_the_probability_and_repeat_per_seed(qdrop):
    """QDrop's masks (bytes compared in float arithmetic, the weights of a lerp from FP32 to quantized): only 0 and
    1, 0 (the FP32 value) with probability ``qdrop`` (within 4 standard deviations over 400,000 elements), the same
    for the same seed, fresh at every draw."""
    def drops(seed: int) -> learned_rounding._Drops:
        return learned_rounding._Drops(qdrop, torch.Generator().manual_seed(seed))

    source, shape = drops(0), torch.Size((40, 100, 100))
    first = source.draw(shape).clone()
    second = source.draw(shape).clone()
    assert set(torch.unique(first).tolist()) <= {0.0, 1.0}
    spread = 4 * (qdrop * (1 - qdrop) / first.numel()) ** 0.5
    assert abs(float((first == 0).float().mean()) - qdrop) <= spread + 1e-12
    assert torch.equal(first, drops(0).draw(shape))
    if 0 < qdrop < 1:
        assert not torch.equal(first, second) and not torch.equal(first, drops(1).draw(shape))


def test_step_inputs_reuse_one_buffer_and_take_fp32_values_where_dropped():
    """Each step's patches land in the same buffer (no fresh patch-size tensor per step); with QDrop every element is
    either the quantized network's or the FP32 network's at the same row, about half of each at ``qdrop=0.5``."""
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(3, 50, 9, generator=generator)
    fp_patches = patches + 1.0 + torch.rand(3, 50, 9, generator=generator)  # never equal to the quantized values
    cache = learned_rounding._Cache(patches, torch.randn(50, 3, generator=generator), 40, fp_patches)
    drops = learned_rounding._Drops(0.5, torch.Generator().manual_seed(1))
    inputs = learned_rounding._StepInputs(cache, 16, drops)
    rows = torch.randint(40, (16,), generator=generator)
    mixed = inputs(rows).clone()
    quantized, fp32 = patches.index_select(1, rows), fp_patches.index_select(1, rows)
    from_fp32 = mixed == fp32
    assert torch.equal(torch.where(from_fp32, fp32, quantized), mixed)
    assert torch.equal(mixed == quantized, ~from_fp32)
    assert 0.35 < float(from_fp32.float().mean()) < 0.65
    assert inputs(torch.randint(40, (16,), generator=generator)).data_ptr() == inputs(rows).data_ptr()
    plain = learned_rounding._StepInputs(learned_rounding._Cache(patches, cache.targets, 40), 16, drops)
    assert torch.equal(plain(rows), quantized) and plain(rows).data_ptr() == plain(rows.flip(0)).data_ptr()


class _Conv:
    """What the patch extraction reads of a PPQ Conv: a padded 3x3 with two groups."""

    name = "conv"
    attributes = {"group": 2, "pads": [1, 1, 1, 1]}


def test_quadratic_moments_give_the_sampled_error_exactly():
    """The error computed from a layer's moments equals the direct mean over the same positions (a padded, grouped
    3x3 Conv: im2col patches), and the least-squares bias is the error's minimum."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 2, 3, 3, generator=generator)
    groups, matrix, patches, outputs, to_weight = learned_rounding._conv_layer(_Conv(), weight)
    layer = learned_rounding._Layer(_Conv(), groups, matrix, torch.full((groups, 3, 1), 0.1), None, -8, 7, patches,
                                    outputs, to_weight, lambda y: y, "y")
    inputs = [torch.rand(2, 4, 7, 7, generator=generator) for _ in range(3)]
    targets = [torch.randn(2, 6, 7, 7, generator=generator) for _ in range(3)]
    sums = learned_rounding._Moments.of(layer, inputs, targets)
    noisy = matrix + 0.01 * torch.randn(matrix.shape, generator=generator)
    bias = torch.randn(6, generator=generator)
    rows = torch.cat([patches(x) for x in inputs]).reshape(-1, groups, matrix.shape[2]).transpose(0, 1)
    outs = torch.cat([outputs(y) for y in targets]).reshape(-1, 6)
    direct = ((learned_rounding._layer_output(layer, rows, noisy, bias) - outs).double() ** 2).sum(1).mean()
    assert sums.count == 6 * 7 * 7
    assert sums.error(noisy, bias) == pytest.approx(float(direct), rel=1e-6)
    best = sums.bias_for(noisy)
    assert sums.error(noisy, best) < sums.error(noisy, bias)
    assert sums.error(noisy, best) < min(sums.error(noisy, best + 0.01), sums.error(noisy, best - 0.01))


class _Dense:
    """What the patch extraction reads of a PPQ 1 x 1 Conv without groups or pads."""

    name = "dense"
    attributes = {"group": 1}


def test_damping_keeps_the_rounding_from_leaning_on_correlations_only_the_calibration_data_show():
    """Calibration inputs in identical pairs let learned rounding cancel one weight's error with its twin's: lower
    error on them, higher on independent inputs. The ridge term (``damping``) gives back part of the calibration gain
    for a lower error on the independent inputs and fewer integers changed."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, 1, 1, generator=generator)
    groups, matrix, patches, outputs, to_weight = learned_rounding._conv_layer(_Dense(), weight)
    scale = matrix.abs().amax(dim=2, keepdim=True) / 7
    layer = learned_rounding._Layer(_Dense(), groups, matrix, scale, None, -8, 7, patches, outputs, to_weight,
                                    lambda y: y, "y")

    def data(correlated: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if correlated:
            base = torch.randn(8, 16, 8, 8, generator=generator)
            x = torch.stack([base, base + 0.05 * torch.randn(base.shape, generator=generator)], dim=2)
            x = x.reshape(8, 32, 8, 8)
        else:
            x = torch.randn(8, 32, 8, 8, generator=generator)
        return x, F.conv2d(x, weight)

    calibration, independent = [data(True) for _ in range(4)], [data(False) for _ in range(2)]

    def error(w: torch.Tensor, sets: list) -> float:
        return sum(float(((F.conv2d(x, to_weight(w)) - y) ** 2).sum()) for x, y in sets) / (len(sets) * 8 * 64)

    results = {}
    for damping in (0.0, 1.0):
        cache = learned_rounding._sample_cache(layer, [x for x, _ in calibration], [y for _, y in calibration], 64,
                                               torch.Generator().manual_seed(1), "cpu")
        settings = RoundingSettings(damping=damping, scale_candidates=0, bias_lr=0)
        learned = learned_rounding.learn_rounding(layer, cache, settings, 300, torch.Generator().manual_seed(2))
        w = learned.learned * learned.scale
        results[damping] = (error(w, calibration), error(w, independent), float((learned.learned != learned.nearest)
                                                                                 .float().mean()))
    nearest = learned_rounding._nearest(layer, "cpu") * scale
    assert results[0.0][0] < error(nearest, calibration) * 0.8  # it fits the pairs (4.76 -> 3.47)
    assert results[0.0][1] > error(nearest, independent) * 1.1  # and errs on independent inputs (5.21 -> 6.43)
    assert results[1.0][1] < results[0.0][1] * 0.9 and results[1.0][2] < results[0.0][2] / 2  # 5.26, 3 % changed


def test_augmentation_adds_views_up_to_the_count_deterministic_per_seed():
    train, _ = digits.load_split("train")
    batches = [{"input": torch.from_numpy(train[i:i + 16])} for i in range(0, 32, 16)]
    first, again = augment_batches(batches, 64, seed=3), augment_batches(batches, 64, seed=3)
    other = augment_batches(batches, 64, seed=4)
    assert image_count(first) == 64 and len(first) == 4 and first[:2] == batches
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[2]["input"], other[2]["input"])
    views = torch.cat([b["input"] for b in first[2:]])
    assert views.shape == (32, *train.shape[1:]) and views.dtype == batches[0]["input"].dtype
    originals = torch.cat([b["input"] for b in batches])
    assert views.min() >= originals.min() and views.max() <= originals.max()  # bilinear: inside the range
    # every view differs from every original (cropped and resized or flipped): not copies
    distance = torch.cdist(views.flatten(1), originals.flatten(1))
    assert distance.min() > 0
    # enough images, or inputs that are not images: the batches as given
    assert augment_batches(batches, 32) == batches and augment_batches(batches, 0) == batches
    rows = [{"x": torch.ones(16, 10)}]
    assert augment_batches(rows, 64) == rows


def test_photometric_views_are_darker_and_tinted_within_each_images_range():
    """Crops darkened toward the view's minimum and each channel scaled: a grayscale image (three equal channels)
    gains colour, and the views' ranges shrink against plain views of the same images."""
    gray = torch.rand(4, 1, 16, 16).expand(4, 3, 16, 16).contiguous()
    batches = [{"input": gray}]
    views = torch.cat([b["input"] for b in augment_batches(batches, 36, seed=5, photometric=True)[1:]])
    assert views.shape == (32, 3, 16, 16)
    assert views.min() >= gray.min() and views.max() <= gray.max()
    assert (views[:, 0] - views[:, 1]).abs().amax(dim=(1, 2)).min() > 0  # every view tinted
    plain = torch.cat([b["input"] for b in augment_batches(batches, 36, seed=5)[1:]])
    contrast = (views.amax(dim=(1, 2, 3)) - views.amin(dim=(1, 2, 3))) / (plain.amax(dim=(1, 2, 3)) -
                                                                          plain.amin(dim=(1, 2, 3)))
    assert contrast.median() < 0.8 and contrast.max() <= 1.2 + 1e-6  # darkened by 0.25-1.0, gains 0.8-1.2


def test_flat_batches_span_every_corner_of_the_inputs_range_and_greys_between():
    """An RGB input gets 8 corner colours and :data:`FLAT_GREYS` greys, each a batch of one flat image at the
    calibration data's per-channel extremes; grayscale 2 + greys; more channels, or several inputs, none."""
    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    batches = [{"input": torch.rand(2, 3, 16, 12, generator=generator) * spread - 1.0} for _ in range(3)]
    flats = flat_batches(batches)
    assert len(flats) == 8 + FLAT_GREYS
    images = torch.cat([f["input"] for f in flats])
    assert images.shape == (8 + FLAT_GREYS, 3, 16, 12) and images.dtype == torch.float32
    assert torch.equal(images, images[:, :, :1, :1].expand_as(images))  # flat
    data = torch.cat([b["input"] for b in batches])
    low, high = data.amin(dim=(0, 2, 3)), data.amax(dim=(0, 2, 3))
    values = images[:, :, 0, 0]
    corners = {tuple(bool(v) for v in row) for row in torch.isclose(values[:8], high.expand(8, 3))}
    assert len(corners) == 8 and torch.isclose(values[:8], low.expand(8, 3)).logical_xor(
        torch.isclose(values[:8], high.expand(8, 3))).all()
    shares = (values[8:] - low) / (high - low)  # the greys: one share of the range for every channel
    assert torch.allclose(shares, shares[:, :1].expand_as(shares)) and shares.min() > 0 and shares.max() < 1
    gray = [{"input": torch.rand(4, 1, 8, 8, generator=generator)}]
    assert len(flat_batches(gray)) == 2 + FLAT_GREYS
    assert flat_batches([{"input": torch.rand(1, 5, 8, 8)}]) == []
    assert flat_batches([{"a": torch.rand(1, 3, 8, 8), "b": torch.rand(1, 3, 8, 8)}]) == []
    assert flat_batches([{"x": torch.rand(16, 10)}]) == []


#: The bundled mobile CNN's first Conv (it reads the image).
STEM = "/stem/stem.0/Conv"
#: What it reconstructs: its output after the fused ReLU6.
STEM_TARGET = "/stem/stem.2/Clip_output_0"


def _noisy_session(rounding: RoundingSettings) -> PPQSession:
    """The mobile CNN at W4A8, calibrated on 32 training digits with noise added: no flat region left in them."""
    model = load_model(MOBILE)
    proto = prepare_model(model, check_input_shapes(SHAPES, model))
    spec = LowBitSpec(4, 8, observer="mse", unsigned_nonnegative=True, weight_observer="mse")
    session = PPQSession.from_onnx(proto, spec, "cpu", build_setting("default", "cpu", 8))
    train = digits.load_split("train")[0][:32]
    noisy = np.clip(train + np.random.default_rng(0).normal(0, 0.5, train.shape), -1, 1).astype(np.float32)
    session.quantize([{"input": torch.from_numpy(noisy[i:i + 4])} for i in range(0, 32, 4)], rounding)
    return session


def test_flat_views_fit_the_first_layers_rounding_to_flat_regions():
    """Calibrated on digits with noise (no flat region in them), the first layer learned with flat views errs less on
    flat images of nine levels than learned without them; its cache holds the 5 flat images' positions too, 14 each
    so that they stay within an eighth of the rows (:attr:`RoundingSettings.flat_share`)."""
    settings = RoundingSettings(iterations=500, positions=16, layers=(STEM,), flat_views=False)
    (plain_record,) = (plain := _noisy_session(settings)).rounding_results
    (flat_record,) = (flat := _noisy_session(dataclasses.replace(settings, flat_views=True))).rounding_results
    assert (plain_record.positions, flat_record.positions) == (32 * 16, 32 * 16 + (2 + FLAT_GREYS) * 14)
    levels = np.linspace(-1, 1, 9, dtype=np.float32)
    errors = [np.mean([_layer_error(s, np.full((16, 1, 8, 8), v, np.float32), STEM_TARGET) for v in levels])
              for s in (plain, flat)]
    assert errors[0] / errors[1] >= 1.4, errors  # measured 1.66x (seed 1: 1.92x)
    assert plain_record.target == flat_record.target == STEM_TARGET


def test_flat_images_take_at_most_their_share_of_the_cached_rows():
    """With few photographs the flat images get fewer positions each (the orientation classifier lost 4 of 64 crops
    when 11 flat images weighed a quarter of its first learned layer's rows); at least one each; a share of 1
    leaves them the photographs' count."""
    settings = RoundingSettings(iterations=10, positions=16, layers=(STEM,), flat_views=True)
    counts = []
    for share in (0.05, 0.001, 1.0):
        (record,) = _noisy_session(dataclasses.replace(settings, flat_share=share)).rounding_results
        counts.append(record.positions - 32 * 16)
    flats = 2 + FLAT_GREYS
    assert counts == [flats * 5, flats * 1, flats * 16]  # 512 * 0.05 / 0.95 = 26.9 rows: 5 each
    assert counts[0] / (32 * 16 + counts[0]) <= 0.05


def test_learned_rounding_caches_augmented_positions_only_with_few_images():
    """16 calibration digits and ``min_images=64``: the cache holds 64 images' positions; 0 turns it off."""
    settings = RoundingSettings(iterations=10, positions=16, layers=(LAYER,), min_images=64, flat_views=False)
    (augmented,) = _session(settings, images=16).rounding_results
    (plain,) = _session(dataclasses.replace(settings, min_images=0), images=16).rounding_results
    (enough,) = _session(settings, images=64).rounding_results
    assert (augmented.positions, plain.positions, enough.positions) == (64 * 16, 16 * 16, 64 * 16)


def test_default_settings_augment_below_32_images_only():
    """The default ``min_images`` (32): 32 calibration images are used as given (the orientation classifier at
    W4A8 ``best`` lost 3 of 64 crops with views added to 64), 16 get views up to 32."""
    settings = dataclasses.replace(DEFAULTS, iterations=10, positions=16, layers=(LAYER,), flat_views=False)
    (given,) = _session(settings, images=32).rounding_results
    (few,) = _session(settings, images=16).rounding_results
    assert (given.positions, few.positions) == (32 * 16, 32 * 16)


def test_qdrop_changes_nothing_at_8_bit_activations_and_the_rounding_at_4():
    """QDrop mixes FP32 inputs into the reconstruction only where the layer's input has fewer than 8 bits.

    Its masks come from their own random stream, so the A4 runs differ by the mixing alone."""
    base = RoundingSettings(iterations=200, layers=(LAYER,), qdrop=0.0)
    (a8_off,) = _session(base, images=64).rounding_results
    (a8_on,) = _session(dataclasses.replace(base, qdrop=0.5), images=64).rounding_results
    assert torch.equal(a8_off.integers, a8_on.integers) and a8_off.loss == a8_on.loss
    (a4_off,) = _session(base, images=64, activation_bits=4).rounding_results
    (a4_on,) = _session(dataclasses.replace(base, qdrop=0.5), images=64, activation_bits=4).rounding_results
    changed = float((a4_off.integers != a4_on.integers).float().mean())
    assert 0.001 < changed < 0.2, changed
    # both held-out errors are measured on the quantized input and never worse than nearest
    assert a4_on.error_nearest == a4_off.error_nearest and a4_on.error_learned <= a4_on.error_nearest


@pytest.mark.slow
def test_lsq_after_learned_rounding_keeps_the_learned_integers():
    """best at W4A8: learned rounding, then LSQ on the activation scales and biases; the weights stay learned."""
    model = load_model(MOBILE)
    proto = prepare_model(model, check_input_shapes(SHAPES, model))
    spec = LowBitSpec(4, 8, observer="mse", unsigned_nonnegative=True, weight_observer="mse")
    setting = build_setting("best", "cpu", 8)
    setting.lsq_optimization_setting.steps = 5
    session = PPQSession.from_onnx(proto, spec, "cpu", setting)
    train, _ = digits.load_split("train")
    session.quantize([{"input": torch.from_numpy(train[i:i + 16])} for i in range(0, 128, 16)],
                     RoundingSettings(iterations=20))
    params = session.quantparams()
    assert len(session.rounding_results) == 16
    for record in session.rounding_results:
        assert np.array_equal(params[weight_key(record.name, record.op_type)], record.integers.numpy()), record.name


def test_artifacts_carry_the_learned_integers(tmp_path, monkeypatch):
    """A fixed number of steps (not a time budget, whose step count follows the machine's speed) so that the
    learned integers, and the float32 ties the executors may round apart, are the same on every run."""
    train, _ = digits.load_split("train")
    calib = [{"input": train[i:i + 16]} for i in range(0, 16 * 16, 16)]
    common = dict(calibset=calib, calib_steps=16, weight_bits=4, activation_bits=8, mapsave_dir=tmp_path,
                  analysis_steps=1)
    quantize(SHAPES, "cpu", MOBILE, mapname="near", recipe="default", **common)
    monkeypatch.setattr(learned_rounding, "DEFAULTS", dataclasses.replace(DEFAULTS, iterations=60))
    result = quantize(SHAPES, "cpu", MOBILE, mapname="learned", recipe="default", rounding="learned", **common)
    settings = json.loads((result.directory / MANIFEST).read_text())["settings"]
    assert (settings["rounding"], settings["time_budget"]) == ("learned", None)
    report = json.loads((result.directory / REPORT_JSON).read_text())
    layers = {entry["node"]: entry for entry in report["learned_rounding"]}
    assert len(layers) == 16 and all(e["error_learned"] <= e["error_nearest"] for e in layers.values())
    assert {e["iterations"] for e in layers.values()} <= {60, 60 * DEFAULTS.depthwise_factor}
    learned, near = read_quantparams("learned", tmp_path), read_quantparams("near", tmp_path)
    changed = [k for k in learned if k.endswith("_weight") and not np.array_equal(learned[k], near[k])]
    assert len(changed) >= 8
    # the QDQ model and PPQ's state rebuilt from the files give the learned integers' outputs
    images = digits.load_split("test")[0][:128]
    check = verify("learned", [{"input": images[i:i + 16]} for i in range(0, 128, 16)], mapsave_dir=tmp_path)
    for pair in (check.get("ppq", "onnxruntime"), check.get("ppq", "integer")):
        assert pair.within_one_step >= 0.995 and pair.top1_agreement == 1.0, pair
    assert check.get("fp32", "ppq").top1_agreement >= 0.95


def test_a_binding_time_budget_cuts_every_layers_steps(tmp_path):
    """A budget far below what the steps need leaves each layer its few timed steps, and the manifest records it."""
    train, _ = digits.load_split("train")
    result = quantize(SHAPES, "cpu", MOBILE, mapname="budget", calibset=[{"input": train[i:i + 16]}
                                                                         for i in range(0, 128, 16)],
                      calib_steps=8, weight_bits=4, activation_bits=8, recipe="default", rounding="learned",
                      time_budget=0.01, mapsave_dir=tmp_path, analysis_steps=1)
    settings = json.loads((result.directory / MANIFEST).read_text())["settings"]
    assert settings["time_budget"] == 0.01
    report = json.loads((result.directory / REPORT_JSON).read_text())["learned_rounding"]
    assert len(report) == 16 and {e["iterations"] for e in report} == {learned_rounding._TIMED_STEPS}
    assert all(e["error_learned"] <= e["error_nearest"] for e in report)


@pytest.mark.slow
def test_best_learns_rounding_at_low_bits_only(tmp_path, tiny_onnx):
    def settings(**kwargs) -> dict:
        quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, analysis_steps=1,
                 mapsave_dir=tmp_path, **kwargs)
        return json.loads((tmp_path / "m" / MANIFEST).read_text())["settings"]

    assert settings(recipe="best", bit_width=4, time_budget=1)["rounding"] == "learned"
    assert settings(recipe="best", bit_width=8)["rounding"] == "nearest"
    assert settings(recipe="default", bit_width=4)["rounding"] == "nearest"
    assert settings(recipe="best", bit_width=4, rounding="nearest")["rounding"] == "nearest"


def _tiny_settings(mapsave: Path, model: Path, name: str, **kwargs) -> dict:
    """Quantize the tiny Conv -> Gemm model as ``name`` (8 random batches, a 1 s rounding budget); its manifest's
    settings."""
    quantize({"input": [2, 3, 8, 8]}, "cpu", model, mapname=name, calib_steps=8, analysis_steps=1,
             mapsave_dir=mapsave, time_budget=1, **kwargs)
    return json.loads((mapsave / name / MANIFEST).read_text())["settings"]


def test_best_keeps_the_first_mac_at_8_bit_weights_below_8_bits(tmp_path, tiny_onnx):
    """``best`` at 4-bit weights quantizes the first MAC (``conv``) with 8-bit weights and the map's activation bits,
    recorded in the manifest's ``layer_bits`` and in its integers; ``layer_bits`` naming it, another recipe or 8-bit
    weights leave it to the map's bits."""
    def run(name: str, **kwargs) -> tuple[dict, dict]:
        return _tiny_settings(tmp_path, tiny_onnx, name, **kwargs), read_quantparams(name, tmp_path)

    settings, params = run("best", recipe="best", weight_bits=4, activation_bits=8)
    assert settings["layer_bits"] == {"conv": [8, 8]}
    conv, fc = params[weight_key("conv", "Conv")], params[weight_key("fc", "Gemm")]
    assert np.abs(conv).max() > 7 and np.abs(conv).max() <= 127 and fc.min() >= -8 and fc.max() <= 7
    settings, params = run("named", recipe="best", weight_bits=4, layer_bits={"conv": 4})
    assert settings["layer_bits"] == {"conv": [4, 4]} and np.abs(params[weight_key("conv", "Conv")]).max() <= 8
    assert run("default", recipe="default", weight_bits=4)[0]["layer_bits"] == {}
    assert run("wide", recipe="best", weight_bits=8)[0]["layer_bits"] == {}


def test_default_and_best_keep_the_outputs_at_8_bit_activations_below_8_bits(tmp_path, tiny_onnx):
    """``default`` and ``best`` below 8-bit activations write the model's outputs (the last MAC, ``fc``, and what
    follows it) at 8 bits, its weights at the map's: 4-bit logits clip and tie the top classes (benchmarks, *The
    outputs at 8 bits below 8-bit activations*). ``layer_bits`` naming it, ``first_last_bits``, ``fast`` (raw
    PPQ's choices) or 8-bit activations leave the outputs at the map's bits."""
    def run(name: str, **kwargs) -> tuple[dict, dict]:
        return _tiny_settings(tmp_path, tiny_onnx, name, **kwargs), read_quantinfo(name, tmp_path)

    settings, info = run("best", recipe="best", weight_bits=4, activation_bits=6)
    assert settings["layer_bits"] == {"conv": [8, 6], "fc": [4, 8]}
    fc = info["fc"]
    assert fc.output_bits == 8 and fc.weight_bits == 4 and info["conv"].output_bits == 6
    four = run("four", recipe="best", weight_bits=4, activation_bits=6, layer_bits={"fc": (4, 6)})[1]["fc"]
    assert four.output_bits == 6 and four.output_scale > 3 * fc.output_scale  # 64 levels against 256
    assert run("firstlast", recipe="best", bit_width=4, first_last_bits=6)[0]["layer_bits"] == {
        "conv": [6, 6], "fc": [6, 6]}
    assert run("default", recipe="default", bit_width=4)[0]["layer_bits"] == {"fc": [4, 8]}
    assert run("fast", recipe="fast", bit_width=4)[0]["layer_bits"] == {}
    assert run("wide", recipe="best", weight_bits=4, activation_bits=8)[0]["layer_bits"] == {"conv": [8, 8]}


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"rounding": "adaround"}, InvalidArgumentError, "rounding: expected one of ['nearest', 'learned'] or None, "
                                                     "got 'adaround'"),
    ({"time_budget": 0}, InvalidArgumentError, "time_budget: expected a positive finite number of seconds, got 0"),
    ({"time_budget": float("inf")}, InvalidArgumentError, "time_budget: expected a positive finite number"),
    ({"time_budget": "60"}, InvalidTypeError, "time_budget: expected None or a number of seconds, got '60' (str)"),
    ({"time_budget": True}, InvalidTypeError, "time_budget: expected None or a number of seconds, got True"),
])
def test_bad_rounding_arguments_are_refused_before_anything_is_written(tmp_path, tiny_onnx, kwargs, error, message):
    with pytest.raises(error) as info:
        quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, mapsave_dir=tmp_path, **kwargs)
    assert message in str(info.value)
    assert not (tmp_path / "m").exists()


def test_cli_rounding_options_reach_the_manifest(tmp_path, tiny_onnx, capsys):
    args = ["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "c", "--bits", "4",
            "--mapsave-dir", str(tmp_path)]
    assert main([*args, "--rounding", "learned", "--time-budget", "3"]) == 0
    settings = json.loads((tmp_path / "c" / MANIFEST).read_text())["settings"]
    assert (settings["rounding"], settings["time_budget"]) == ("learned", 3.0)
    assert main([*args, "--mapname", "d", "--time-budget", "0"]) == 2
    assert "argument --time-budget: expected a positive finite number of seconds, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_map_fitted_to_narrow_calibration_data_is_told_so(tmp_path, monkeypatch):
    """Learned rounding (W3A8) on 16 digits of one class fits them: the evalset's SNR is far below the calibration
    data's and the map says so; on varied digits the two agree and nothing is said."""
    monkeypatch.setattr(learned_rounding, "DEFAULTS", dataclasses.replace(DEFAULTS, iterations=100))
    train, labels = digits.load_split("train")
    test = digits.load_split("test")[0]
    evalset = [{"input": test[i:i + 16]} for i in range(0, 64, 16)]
    common = dict(calib_steps=8, weight_bits=3, activation_bits=8, recipe="default", rounding="learned",
                  mapsave_dir=tmp_path, evalset=evalset)
    narrow = quantize(SHAPES, "cpu", MOBILE, mapname="narrow", calibset=[{"input": train[labels == 3][:16]}] * 8,
                      **common)
    fitted = json.loads(narrow.report_path.read_text())["analysis"]["calibration_output_snr_db"]["logits"]
    assert fitted - narrow.output_snr_db["logits"] > 8  # measured 24.0 against 14.3 dB
    (warning,) = [w for w in narrow.warnings if "calibration data" in w]
    assert warning.startswith(f"output 'logits': SNR {narrow.output_snr_db['logits']:.1f} dB on evalset data but "
                              f"{fitted:.1f} dB on the calibration data: the quantization fitted its calibration "
                              "inputs")
    varied = quantize(SHAPES, "cpu", MOBILE, mapname="varied",
                      calibset=[{"input": train[i:i + 16]} for i in range(0, 128, 16)], **common)
    fitted = json.loads(varied.report_path.read_text())["analysis"]["calibration_output_snr_db"]["logits"]
    assert abs(fitted - varied.output_snr_db["logits"]) < 3 and varied.warnings == []  # 18.6 against 17.9 dB
