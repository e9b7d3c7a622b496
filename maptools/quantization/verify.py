"""``verify``: the same inputs through FP32, PPQ's simulation, onnxruntime and the integer executor.

It answers "do the artifacts say what was simulated?": per graph output and for each pair of the four
executions it reports SNR, cosine similarity, top-1 agreement (class scores only) and, between quantized
executions, the fraction of elements within one output quantization step.

The four executions are independent: one that cannot run (the integer executor lacking an operator, PPQ
failing to rebuild its graph, onnxruntime refusing ``quant_model.onnx``, the float model gone) is
recorded with the reason in :attr:`VerifyReport.failures`, the pairs involving it are marked
``not run`` (:attr:`PairMetrics.not_run`), and the other pairs are still compared.

PPQ's simulation is rebuilt from data (:func:`~maptools.quantization.replay.ppq_session`: the float model,
``ppq_state.json`` and ``quantparams.pkl``); nothing of the map is unpickled with code-executing pickle. A map
of format 1.0 keeps PPQ's graph as a pickle (``ppq_graph.pkl``) instead, which verify does not read: its PPQ
pairs are reported as not run, and the other three executions are compared.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import FloatModelMissingError, InvalidArgumentError, InvalidTypeError, UnsupportedOperatorError
from maptools.quantization import artifacts
from maptools.quantization.intmath import cosine, error_sums, snr_db
from maptools.quantization.mapinputs import map_folder_inputs, map_input_shapes  # noqa: F401 (their old home)
from maptools.quantization.reference import ReferenceExecutor
from maptools.quantization.replay import LegacyGraphError, float_model_path, replay_state, session_of
from maptools.quantization.validation import check_batches

__all__ = ["EXECUTIONS", "PairMetrics", "VerifyReport", "compare", "verify"]

logger = logging.getLogger(__name__)

#: The four executions compared, in report order.
EXECUTIONS = ("fp32", "ppq", "onnxruntime", "integer")
_QUANTIZED = {"ppq", "onnxruntime", "integer"}
#: Number of random batches when neither inputs nor a batch count are given.
DEFAULT_RANDOM_BATCHES = 2

#: What the table says of random inputs, whose FP32 vs quantized figures say little of real inputs (figures in
#: :doc:`/cli`, ``maptools verify --batches``).
RANDOM_NOTE = ("standard-normal inputs are not what the model sees, and the FP32 vs quantized figures on them can "
               "be tens of dB off those on real inputs; give real inputs (--inputs DIR, or inputs=)")

Batch = dict[str, np.ndarray]
Runner = Callable[[Batch], Mapping[str, Any]]


@dataclass
class PairMetrics:
    """Agreement of two executions on one graph output.

    Attributes:
        output: Graph output name.
        reference: Name of the reference execution.
        candidate: Name of the compared execution.
        snr_db: ``10 log10(|ref|^2 / |ref - cand|^2)`` (:func:`~maptools.quantization.intmath.snr_db`); None
            when the pair was not run.
        cosine: Cosine similarity (:func:`~maptools.quantization.intmath.cosine`, within ``[-1, 1]``, 1 for
            equal outputs); None when the pair was not run.
        top1_agreement: Fraction of samples with the same argmax along axis 1, for class-score outputs only
            (shape ``[N, C]`` with ``C > 1``); None for any other output (a detector's ``[1, 22, 2100]``, a
            segmentation map, a scalar), where an argmax along axis 1 means nothing.
        within_one_step: Fraction of elements within one output quantization step (quantized pairs only).
        not_run: None when the pair was compared; else why not: ``"<execution>: <exception type>: <message>"``
            of the execution that could not run (the first of the two when neither could).
    """

    output: str
    reference: str
    candidate: str
    snr_db: float | None
    cosine: float | None
    top1_agreement: float | None
    within_one_step: float | None
    not_run: str | None = None

    @property
    def ran(self) -> bool:
        """Whether the two executions ran and were compared."""
        return self.not_run is None


@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        mapname: The map verified.
        samples: Number of input samples (batch elements) compared.
        pairs: One :class:`PairMetrics` per output and pair of executions, those not run included.
        outputs: The raw outputs of the executions that ran: execution name -> output name -> array.
        failures: The executions that could not run: execution name -> ``"<exception type>: <message>"``.
        random_inputs: Whether the inputs were random data (no ``inputs`` given), which the table says.
        limited: The executions of :attr:`failures` that met a known limitation, not an error: an operator the
            integer executor does not support, a format-1.0 map's pickled PPQ graph.
    """

    mapname: str
    samples: int
    pairs: list[PairMetrics] = field(default_factory=list)
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    random_inputs: bool = False
    limited: list[str] = field(default_factory=list)

    @property
    def errors(self) -> dict[str, str]:
        """The failures that are errors: every one but those of :attr:`limited`.

        The integer executor lacking an operator (an LSTM) or a format-1.0 map's PPQ graph is a limitation the
        table states; PPQ failing to rebuild its graph, onnxruntime refusing ``quant_model.onnx`` or a modified
        artifact is an error, and the command line exits non-zero for it.
        """
        return {e: r for e, r in self.failures.items() if e not in self.limited}

    @property
    def ran_pairs(self) -> list[PairMetrics]:
        """The pairs that were compared."""
        return [pair for pair in self.pairs if pair.ran]

    def get(self, reference: str, candidate: str, output: str | None = None) -> PairMetrics:
        """The metrics of one pair (of the first output unless ``output`` is given).

        Raises:
            KeyError: no such pair or output.
        """
        for pair in self.pairs:
            if (pair.reference, pair.candidate) == (reference, candidate) and output in (None, pair.output):
                return pair
        raise KeyError(f"no pair {reference} vs {candidate} for output {output!r}")

    def table(self) -> str:
        """A plain-text table of every pair (full output names); pairs not run say why, the full reasons follow."""
        width = max([len("output"), *(len(p.output) for p in self.pairs)])
        lines = [f"verify {self.mapname!r} on {self.samples} samples"
                 + (f" of random data: {RANDOM_NOTE}" if self.random_inputs else ""),
                 f"{'output':{width}} {'reference':12} {'candidate':12} {'SNR dB':>8} {'cosine':>9} {'top-1':>7} "
                 f"{'<=1 step':>9}"]
        for p in self.pairs:
            if p.not_run is not None:
                reason = p.not_run if len(p.not_run) <= 72 else p.not_run[:71] + "…"
                lines.append(f"{p.output:{width}} {p.reference:12} {p.candidate:12} not run: {reason}")
                continue
            top1 = "-" if p.top1_agreement is None else f"{100 * p.top1_agreement:.1f}%"
            step = "-" if p.within_one_step is None else f"{100 * p.within_one_step:.2f}%"
            lines.append(f"{p.output:{width}} {p.reference:12} {p.candidate:12} {p.snr_db:8.2f} {p.cosine:9.5f} "
                         f"{top1:>7} {step:>9}")
        for execution, reason in self.failures.items():
            lines.append(f"{execution} could not run: {reason}")
        return "\n".join(lines)


def compare(reference: np.ndarray, candidate: np.ndarray, step: float | None = None) -> dict[str, float | None]:
    """SNR (dB), cosine, top-1 agreement and fraction within ``step`` of two arrays of the same shape.

    Args:
        reference: The reference output.
        candidate: The compared output, same shape.
        step: The output quantization step, or None to leave ``within`` out.

    Returns:
        ``{"snr_db", "cosine", "top1", "within"}``. ``top1`` (the fraction of rows with the same argmax) is
        only computed for class scores, arrays of shape ``[N, C]`` with ``C > 1``, and is None otherwise;
        ``within`` is None without ``step``.
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    signal, noise, dot, power = error_sums(r, c)
    snr = snr_db(signal, noise)
    # equal arrays (all zeros included) agree fully; otherwise no 1 + 2e-16
    cos = 1.0 if noise == 0 else min(1.0, max(-1.0, cosine(dot, signal, power)))
    top1 = float(np.mean(r.argmax(axis=1) == c.argmax(axis=1))) if r.ndim == 2 and r.shape[1] > 1 else None
    within = float(np.mean(np.abs(r - c) <= step * (1 + 1e-6) + 1e-12)) if step is not None else None
    return {"snr_db": snr, "cosine": cos, "top1": top1, "within": within}


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _check_batches(batches: int | None) -> int | None:
    if batches is None:
        return None
    if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)):
        raise InvalidTypeError(f"batches: expected a positive int or None, got {type(batches).__name__}")
    if batches <= 0:
        raise InvalidArgumentError(f"batches: expected a positive number of batches (1 or more), got {batches}")
    return check_batches(batches, "batches")


def _input_batches(inputs: Any, shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, np.dtype], seed: int,
                   batches: int | None) -> Iterator[Batch]:
    """The batches to run, checked against the map's input names and shapes (batch dimension free)."""
    names = list(shapes)
    if inputs is None:
        from maptools.quantization.calibration import random_calibset

        count = DEFAULT_RANDOM_BATCHES if batches is None else batches
        items: Iterable[Any] = ({k: v.numpy() for k, v in b.items()} for b in random_calibset(shapes, count, seed))
    elif isinstance(inputs, (Mapping, np.ndarray)) or hasattr(inputs, "numpy"):
        items = [inputs]
    elif isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise InvalidTypeError(
            f"inputs: expected a batch (dict of input name -> array, or an array), an iterable of batches or None, "
            f"got {type(inputs).__name__}")
    else:
        items = inputs
    if batches is not None:
        items = itertools.islice(items, batches)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            if len(names) != 1:
                raise InvalidArgumentError(
                    f"inputs[{index}]: a bare array was given but map inputs are {names}; give a dict of input "
                    "name -> array")
            item = {names[0]: item}
        if set(item) != set(names):
            raise InvalidArgumentError(f"inputs[{index}]: has inputs {list(item)}, expected the map's inputs {names}")
        batch: Batch = {}
        for name in names:
            value = item[name]
            array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            if array.dtype == object or array.dtype.kind not in "biuf":
                raise InvalidTypeError(f"inputs[{index}][{name!r}]: expected a numeric array, got dtype {array.dtype}")
            expected = list(shapes[name])
            if array.ndim != len(expected) or list(array.shape[1:]) != expected[1:]:
                raise InvalidArgumentError(
                    f"inputs[{index}][{name!r}]: shape {list(array.shape)}, expected {expected} (the map's input "
                    "shape; the batch dimension may differ)")
            batch[name] = np.asarray(array, dtype=dtypes.get(name, np.dtype(np.float32)), order="C")  # keeps 0-d
        yield batch


def _output_steps(quantinfo: Mapping[str, Any], output_names: Sequence[str]) -> dict[str, float | None]:
    steps: dict[str, float | None] = dict.fromkeys(output_names)
    for record in quantinfo.values():
        for tq in record.outputs:
            if tq is not None and tq.name in steps:
                steps[tq.name] = tq.scale
    return steps


def _input_dtypes(mapname: str, quant_model: bytes) -> dict[str, np.dtype]:
    """Declared input dtypes of ``quant_model.onnx`` (float32 when it cannot be read: onnxruntime will say why)."""
    import onnx

    try:
        proto = artifacts.load_quant_model(mapname, quant_model)
        dtypes = {}
        for vi in proto.graph.input:
            elem = vi.type.tensor_type.elem_type
            dtypes[vi.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)
        return dtypes
    except Exception as exc:
        logger.debug("input dtypes of %r not read from %s: %s", mapname, artifacts.QUANTMODEL, exc)
        return {}


def _loaders(contents: artifacts.MapContents, model: Path | FloatModelMissingError) -> dict[str, Callable[[], Runner]]:
    """For each execution, a function that loads it from the map's snapshot and returns its runner.

    ``model`` is the checked float model, or why it is missing (FP32 and PPQ then record that reason).
    """

    def ort_runner(model: str | bytes, per_channel_activations: bool = False) -> Runner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if per_channel_activations:  # onnxruntime 1.19 fuses DQ -> Conv -> Q of a depthwise Conv into a
            # QLinearConv, which takes one input scale and fails; its QDQ fusion is off for such a map
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda batch: dict(zip(names, session.run(names, batch), strict=True))

    def float_model() -> Path:
        if isinstance(model, FloatModelMissingError):
            raise model
        return model

    def fp32() -> Runner:
        return ort_runner(str(float_model()))

    def ppq() -> Runner:
        replay_state(contents)  # a format-1.0 map's ppq_graph.pkl is never read: its reason first
        session = session_of(contents, float_model())
        import torch

        return lambda batch: session.forward({k: torch.from_numpy(v) for k, v in batch.items()})

    def onnxruntime() -> Runner:
        return ort_runner(contents.quant_model, any(
            tq is not None and tq.axis is not None for record in contents.quantinfo.values() for tq in record.inputs))

    def integer() -> Runner:
        return ReferenceExecutor.from_files(contents.mapname, contents.files).run

    return {"fp32": fp32, "ppq": ppq, "onnxruntime": onnxruntime, "integer": integer}


def verify(mapname: str | artifacts.MapContents, inputs: Any = None, *, mapsave_dir: str | os.PathLike | None = None,
           batches: int | None = None) -> VerifyReport:
    """Run FP32, PPQ's simulation, onnxruntime on ``quant_model.onnx`` and the integer executor on the same inputs.

    Each execution runs on its own: one that fails to load or to run a batch is recorded in
    :attr:`VerifyReport.failures` with the exception's type and message, the pairs involving it carry that
    reason in :attr:`PairMetrics.not_run`, and the other pairs are still compared.

    Args:
        mapname: The map to verify, or the map already read (:func:`~maptools.quantization.read_map`).
        inputs: A batch (dict input name -> array, or an array for single-input models), an iterable of
            batches (a list, or the lazy sequence of :func:`~maptools.quantization.npy_calibset` /
            :func:`~maptools.quantization.imagefolder_calibset`), or None for random batches (standard normal,
            the shapes of the map). Arrays are cast to the input types of ``quant_model.onnx``; their shapes
            must be the map's input shapes, the batch dimension excepted.
        mapsave_dir: The mapsave directory.
        batches: With ``inputs``, use at most this many batches (default: all); without, the number of random
            batches (default 2).

    Returns:
        The per-output metrics of every pair of executions.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file of the map is missing, modified or unreadable, or the float model it records is
            there but unsafe to read (not a regular file, too large, external data outside its folder): raised
            before anything runs. A float model moved away or changed only skips FP32 and PPQ.
        InvalidArgumentError: ``batches`` is not positive, or a batch has other input names or shapes than the
            map.
        InvalidTypeError: ``inputs`` or ``batches`` has the wrong type.
    """
    batches = _check_batches(batches)
    contents = artifacts.map_contents(mapname, mapsave_dir)  # every file of one map, read once
    mapname, quantinfo, manifest = contents.mapname, contents.quantinfo, contents.manifest
    try:  # a crafted model (a FIFO, a device, too large...) raises here, before anything runs
        model: Path | FloatModelMissingError = float_model_path(mapname, manifest, contents.directory)
    except FloatModelMissingError as exc:  # moved away or changed: FP32 and PPQ are skipped with the reason
        model = exc
    shapes = manifest["settings"]["input_shapes"]
    data = _input_batches(inputs, shapes, _input_dtypes(mapname, contents.quant_model),
                          int(manifest["settings"]["seed"]) + 1, batches)
    failures: dict[str, str] = {}
    limited: list[str] = []
    runners: dict[str, Runner] = {}
    runs: dict[str, dict[str, list[np.ndarray]]] = {}

    def fail(execution: str, exc: Exception, when: str) -> None:
        failures[execution] = _reason(exc)
        if isinstance(exc, (UnsupportedOperatorError, LegacyGraphError)):
            limited.append(execution)
        runners.pop(execution, None)
        runs.pop(execution, None)
        # INFO, not WARNING: the report carries the failure (VerifyReport.failures, table), the log only traces it
        logger.info("verify %r: %s could not run (%s): %s", mapname, execution, when, failures[execution])
        logger.debug("%s failed", execution, exc_info=True)

    for execution, load in _loaders(contents, model).items():
        try:
            runners[execution] = load()
            runs[execution] = {}
        except Exception as exc:  # any failure of one execution: recorded, the others go on
            fail(execution, exc, "loading")
    samples = 0
    for index, batch in enumerate(data):
        first = next((v for v in batch.values() if v.ndim > 0), None)
        samples += 1 if first is None else int(first.shape[0])
        for execution, run in list(runners.items()):
            try:
                for name, value in run(batch).items():
                    runs[execution].setdefault(name, []).append(np.asarray(value))
            except Exception as exc:
                fail(execution, exc, f"batch {index}")
    if samples == 0:
        raise InvalidArgumentError("inputs: holds no batch; expected at least one batch of the map's inputs")
    merged = {e: {n: np.concatenate(v) if v[0].ndim else np.stack(v) for n, v in outs.items()}
              for e, outs in runs.items()}
    names = list(dict.fromkeys(name for outs in merged.values() for name in outs))
    steps = _output_steps(quantinfo, names)
    report = VerifyReport(mapname=mapname, samples=samples, outputs=merged, failures=failures,
                          random_inputs=inputs is None, limited=limited)
    for name in names:
        for ref, cand in itertools.combinations(EXECUTIONS, 2):
            missing = next((e for e in (ref, cand) if e not in merged or name not in merged[e]), None)
            if missing is not None:
                reason = failures.get(missing, f"no output {name!r}")
                report.pairs.append(PairMetrics(name, ref, cand, None, None, None, None, f"{missing}: {reason}"))
                continue
            if merged[ref][name].shape != merged[cand][name].shape:
                report.pairs.append(PairMetrics(
                    name, ref, cand, None, None, None, None,
                    f"{cand}: output {name!r} has shape {list(merged[cand][name].shape)}, {ref} "
                    f"{list(merged[ref][name].shape)}"))
                continue
            step = steps[name] if {ref, cand} <= _QUANTIZED else None
            m = compare(merged[ref][name], merged[cand][name], step)
            report.pairs.append(PairMetrics(name, ref, cand, m["snr_db"], m["cosine"], m["top1"], m["within"]))
    if not names:  # nothing ran at all: one row per pair says why
        for ref, cand in itertools.combinations(EXECUTIONS, 2):
            reason = failures.get(ref, "no graph output")
            report.pairs.append(PairMetrics("-", ref, cand, None, None, None, None, f"{ref}: {reason}"))
    logger.info("%s", report.table())
    return report
