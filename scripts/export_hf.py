"""Write a run's checkpoint as a Hugging Face model directory.

``python scripts/export_hf.py --workdir RUN [--step N] --out DIR``: the newest committed checkpoint
(or step N) of RUN becomes DIR/config.json, model.safetensors (or shards with an index) and the
run's tokenizer files, which ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads.
Llama-family models are written as the architecture they were imported from (model.family),
GPT as GPT-2. Nothing is downloaded.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint's step (default: the newest committed one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the dtype of the written weights")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="split the weights into files of at most this many GiB")
    args = parser.parse_args(argv)

    def export():
        from trainer._export import export_hf

        print(export_hf(args.workdir, args.out, args.step, args.dtype,
                        int(args.max_shard_gb * 2**30)))

    return cli.run(export)


if __name__ == "__main__":
    sys.exit(main())
