"""The README's examples run, and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "pip install -e '.[test]' && pytest -n auto" in text
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[test]' && pytest -n auto" in ci


#: The URL of the README's PostgreSQL examples, replaced by the test server's.
README_URL = "postgresql://agent:secret@db.internal/agents"


def run_block(block: str) -> None:
    expected = [m.group(1).strip() for m in re.finditer(r"print\(.*\)\s+# (.*)", block)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue().splitlines() == expected


def test_readme_postgresql_examples_run_and_print_what_they_say(pg_url):
    blocks = [b for b in python_blocks() if README_URL in b]
    assert blocks
    for block in blocks:
        run_block(block.replace(README_URL, pg_url))


def test_readme_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in python_blocks() if README_URL not in b]
    assert blocks
    for block in blocks:
        run_block(block)
