"""How long a cluster run takes to recover from a lost worker, with and without JAX's
persistent compilation cache.

``python scripts/restart_time.py --config gpt.yaml cluster.num_hosts=2 cluster.devices_per_host=4``
trains in a fresh workdir, kills worker 1 (SIGKILL) after ``--kill-after`` steps, and measures
from the driver's "restarting the workers" line to the first step the restarted workers log;
once with ``cluster.compilation_cache=false`` and once with ``true`` (the restarted attempt
then finds what the first attempt compiled in ``workdir/compile-cache``). Add ``cluster.address=auto``
(and the other ``cluster.*`` keys) to measure on a running cluster whose nodes share /tmp.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def restart_seconds(config: str, overrides, kill_after: int, cache: bool) -> float:
    workdir = tempfile.mkdtemp(prefix="restart-time-")
    steps = kill_after + 4
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config, *overrides,
           f"workdir={workdir}", f"train.steps={steps}", "train.log_every=1",
           f"train.checkpoint_every={kill_after}", "train.sample_tokens=0", "train.eval_every=0",
           "train.eval_batches=1", f"cluster.compilation_cache={str(cache).lower()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    killed_at = restarted_at = took = None
    seen = []
    for line in proc.stdout:
        print(line, end="", file=sys.stderr)
        if killed_at is None and f"[train step {kill_after + 1}/" in line:
            pid = int(re.findall(r"cluster: worker 1 is pid (\d+)", "".join(seen))[-1])
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
        elif killed_at is not None and "restarting the workers" in line:
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
