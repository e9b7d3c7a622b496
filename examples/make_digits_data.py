"""Write ``maptools/examples/data/digits.npz``, the digits split the package ships (needs scikit-learn).

scikit-learn's 8x8 digits (a copy of the UCI "Optical Recognition of Handwritten Digits" test set,
CC BY 4.0) are split with ``train_test_split(test_size=0.3, random_state=0, stratify=labels)``; pixels
``0..16`` become 8-bit values ``round(v * 255 / 16)``. The file holds ``train_images`` (1257, 8, 8),
``train_labels``, ``test_images`` (540, 8, 8) and ``test_labels``, all uint8, so that
:mod:`maptools.examples.digits` and ``maptools demo`` work without scikit-learn.

Usage::

    python examples/make_digits_data.py --out maptools/examples/data/digits.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    from maptools.examples import digits
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from maptools.examples import digits


def sklearn_split() -> dict[str, np.ndarray]:
    """The train/test split of scikit-learn's digits as uint8 pixels and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images.astype(np.float64) * 255.0 / 16).astype(np.uint8)
    labels = data.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.3, random_state=0,
                                                        stratify=labels)
    return {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=digits.DATA_PATH)
    args = parser.parse_args(argv)
    np.savez_compressed(args.out, **sklearn_split())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
