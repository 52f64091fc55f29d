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


SHELL = re.compile(r"^(<!--[^\n]*-->)?\n?```(?:bash|sh)\n(.*?)^```", re.S | re.M)
RUN_BY = re.compile(r"<!-- run by (tests/[\w/]+\.py) -->")
NOT_RUN = re.compile(r"<!-- not run by the tests: .+ -->")
SCRIPT = re.compile(r"python (scripts/\w+\.py)((?: [^\s\\]+| ?\\\n\s*)*)")


def shell_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
    """``(marker comment or "", commands)`` of each shell block of a Markdown file."""
    return [(m.group(1) or "", m.group(2)) for m in SHELL.finditer(path.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if shell_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_block_is_run_by_a_test_or_says_why_not(page):
    """A shell block is preceded by ``<!-- run by tests/x.py -->`` (a test module that runs
    the scripts it calls), ``<!-- not run by the tests: why -->``, or the test-command marker
    (CI runs it). Either way its ``scripts/train.py`` and ``scripts/plan.py`` commands name a
    config and keys that load (placeholder paths such as ``path/to/...`` aside), and its
    benchmark commands a suite that exists."""
    from trainer import load_config

    for marker, commands in shell_blocks(page):
        run_by = RUN_BY.fullmatch(marker)
        assert run_by or NOT_RUN.fullmatch(marker) or marker == "<!-- test-command -->", (
            f"{page.name}: a shell block without a marker:\n{commands}")
        for script, args in SCRIPT.findall(commands):
            assert (ROOT / script).is_file(), (page.name, script)
            if run_by:
                test_source = (ROOT / run_by.group(1)).read_text()
                assert pathlib.Path(script).stem in test_source, (page.name, marker, script)
            words = args.replace("\\\n", " ").split()
            if script in ("scripts/train.py", "scripts/plan.py"):
                config = words[words.index("--config") + 1]
                overrides = [w for w in words if "=" in w and "path/to" not in w]
                load_config(config, overrides)
            if script == "scripts/benchmark.py":
                from benchmarks.suites import SUITES

                assert words[words.index("--suite") + 1] in SUITES, (page.name, words)
