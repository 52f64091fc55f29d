"""List a run's checkpoints with step, size and validity: ``python scripts/checkpoints.py WORKDIR``.

WORKDIR is a training workdir (its ``checkpoints/`` is listed) or a checkpoint directory itself.
Validity means committed, with a manifest and every file of its recorded size; ``--verify``
also reads every file and compares its CRC32 with the manifest.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import cli  # noqa: E402


def human_size(num_bytes: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while num_bytes >= 1024 ** (power + 1) and power < len(units) - 1:
        power += 1
    return f"{num_bytes} B" if power == 0 else f"{num_bytes / 1024 ** power:.1f} {units[power]}"


def list_checkpoints(workdir: str, verify: bool = False) -> None:
    from parallel import Checkpointer

    path = Path(workdir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a training workdir or its checkpoints/ directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory; pass a training workdir or its checkpoints/ directory")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    infos = Checkpointer(directory).list(verify=verify)
    if not infos:
        print(f"no checkpoints in {directory}")
        return
    print(f"checkpoints in {directory}")
    print(f"{'step':>10}  {'size':>10}  status")
    for info in infos:
        status = "valid" if info.valid else f"INVALID: {info.problem}"
        print(f"{info.step:>10}  {human_size(info.size_bytes):>10}  {status}")
    valid = [info.step for info in infos if info.valid]
    print(f"latest valid step: {valid[-1]}" if valid else "no valid checkpoint")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", help="a training workdir or a checkpoint directory")
    parser.add_argument("--verify", action="store_true",
                        help="read every file and compare its checksum with the manifest")
    args = parser.parse_args(argv)
    return cli.run(lambda: list_checkpoints(args.workdir, args.verify))


if __name__ == "__main__":
    sys.exit(main())
