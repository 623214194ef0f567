"""The Python examples in the README and in docs/ run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_run(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks or page.parent.name == "docs", f"{page.name} has no python example"
    for code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "docs_example"})
