"""A two-node Ray cluster on this machine: two network namespaces joined by a veth pair.

Node A (the head, where the driver runs) and node B each have their own network stack and
address (10.213.X.1 and .2, X from the test process's pid), so JAX's coordinator, gloo and Ray
talk across a real link that a test can cut (``link``) or whose node it can kill (``kill_b``).
Node B also runs in its own mount namespace with two directories hidden behind empty tmpfs
mounts: ``hidden`` (a workdir only the head sees) and ``other_code`` (a different copy of the
checkout), for the start-up checks. Both nodes offer one CPU and one (pretend) GPU.

Everything runs as root (``ip netns``); ``skip_reason`` says why not when it cannot. Every
process of the cluster lives in one of the two namespaces, so ``close`` finds them all with
``ip netns pids`` and kills them, whatever state a test left them in.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("parallel", "trainer", "models", "scripts", "configs")
RAY = str(Path(sys.executable).with_name("ray"))


def skip_reason() -> str | None:
    """Why the namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"sxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    return None


def _run(*cmd, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


class TwoNodes:
    """Starts the namespaces and both Ray nodes; ``close`` removes everything again."""

    def __init__(self, workspace: Path):
        tag = os.getpid() % 100000
        self.ns = (f"sx{tag}a", f"sx{tag}b")
        self.veth = (f"sx{tag}a", f"sx{tag}b")
        subnet = f"10.213.{tag % 250}"
        self.address = (f"{subnet}.1", f"{subnet}.2")
        self.workspace = workspace
        self.hidden = workspace / "hidden"
        self.other_code = workspace / "other-code"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_TMPDIR": str(workspace / "ray"), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    # ----- life cycle -----------------------------------------------------------------------
    def start(self) -> "TwoNodes":
        a, b = self.ns
        for name in self.ns:
            _run("ip", "netns", "add", name)
        _run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for name, veth, address in zip(self.ns, self.veth, self.address):
            _run("ip", "link", "set", veth, "netns", name)
            _run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", veth)
            _run("ip", "-n", name, "link", "set", "lo", "up")
            _run("ip", "-n", name, "link", "set", veth, "up")
        self.hidden.mkdir(parents=True)
        (self.workspace / "ray").mkdir()
        for name in CODE_DIRS:  # the head sees an exact copy of the checkout here
            shutil.copytree(ROOT / name, self.other_code / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        _run("ip", "netns", "exec", a, RAY, "start", "--head", f"--node-ip-address={self.address[0]}",
             "--port=6379", "--num-cpus=1", "--num-gpus=1", "--include-dashboard=false",
             "--disable-usage-stats", env=self.env, timeout=180)
        self.start_b()
        return self

    def start_b(self, wait: bool = True) -> None:
        """Starts (again) node B in its namespace, with its private view of two directories
        (``wait``: until the head counts both nodes)."""
        hide = " && ".join([
            f"mount -t tmpfs tmpfs {self.hidden}", f"mount -t tmpfs tmpfs {self.other_code}",
            *(f"cp -r {ROOT / name} {self.other_code}/" for name in CODE_DIRS),
            f"echo '# a different checkout' >> {self.other_code}/parallel/cluster/_spec.py"])
        start = (f"{RAY} start --address={self.address[0]}:6379 --node-ip-address={self.address[1]} "
                 "--num-cpus=1 --num-gpus=1 --disable-usage-stats")
        _run("ip", "netns", "exec", self.ns[1], "sh", "-c", f"{hide} && {start}", env=self.env,
             timeout=180)
        if wait:
            self.wait_for_nodes(2)

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Waits until the head counts ``count`` live nodes."""
        script = ("import ray, json; ray.init(address='auto', log_to_driver=False); "
                  "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))")
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.on_head([sys.executable, "-c", script], check=False, timeout=timeout_s)
            lines = result.stdout.strip().splitlines()
            if result.returncode == 0 and lines and json.loads(lines[-1]) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster has not {count} live nodes: {result.stderr[-2000:]}")
            time.sleep(1)

    def close(self) -> None:
        """Kills every process of both namespaces and removes them (never raises)."""
        for _ in range(3):
            pids = self.pids(0) + self.pids(1)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for name in self.ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.workspace / "ray", ignore_errors=True)

    # ----- acting on the cluster ------------------------------------------------------------
    def on_head(self, cmd, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
        """Runs ``cmd`` in node A's namespace with the cluster's environment."""
        return _run("ip", "netns", "exec", self.ns[0], *cmd, check=check, timeout=timeout,
                    env={**self.env, **kwargs.pop("env", {})}, **kwargs)

    def popen_on_head(self, cmd, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[0], *cmd], env={**self.env, **kwargs.pop("env", {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)

    def pids(self, node: int) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True)
        return [int(p) for p in result.stdout.split()]

    def link(self, up: bool) -> None:
        """Sets the veth link between the nodes up or down (down: a network partition)."""
        _run("ip", "-n", self.ns[0], "link", "set", self.veth[0], "up" if up else "down")

    def kill_b(self) -> None:
        """Kills every process of node B (raylet, agents, workers): the node is lost."""
        for pid in self.pids(1):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def listening(self, node: int) -> str:
        """``ss -ltnp`` and ``ss -tnp`` in a node's namespace: sockets and their processes."""
        return (_run("ip", "netns", "exec", self.ns[node], "ss", "-ltnp").stdout
                + _run("ip", "netns", "exec", self.ns[node], "ss", "-tnp").stdout)
