"""Per-channel activation scales for a tensor only depthwise Convs read (``engine.channelwise``, format 2.2).

A Conv -> hard-swish (``x * HardSigmoid(x)``) -> depthwise Conv -> 1x1 Conv block whose hard-swish output has
channel peaks spread 1000x, the depthwise weights undoing the spread (as the layout detector's folded BatchNorm
does): the rule gives that tensor one scale per channel, recorded in quantinfo and quantized along axis 1 in the
QDQ model, the integer executor equals onnxruntime on it to the bit, and the output SNR rises by a stated margin.
A map without such a tensor is the same bytes with the rule on and off.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from test_hardswish import _feeds, _image_model  # the same 3x16x16 image block and feeds

from maptools.quantization import quantize, read_quantinfo, verify
from maptools.quantization.engine.channelwise import SPREAD_RATIO, channel_scales, spread
from maptools.quantization.inspection import inspect_map, listing_json, listing_table
from maptools.quantization.intmath import snr_db_of
from maptools.quantization.records import TensorQuant

pytestmark = pytest.mark.stack  # also run on the oldest supported stack (make test): onnxruntime 1.19's QDQ fusion

CHANNELS = 8
#: Channel gains of the first Conv: peaks spread 1000x (the layout detector's first depthwise input: 0.09 to 45).
SPREAD = np.geomspace(0.01, 10.0, CHANNELS).astype(np.float32)
#: A block without the spread: the rule must leave its map as it was.
EVEN = np.linspace(1.0, 2.0, CHANNELS).astype(np.float32)


def _block(gains: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.3, (CHANNELS, 3, 3, 3)).astype(np.float32) * gains[:, None, None, None]
    w1 = rng.normal(0, 0.3, (CHANNELS, 1, 3, 3)).astype(np.float32) / gains[:, None, None, None]
    inits = {"w0": w0, "b0": (0.1 * gains).astype(np.float32), "w1": w1,
             "b1": rng.normal(0, 0.1, CHANNELS).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, CHANNELS, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["image", "w0", "b0"], ["c0"], name="Conv.0", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c0"], ["gate"], name="Gate.0", alpha=1.0 / 6.0, beta=0.5),
        helper.make_node("Mul", ["c0", "gate"], ["hs0"], name="HardSwish.0"),
        helper.make_node("Conv", ["hs0", "w1", "b1"], ["c1"], name="Depthwise.1", pads=[1, 1, 1, 1],
                         group=CHANNELS),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu.1"),
        helper.make_node("Conv", ["r1", "w2"], ["out"], name="Conv.2"),
    ]
    return _image_model(nodes, inits, "depthwise_block")


def _run(model: onnx.ModelProto | str, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime 1.19 (the oldest stack) fuses the depthwise Conv of a per-channel input into a QLinearConv,
    # which takes one input scale (verify does the same for such a map)
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _quantized(model: onnx.ModelProto, tmp_path, mapname: str, **options):
    path = tmp_path / f"{mapname}.onnx"
    onnx.save(model, str(path))
    maps = str(tmp_path / "maps")
    result = quantize({"image": [1, 3, 16, 16]}, "cpu", str(path), mapname=mapname, calibset=_feeds(16, 2),
                      calib_steps=16, weight_bits=8, activation_bits=8, mapsave_dir=maps, **options)
    return result, maps


def test_channel_scales_are_never_coarser_than_the_tensor_scale() -> None:
    low = np.array([-0.375, -0.375, 0.0, -0.09])
    high = np.array([40.0, 0.5, 0.0, 0.02])
    scale, tiny = 40.375 / 255, np.finfo(np.float32).tiny
    scales, offsets = channel_scales(low, high, scale, 2.0, 0, 255)
    np.testing.assert_allclose(scales, [scale, 0.875 / 255, tiny, 0.11 / 255], rtol=1e-6)
    np.testing.assert_array_equal(offsets, [2.0, 109.0, 0.0, 209.0])  # the large channel keeps the tensor's
    signed, zero = channel_scales(low, high, 0.25, 0.0, -127, 127)
    np.testing.assert_allclose(signed, [0.25, 0.5 / 127, tiny, 0.09 / 127], rtol=1e-6)
    assert not zero.any()
    shifts, _ = channel_scales(low, high, 0.25, 0.0, -127, 127, power_of_two=True)
    np.testing.assert_array_equal(shifts[[0, 1, 3]], [0.25, 2.0 ** -7, 2.0 ** -10])
    assert spread(low[:2], high[:2]) == pytest.approx(40.375 / 0.875)
    assert spread(low[2:3], high[2:3]) == float("inf")


def test_depthwise_input_gets_per_channel_scales_and_the_map_agrees(tmp_path) -> None:
    """The spread tensor's record has one scale per channel; onnxruntime on the QDQ model and the integer
    executor give the same integers; the output SNR is at least 20 dB higher than with one scale per tensor
    (measured: 29.3 dB against 3.5 dB)."""
    model = _block(SPREAD)
    result, maps = _quantized(model, tmp_path, "channels")
    info = read_quantinfo("channels", maps)
    tq = info["Depthwise.1"].inputs[0]
    assert tq.axis == 1 and tq.scale.shape == (CHANNELS,) and tq.zero_point.shape == (CHANNELS,)
    assert tq.scale.max() / tq.scale.min() > 100  # the small channels got a much finer step
    produced = info["HardSwish.0"].outputs[0]
    np.testing.assert_array_equal(produced.scale, tq.scale)
    np.testing.assert_allclose(info["Depthwise.1"].bias_scale, tq.scale * info["Depthwise.1"].weight_scale, rtol=1e-5)
    assert all(t is None or t.axis is None for name, record in info.items() if name != "Depthwise.1"
               and name != "HardSwish.0" for t in [*record.inputs, *record.outputs])
    qdq = onnx.load(str(result.model_path))
    axes = [next(a.i for a in node.attribute if a.name == "axis") for node in qdq.graph.node
            if node.op_type == "QuantizeLinear" and any(a.name == "axis" for a in node.attribute)]
    assert axes == [1]
    manifest = (tmp_path / "maps" / "channels" / "manifest.json").read_text()
    assert '"format_version": "2.2"' in manifest
    spreads = json.loads((tmp_path / "maps" / "channels" / "report.json").read_text())["channel_scales"]
    assert list(spreads) == ["hs0"] and spreads["hs0"] > SPREAD_RATIO
    listing = json.loads(listing_json(inspect_map("channels", maps)))  # maptools inspect --json
    row = next(row for row in listing["operators"] if row["node"] == "Depthwise.1")
    assert row["input_scale"] == [float(v) for v in tq.scale]
    assert "Depthwise.1" in listing_table(inspect_map("channels", maps))
    report = verify("channels", _feeds(4, 4), mapsave_dir=maps)
    assert report.failures == {}
    np.testing.assert_array_equal(report.outputs["integer"]["out"], report.outputs["onnxruntime"]["out"])
    assert report.get("ppq", "onnxruntime").within_one_step >= 0.999, report.table()

    held_out = _feeds(16, 3)
    reference = _run(model, held_out)
    with_rule = snr_db_of(reference, _run(str(result.model_path), held_out))
    plain, _ = _quantized(model, tmp_path, "per_tensor", channel_activations=False)
    without = snr_db_of(reference, _run(str(plain.model_path), held_out))
    assert with_rule >= without + 20.0, (with_rule, without)
    assert '"channel_activations": false' in (tmp_path / "maps" / "per_tensor" / "manifest.json").read_text()


def test_a_map_without_spread_depthwise_inputs_is_unchanged(tmp_path) -> None:
    """With channel ranges spread less than SPREAD_RATIO, the rule on and off write the same bytes."""
    model = _block(EVEN)
    on, maps = _quantized(model, tmp_path, "on")
    off, _ = _quantized(model, tmp_path, "off", channel_activations=False)
    for name in ("quantinfo.pkl", "quantparams.pkl", "quant_model.onnx", "ppq_state.json"):
        assert (on.directory / name).read_bytes() == (off.directory / name).read_bytes(), name
    assert '"format_version": "2.0"' in (on.directory / "manifest.json").read_text()
    assert "channel_activations" not in (on.directory / "manifest.json").read_text()
    assert "channel_scales" not in json.loads((on.directory / "report.json").read_text())
    assert float(EVEN.max() / EVEN.min()) < SPREAD_RATIO


def test_a_per_tensor_record_pickles_as_before() -> None:
    tq = TensorQuant(name="x", bits=8, scale=0.5, zero_point=0, qmin=-128, qmax=127)
    state = pickle.loads(pickle.dumps(tq)).__dict__
    assert "axis" in state and state["axis"] is None
    assert "axis" not in tq.__getstate__()
    per_channel = TensorQuant(name="x", bits=8, scale=np.ones(3, np.float32), zero_point=np.zeros(3, np.int32),
                              qmin=0, qmax=255, axis=1)
    assert pickle.loads(pickle.dumps(per_channel)).axis == 1


def test_no_per_channel_scales_on_a_crossbar(tmp_path) -> None:
    """With ``cim=`` the rule is off (the crossbar takes one input scale per MAC); a map holding per-channel
    records is refused on a crossbar by the integer executor, naming ``cim``."""
    from maptools import UnsupportedOperatorError
    from maptools.quantization import CIMSpec, simulate

    model = _block(SPREAD)
    spec = CIMSpec.parse("rows=64,cell_bits=2,dac_bits=1")
    crossbar, maps = _quantized(model, tmp_path, "crossbar", cim=spec)
    info = read_quantinfo("crossbar", maps)
    assert info["Depthwise.1"].inputs[0].axis is None
    assert '"format_version": "2.1"' in (crossbar.directory / "manifest.json").read_text()
    _quantized(model, tmp_path, "channels")
    with pytest.raises(UnsupportedOperatorError, match="^cim: .*'Depthwise.1'.*channel_activations=False"):
        simulate("channels", _feeds(1, 4)[0], mapsave_dir=maps, cim=spec)


@pytest.mark.parametrize("options", [{"power_of_two": True}, {"symmetrical": False}], ids=["power_of_two", "asym"])
def test_per_channel_scales_with_power_of_two_and_asymmetric_maps(tmp_path, options) -> None:
    """Power-of-two scales stay powers of two per channel; both maps run to the bit in onnxruntime and the
    integer executor."""
    _quantized(_block(SPREAD), tmp_path, "variant", **options)
    maps = str(tmp_path / "maps")
    tq = read_quantinfo("variant", maps)["Depthwise.1"].inputs[0]
    assert tq.axis == 1 and tq.scale.max() / tq.scale.min() > 100
    if options.get("power_of_two"):
        exponents = np.log2(tq.scale.astype(np.float64))
        np.testing.assert_array_equal(exponents, np.round(exponents))
    report = verify("variant", _feeds(2, 4), mapsave_dir=maps)
    assert report.failures == {}
    np.testing.assert_array_equal(report.outputs["integer"]["out"], report.outputs["onnxruntime"]["out"])
