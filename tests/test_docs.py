"""Every ```python block of README.md and docs/*.md runs, so the examples cannot drift.

The blocks of one file run in order in one namespace (a page reads top to bottom, like a
notebook: a later block may use what an earlier one defined), in a fresh working directory so
their ``runs/`` outputs land in a temporary folder. Nothing is skipped: a block that cannot run
on its own must be preceded on its page by a setup block. After a page, every training run it
wrote must show a falling loss.
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(first line number, source)`` of each ```python block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_pages_hold_the_examples_this_file_is_meant_to_run():
    counts = {p.name: len(python_blocks(p)) for p in PAGES}
    assert counts["README.md"] == 1  # MyTrainer
    assert counts["parallel.md"] == 1  # parallelize on any pytree
    assert counts["alpa_vs_pmap.md"] == 3  # setup, pmap, parallelize


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for line, source in python_blocks(page):
        code = compile("\n" * (line - 1) + source, str(page), "exec")  # tracebacks: page lines
        exec(code, namespace)
    for log in sorted(tmp_path.rglob("metrics.jsonl")):
        losses = [record["loss"] for record in map(json.loads, log.read_text().splitlines())
                  if "loss" in record]
        assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], (log, losses)
