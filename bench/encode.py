"""Encoding throughput of the whole Fashion-MNIST dataset (70k images) against the bare encoder.

Ours: train.encode's path (decode PNGs, encoder, nearest codes, gather) in inference mode.
Baseline: the encoder's forward alone on the same batches, already decoded to tensors.
Target: ours at least 0.8 of the baseline's throughput.

    python -m bench.encode [TOKENIZER_DIR]   # default: a fresh fashion-mnist tokenizer (speed only)
"""

import sys
import time

import torch
from accelerate import Accelerator

from bench.common import machine, report
from tokenizer import VQVAE, get_config
from common.cli import keep_freed_memory
from common.data import DataArguments, ImageTransform, image_loader, load_image_data
from train.encode import encode_split

BATCH = 1024


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    print(f"machine: {machine()}")
    model = VQVAE.from_pretrained(sys.argv[1]) if len(sys.argv) > 1 else VQVAE(get_config("fashion-mnist"))
    model.eval()
    data = load_image_data(DataArguments())
    transform = ImageTransform(1)
    accelerator = Accelerator()
    n = len(data.train) + len(data.test)

    t = time.perf_counter()
    for name, ds in (("train", data.train), ("test", data.test)):
        for _ in encode_split(model, ds, transform, BATCH, accelerator, desc=f"encode {name}"):
            pass
    ours = time.perf_counter() - t

    batches = [b["pixel_values"] for split in (data.train, data.test) for b in image_loader(split, transform, BATCH, shuffle=False)]  # fmt: skip
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model.encoder(x)
    bare = time.perf_counter() - t
    ratio = bare / ours  # throughput ours / throughput bare
    print(f"{n} images: encode {n / ours:.0f} img/s ({ours:.1f} s), bare encoder {n / bare:.0f} img/s ({bare:.1f} s), ratio {ratio:.2f}")  # fmt: skip
    report("encoding throughput, all of Fashion-MNIST", n / ours, "img/s", "bare encoder forward", n / bare,
           ratio=ratio, target=">= 0.8", ok=ratio >= 0.8)  # fmt: skip


if __name__ == "__main__":
    main()
