"""How long a cluster run takes to recover from a lost worker, with and without JAX's
persistent compilation cache.

``python scripts/restart_time.py --config gpt.yaml cluster.num_hosts=2 cluster.devices_per_host=4``
trains in a fresh workdir, kills worker 1 (SIGKILL) once step ``--kill-after`` is committed,
and measures from the driver's "restarting the workers" line to the first step the restarted
workers log (they resume from that checkpoint); once with ``cluster.compilation_cache=false``
and once with ``true`` (the restarted attempt then finds what the first attempt compiled in
``workdir/compile-cache``). Add ``cluster.address=auto`` (and the other ``cluster.*`` keys) to
measure on a running cluster whose nodes share /tmp.
"""
import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def restart_seconds(config: str, overrides, kill_after: int, cache: bool) -> float:
    workdir = tempfile.mkdtemp(prefix="restart-time-")
    steps = kill_after + 8
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config, *overrides,
           f"workdir={workdir}", f"train.steps={steps}", "train.log_every=1",
           f"train.checkpoint_every={kill_after}", "train.sample_tokens=0", "train.eval_every=0",
           "train.eval_batches=1", f"cluster.compilation_cache={str(cache).lower()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    # Killed once step `kill_after` is committed (its manifest written), so that both runs
    # resume from a checkpoint rather than from step 0.
    committed = Path(workdir) / "checkpoints" / str(kill_after) / "shardax_manifest.json"
    killed_at = restarted_at = took = None
    seen = []
    while True:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            line = ""
        if line is None:
            break
        print(line, end="", file=sys.stderr)
        if killed_at is None and committed.exists() and "cluster: worker 1 is pid" in "".join(seen):
            pid = int(re.findall(r"cluster: worker 1 is pid (\d+)", "".join(seen))[-1])
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
        elif killed_at is not None and restarted_at is None and "restarting the workers" in line:
            restarted_at = time.monotonic()
        elif restarted_at is not None and took is None and "[train step" in line:
            took = time.monotonic() - restarted_at  # the run then finishes its few steps
        seen.append(line)
    code = proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    if took is None:
        raise SystemExit(f"the run ended without a restart (exit {code})")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt.yaml")
    parser.add_argument("--kill-after", type=int, default=3, help="kill worker 1 after this step")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    without = restart_seconds(args.config, args.overrides, args.kill_after, cache=False)
    with_cache = restart_seconds(args.config, args.overrides, args.kill_after, cache=True)
    print(f"from the restart to the first step: {without:.1f} s without the compilation "
          f"cache, {with_cache:.1f} s with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
