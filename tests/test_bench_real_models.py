"""The corpus bench's recipe names: which layers a ``+...8`` suffix keeps at 8 bits."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import real_models  # noqa: E402

from maptools.quantization.model import first_and_last_macs  # noqa: E402

_MODEL = Path(real_models.__file__).resolve().parents[1] / "maptools" / "examples" / "data" / "digits_mobile.onnx"


@pytest.mark.parametrize(("suffix", "end", "both"), [("+first8", 0, None), ("+last8", -1, None),
                                                    ("+firstlast8", None, 8), ("", None, None)])
def test_a_suffix_keeps_the_first_or_last_mac_at_8_bits(suffix, end, both):
    proto = onnx.load(_MODEL)
    ends = first_and_last_macs(proto)
    assert len(ends) == 2 and ends[0] != ends[1]
    recipe, layer_bits, first_last_bits = real_models.kept_at_8(f"best:learned:seed=1{suffix}", proto)
    assert recipe == "best:learned:seed=1"
    assert layer_bits == (None if end is None else {ends[end]: 8})
    assert first_last_bits == both


def test_a_recipes_seed_reaches_quantize():
    """``RoundingSettings.seed`` is replaced by quantize's seed: a recipe's ``seed=`` must reach quantize."""
    assert real_models.recipe_parts("best:learned:seed=2:iterations=50") == ("best", "learned", {"iterations": 50}, 2)
    assert real_models.recipe_parts("default") == ("default", None, {}, 0)
