"""The documentation's Python examples run as written (blocks marked ``needs-files``/``needs-gpu`` excepted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^\.\. code-block:: python\n((?:[ \t]+:[\w-]+:.*\n)*)\n((?:(?:[ \t]+.*)?\n)+)", re.MULTILINE)


def runnable_blocks(page: Path) -> list[str]:
    blocks = []
    for options, body in BLOCK.findall(page.read_text()):
        if ":class:" in options and ("needs-files" in options or "needs-gpu" in options):
            continue
        blocks.append(textwrap.dedent(body))
    return blocks


PAGES = sorted(p for p in DOCS.glob("*.rst") if runnable_blocks(p))


def test_pages_with_examples_exist():
    assert {p.name for p in PAGES} >= {"guide.rst", "results.rst"}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_examples_run(page, tmp_path):
    script = "\n\n".join(runnable_blocks(page))
    (tmp_path / "examples.py").write_text(script)
    env = dict(os.environ, MAPTOOLS_MAPSAVE=str(tmp_path / "mapsave"), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, f"{page.name}:\n{proc.stderr[-3000:]}"
