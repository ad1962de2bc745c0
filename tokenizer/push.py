"""Push a finished tokenizer run to the Hugging Face Hub.

    python -m tokenizer.push RUN_DIR REPO_ID [--private]

Uploads the model files of RUN_DIR (config.json, model.safetensors, README.md model card), not its
checkpoints or images, after checking that they load strictly.
"""

from __future__ import annotations

import argparse

from common.hub import push_folder
from .model import VQVAE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.push", description=__doc__.split("\n")[1])
    parser.add_argument("run_dir", help="output folder of train.tokenizer (or any save_pretrained folder)")
    parser.add_argument("repo_id", help="Hub repo id, e.g. user/vqgpt-fashion-mnist")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="Hub token; defaults to the cached login")
    args = parser.parse_args(argv)
    VQVAE.from_pretrained(args.run_dir)  # refuse to upload a folder that does not load
    url = push_folder(args.run_dir, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.run_dir} to {args.repo_id}: {url}")


if __name__ == "__main__":
    from common.cli import run_main

    run_main(main)
