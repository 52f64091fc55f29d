"""Train a model from a config: ``python scripts/train.py --config gpt.yaml [key=value ...]``."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt.yaml", help="a YAML path or a name in configs/")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=100")
    args = parser.parse_args(argv)
    return cli.run(lambda: cli.train(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
