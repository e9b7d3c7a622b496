"""The import bridges that let PPQ 0.6.6 run on today's onnx and protobuf (maptools.quantization.engine.compat).

Each check runs in a fresh interpreter, where nothing has imported PPQ yet, so it sees exactly what importing
maptools' engine leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from maptools.quantization.engine.compat import (
    caffe_pb2_needs_bridge,
    onnx_mapping_needs_bridge,
    ppq_import_bridges,
    tensor_type_to_np_type,
)

pytestmark = pytest.mark.stack

#: onnx < 1.16's ``mapping.TENSOR_TYPE_TO_NP_TYPE`` for the element types a CNN's Cast may name.
OLD_TABLE = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
             9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, 16: np.float32}


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter (no PROTOCOL_BUFFERS_* variable) and return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOCOL_BUFFERS")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_STATE = """
    import json, os, sys
    import onnx
    from google.protobuf import descriptor_pool
    from google.protobuf.internal import api_implementation
    def caffe_registered():
        try:
            descriptor_pool.Default().FindFileByName('caffe.proto')
            return True
        except KeyError:
            return False
    def state():
        return {'onnx_mapping_attr': 'mapping' in vars(onnx), 'onnx_mapping_module': 'onnx.mapping' in sys.modules,
                'caffe_module': 'ppq.parser.caffe.ppl_caffe_pb2' in sys.modules, 'caffe_pool': caffe_registered(),
                'backend': api_implementation.Type(),
                'env': os.environ.get('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION')}
"""


def test_engine_import_leaves_no_global_trace() -> None:
    result = _fresh(_STATE + """
    before = state()
    import maptools.quantization.engine
    import ppq.parser.onnx_parser as parser
    from ppq.parser import caffe_exporter
    try:
        caffe_exporter.ppl_caffe_pb2.NetParameter()
        caffe = 'usable'
    except ImportError as exc:
        caffe = type(exc).__name__ + ': ' + str(exc)
    print(json.dumps({'before': before, 'after': state(), 'float': str(parser.mapping.TENSOR_TYPE_TO_NP_TYPE[1]),
                      'caffe': caffe}))
    """)
    before, after = result["before"], result["after"]
    assert not after["onnx_mapping_attr"] or before["onnx_mapping_attr"], "onnx.mapping left behind"
    assert after["onnx_mapping_module"] == before["onnx_mapping_module"]
    assert after["backend"] == before["backend"], "protobuf backend changed"
    assert after["env"] is None
    assert result["float"] == "float32"  # PPQ's parser still reads its table
    if caffe_pb2_needs_bridge():
        assert not after["caffe_module"] and not after["caffe_pool"], "stand-in or caffe.proto left in protobuf"
        assert result["caffe"].startswith("CaffeUnavailableError: PPQ's Caffe support cannot be used")


def test_no_trace_after_a_quantization(tmp_path) -> None:
    result = _fresh(_STATE + f"""
    import maptools
    from maptools.examples import digits
    from maptools.quantization import quantize
    quantize({{'input': [16, 1, 8, 8]}}, 'cpu', digits.MODEL_PATH, mapname='d', calib_steps=8, bit_width=4,
             mapsave_dir={str(tmp_path)!r}, recipe='fast', analysis_steps=1)
    print(json.dumps(state()))
    """)
    assert result["onnx_mapping_attr"] is (not onnx_mapping_needs_bridge())
    assert result["onnx_mapping_module"] is (not onnx_mapping_needs_bridge())
    assert result["env"] is None
    assert not result["caffe_pool"] or not caffe_pb2_needs_bridge()


def test_bridges_are_scoped_to_the_block() -> None:
    had_mapping, needed = "mapping" in vars(onnx), onnx_mapping_needs_bridge()
    with ppq_import_bridges() as installed:
        if needed:
            assert "onnx.mapping" in installed
            from onnx import mapping  # what PPQ's parser does

            assert mapping.TENSOR_TYPE_TO_NP_TYPE[7] == np.int64
    assert ("mapping" in vars(onnx)) is had_mapping
    if needed:
        assert "onnx.mapping" not in sys.modules


def test_tensor_type_table_matches_old_onnx() -> None:
    table = tensor_type_to_np_type()
    for elem_type, dtype in OLD_TABLE.items():
        assert table[elem_type] == np.dtype(dtype), onnx.TensorProto.DataType.Name(elem_type)
