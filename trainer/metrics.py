"""Where metrics go: tensorboardX events, ``metrics.jsonl``, and a progress bar or log lines."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


LOG_NAMES = ("metrics.jsonl", "tensorboard")


class MetricsLogger:
    """Writes each logged step to tensorboard and ``metrics.jsonl``; shows progress.

    A run starting at ``start_step`` (resumed from that checkpoint) first drops what an
    interrupted attempt logged after it: records past ``start_step`` leave ``metrics.jsonl``,
    and tensorboard hides events from ``start_step + 1`` on (``purge_step``), so each step is
    logged once. A tqdm bar is shown when stderr is a terminal, plain log lines otherwise.
    With ``primary=False`` (every process but the first of a multi-process run) nothing is
    written or shown: one process speaks for the run.
    """

    def __init__(self, workdir: Path, total_steps: int, start_step: int = 0, stream=None,
                 primary: bool = True):
        self.primary = primary
        self.stream = stream or sys.stderr
        self.writer, self.jsonl = None, None
        if primary:
            events = workdir / "tensorboard"
            purge = start_step + 1 if events.is_dir() and any(events.iterdir()) else None
            self.writer = _summary_writer()(str(events), purge_step=purge)
            _drop_records_after(workdir / "metrics.jsonl", start_step)
            self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.interactive = primary and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True)
            if self.interactive else None
        )
        self.total_steps = total_steps
        self._start = time.time()

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """Records ``metrics`` (floats) at ``step`` under ``prefix`` (``train`` or ``eval``)."""
        if not self.primary:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for key, value in clean.items():
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        record = {"step": step, **clean} if prefix == "train" else {"step": step, **{f"eval_{k}": v for k, v in clean.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in clean.items())
        if self.bar is not None:
            self.bar.set_postfix_str(shown if prefix == "train" else f"eval {shown}")
        else:
            self.print(f"[{prefix} step {step}/{self.total_steps}] {shown}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def print(self, text: str) -> None:
        if not self.primary:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def flush(self) -> None:
        """Writes pending tensorboard events to disk (``metrics.jsonl`` is flushed per line)."""
        if self.primary:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.primary:
            self.writer.close()
            self.jsonl.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites ``path`` (atomically) without its records past ``step`` and any torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:  # the line an interrupted write left unfinished
            continue
        if line.endswith("\n") and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def move_logs_aside(workdir: Path) -> Path | None:
    """Moves ``metrics.jsonl`` and ``tensorboard/`` into ``workdir/logs.old-<time>/``; returns it."""
    found = [workdir / name for name in LOG_NAMES if (workdir / name).exists()]
    if not found:
        return None
    aside, n = workdir / f"logs.old-{time.strftime('%Y%m%d-%H%M%S')}", 1
    while aside.exists():
        aside, n = workdir / f"logs.old-{time.strftime('%Y%m%d-%H%M%S')}.{n}", n + 1
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    return aside


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _summary_writer():
    """tensorboardX's ``SummaryWriter``, imported without torch unless torch is already loaded:
    tensorboardX imports torch when it is installed (seconds per process, for the tensors we
    never log: only numbers go to the events)."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # ``import torch`` raises ImportError, which tensorboardX allows
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
