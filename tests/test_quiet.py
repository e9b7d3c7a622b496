"""A library keeps quiet: no PPQ banner, progress bars, prints or CUDA warnings on stdout/stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_quantize_prints_nothing(tiny_onnx, tmp_path):
    script = textwrap.dedent(f"""
        from maptools.quantization import quantize, read_quantinfo
        quantize({{"input": [2, 3, 8, 8]}}, "cpu", {str(tiny_onnx)!r}, mapname="q", calib_steps=8, bit_width=4,
                 mapsave_dir={str(tmp_path)!r})
        assert read_quantinfo("q", {str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout[-500:], proc.stderr[-500:])


def test_ppq_output_goes_to_debug_log(tiny_onnx, tmp_path):
    script = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(name)s|%(message)s")
        from maptools.quantization import quantize
        quantize({{"input": [2, 3, 8, 8]}}, "cpu", {str(tiny_onnx)!r}, mapname="q", calib_steps=8,
                 mapsave_dir={str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "maptools.ppq|" in proc.stderr and "maptools.quantization.api|quantizing" in proc.stderr
