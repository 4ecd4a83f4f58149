"""Every Python block of the README and of the docs/ pages it links runs as written (as a script, on CPU, with the
shipped model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


BLOCKS = [(f"{page.relative_to(ROOT)}:block{i}", code) for page in PAGES for i, code in enumerate(python_blocks(page))]


def test_readme_has_python_blocks():
    # The README keeps the offline LLM(...) example; the CFG and text-to-image examples moved to docs/serving.md and
    # docs/t2i.md with their explanations, and run here from there.
    assert len(python_blocks(ROOT / "README.md")) >= 1
    assert len(python_blocks(ROOT / "docs" / "serving.md")) >= 1
    assert len(python_blocks(ROOT / "docs" / "t2i.md")) >= 1
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_readme_python_block_runs(code, tmp_path):
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    # As a user runs it: none of the test suite's vLLM settings (conftest.py) leak into the script.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TORCHDYNAMO_DISABLE", "VLLM_CPU_KVCACHE_SPACE")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
