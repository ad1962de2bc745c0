"""Peak resident memory of every command that reads a split, at 10k images and at the whole split.

Each command runs as its own process, twice: on 10,000 Fashion-MNIST images and on all of them (70k for
the commands that read both splits, 60k for those that read one: the training split). Its peak resident
set (``ru_maxrss`` of that process, from ``os.wait4``) is printed beside the images it read and the
ratio of the two peaks. Target: the two within 20% of each other (memory set by the batch, not the data),
except where the output itself lives in memory (the search index), which the command announces. The codec
runs with the tokenizer alone (fixed-width codes): the same archive path, without the prior's entropy
coding, whose speed on 2 CPU cores (about 15 images/s) would take an hour over 60k images.

    python -m bench.memory --tokenizer runs/demo/tokenizer --prior runs/demo/prior --classifier runs/demo/classifier \
        [--out runs/bench/memory] [--commands extract,index,encode,compress,decompress,anomaly,evaluation]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import machine, report

SMALL = 10000


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(peak resident MiB, seconds, last line of output) of ``python -m cmd...`` as its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    lines = [line for line in out.splitlines() if line.strip()]
    return usage.ru_maxrss / 1024, time.perf_counter() - start, lines[-1] if lines else ""


def export(split: str, n: int | None, folder: str) -> str:
    """The first ``n`` images of a Fashion-MNIST split as an imagefolder (the layout samples are scored in)."""
    if os.path.isdir(folder):
        return folder
    from common.data import DataArguments, load_image_data
    from common.files import staged
    from common.images import to_pil
    from common.data import image_batches, ImageTransform

    data = load_image_data(DataArguments())
    ds = getattr(data, split)
    ds = ds.select(range(n)) if n else ds
    with staged(folder) as tmp, open(os.path.join(tmp, "metadata.jsonl"), "w") as meta:
        i = 0  # as python -m sample writes: class folders, and the class names (with their '/') in metadata.jsonl
        for images, labels in image_batches(ds, ImageTransform(1), 1000):
            for image, label in zip(to_pil(images), labels.tolist()):
                rel = f"{data.class_names[label].replace('/', '-')}/{i:05d}.png"
                os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
                image.save(os.path.join(tmp, rel))
                meta.write(json.dumps({"file_name": rel, "label": data.class_names[label]}) + "\n")
                i += 1
    return folder


def commands(args) -> dict[str, tuple[list[str], list[str], int, int]]:
    """{name: (command on 10k images, command on the whole split, images of each)}."""
    out = args.out
    both = ["--max-train-samples", str(SMALL // 2), "--max-eval-samples", str(SMALL // 2)]
    train = ["--split", "train"]
    return {
        "extract": (["features", "extract", "--tokenizer", args.tokenizer, "--split", "all", *both, "--output-dir", f"{out}/f10k"],
                    ["features", "extract", "--tokenizer", args.tokenizer, "--split", "all", "--output-dir", f"{out}/f70k"], SMALL, 70000),
        "index": (["features", "index", "--tokenizer", args.tokenizer, "--split", "all", *both, "--output-dir", f"{out}/i10k"],
                  ["features", "index", "--tokenizer", args.tokenizer, "--split", "all", "--output-dir", f"{out}/i70k"], SMALL, 70000),
        "encode": (["train.encode", "--tokenizer", args.tokenizer, *both, "--overwrite", "--output-dir", f"{out}/c10k"],
                   ["train.encode", "--tokenizer", args.tokenizer, "--overwrite", "--output-dir", f"{out}/c70k"], SMALL, 70000),
        "compress": (["codec", "compress", "--tokenizer", args.tokenizer, *train, "--max-train-samples", str(SMALL), "--output", f"{out}/a10k.vqga"],
                     ["codec", "compress", "--tokenizer", args.tokenizer, *train, "--output", f"{out}/a60k.vqga"], SMALL, 60000),
        "decompress": (["codec", "decompress", "--tokenizer", args.tokenizer, "--input", f"{out}/a10k.vqga", "--output", f"{out}/d10k"],
                       ["codec", "decompress", "--tokenizer", args.tokenizer, "--input", f"{out}/a60k.vqga", "--output", f"{out}/d60k"], SMALL, 60000),
        "anomaly": (["anomaly", "--prior", args.prior, *train, "--max-train-samples", str(SMALL), "--output-dir", f"{out}/s10k"],
                    ["anomaly", "--prior", args.prior, *train, "--output-dir", f"{out}/s60k"], SMALL, 60000),
        "evaluation": (["evaluation", "--classifier", args.classifier, "--samples", f"{out}/train10k", "--output-json", f"{out}/e10k.json"],
                       ["evaluation", "--classifier", args.classifier, "--samples", f"{out}/train60k", "--output-json", f"{out}/e60k.json"],
                       SMALL, 60000),
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="runs/demo/tokenizer")
    parser.add_argument("--prior", default="runs/demo/prior")
    parser.add_argument("--classifier", default="runs/demo/classifier")
    parser.add_argument("--out", default="runs/bench/memory")
    parser.add_argument("--commands", default="extract,index,encode,compress,decompress,anomaly,evaluation")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine()}")
    table = commands(args)
    wanted = args.commands.split(",")
    if "evaluation" in wanted:
        export("train", SMALL, f"{args.out}/train10k"), export("train", None, f"{args.out}/train60k")
    print("| command | images | peak RSS (MiB) | seconds | images | peak RSS (MiB) | seconds | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in wanted:
        small_cmd, large_cmd, n_small, n_large = table[name]
        small, t_small, _ = run(small_cmd)
        large, t_large, last = run(large_cmd)
        ratio = large / small
        print(f"| {name} | {n_small} | {small:.0f} | {t_small:.0f} | {n_large} | {large:.0f} | {t_large:.0f} | {ratio:.2f} |", flush=True)
        report(f"peak memory, {name}: {n_large} against {n_small} images", large, "MiB", f"{n_small} images", small, ratio,
               "within 20% (ratio <= 1.2)", ratio <= 1.2)  # fmt: skip


if __name__ == "__main__":
    main()
