"""Where metrics go: tensorboardX events, ``metrics.jsonl``, and a progress bar or log lines."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLogger:
    """Writes each logged step to tensorboard and ``metrics.jsonl``; shows progress.

    A tqdm bar is shown when stderr is a terminal, plain log lines otherwise (CI, files).
    """

    def __init__(self, workdir: Path, total_steps: int, start_step: int = 0, stream=None):
        from tensorboardX import SummaryWriter

        self.stream = stream or sys.stderr
        self.writer = SummaryWriter(str(workdir / "tensorboard"))
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True)
            if self.interactive else None
        )
        self.total_steps = total_steps
        self._start = time.time()

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """Records ``metrics`` (floats) at ``step`` under ``prefix`` (``train`` or ``eval``)."""
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
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
