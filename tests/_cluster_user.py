"""A user's Trainer for the cluster tests: its own dataset with ``batch_rows``, calls recorded.

``RecordingTrainer`` trains the registry's tiny GPT on a dataset of its own that records every
call (which process, which method, which rows) in ``<workdir>/calls/``. On a cluster, with
``FAIL_SAVE_ON`` set to an attempt number, that attempt's first save stops: each worker writes
``<workdir>/at-save-<process>`` (the step) and waits for ``<workdir>/peer-killed``, then the
survivor's save raises a ``CheckpointError`` (a save failing while a peer dies).

Run as a script: ``python tests/_cluster_user.py <config> <override>...``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallel  # noqa: E402
from parallel import cluster  # noqa: E402
from trainer import Trainer, load_config  # noqa: E402
from trainer.data import TokenDataset  # noqa: E402

FAIL_SAVE_ON = "SHARDAX_TEST_FAIL_SAVE_ON_ATTEMPT"


class RecordingTokens:
    """Windows of a fixed random token stream; ``batch`` and ``batch_rows`` log their calls."""

    def __init__(self, calls_dir: str, stream: int, seq_len: int):
        tokens = np.random.default_rng([5, stream]).integers(0, 256, size=2**16).astype(np.int32)
        self.data = TokenDataset(tokens, seq_len, seed=stream)
        self.calls_dir, self.stream = calls_dir, stream

    def _record(self, *call) -> None:
        import jax

        info = cluster.worker_info()
        attempt = info.attempt if info is not None else 0
        path = Path(self.calls_dir) / f"stream{self.stream}-process{jax.process_index()}-attempt{attempt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(call) + "\n")

    def batch(self, index: int, batch_size: int) -> dict:
        self._record("batch", index, batch_size)
        return self.data.batch(index, batch_size)

    def batch_rows(self, index: int, batch_size: int, rows: slice) -> dict:
        self._record("batch_rows", index, batch_size, rows.start, rows.stop)
        return self.data.batch_rows(index, batch_size, rows)


class RecordingTrainer(Trainer):
    def train_data(self):
        import jax

        if cluster.worker_info() is not None:  # what reached the worker from the driver
            seen = {k: os.environ.get(k) for k in ("NCCL_DEBUG", "XLA_FLAGS", FAIL_SAVE_ON)}
            (self.workdir / f"environment-{jax.process_index()}.json").write_text(json.dumps(seen))
        return RecordingTokens(str(self.workdir / "calls"), 0, self.config.data.seq_len)

    def eval_data(self):
        return RecordingTokens(str(self.workdir / "calls"), 1, self.config.data.seq_len)

    def save(self, step, metrics):
        info = cluster.worker_info()
        if info is not None and str(info.attempt) == os.environ.get(FAIL_SAVE_ON):
            import jax

            (self.workdir / f"at-save-{jax.process_index()}").write_text(str(step))
            deadline = time.monotonic() + 300
            while not (self.workdir / "peer-killed").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            raise parallel.CheckpointError(f"injected: saving step {step} failed (a peer died)")
        super().save(step, metrics)


if __name__ == "__main__":
    RecordingTrainer(load_config(sys.argv[1], sys.argv[2:])).fit()
