"""The codec against PNG, WebP and JPEG on the Fashion-MNIST test split, side by side in one run.

    python -m bench.codec runs/demo/prior [--limit 10000] [--group 256]

vqgpt: the whole split compressed into one archive (each image coded with its class) and decompressed;
bytes per image include the archive's per-image fields and its header's share, and, separately, the
size of one image as a stand-alone .vqg file (13-byte header). PNG and WebP lossless: every image as
its own file. JPEG and WebP lossy: every image as its own file at the lowest quality whose mean PSNR
reaches vqgpt's (binary search over quality). PSNR is the mean over images of each image's PSNR on its
8-bit pixels. Target: vqgpt at least 3x smaller than WebP lossy at equal or better PSNR.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from bench.common import machine, report
from codec import Codec
from common.cli import keep_freed_memory
from common.data import DataArguments, load_image_data, load_tensors
from common.images import to_pil


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 arrays (N, H, W[, C])."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def pil_codec(originals: np.ndarray, fmt: str, **kw) -> tuple[float, float]:
    """(mean bytes per image, mean PSNR) with every image saved by Pillow as its own file."""
    sizes, decoded = [], []
    for x in originals:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format=fmt, **kw)
        sizes.append(buf.tell())
        buf.seek(0)
        decoded.append(np.asarray(Image.open(buf).convert(Image.fromarray(x).mode)))
    return float(np.mean(sizes)), float(psnr(originals, np.stack(decoded)).mean())


def matched_quality(originals: np.ndarray, fmt: str, target_psnr: float) -> tuple[int, float, float]:
    """The lowest quality (1..100) whose mean PSNR reaches ``target_psnr``: (quality, bytes, PSNR)."""
    lo, hi, best = 1, 100, None
    while lo <= hi:
        q = (lo + hi) // 2
        size, p = pil_codec(originals, fmt, quality=q)
        if p >= target_psnr:
            best, hi = (q, size, p), q - 1
        else:
            lo = q + 1
    return best or (100, *pil_codec(originals, fmt, quality=100))  # no quality reaches it: the best there is


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("prior", help="prior folder (its tokenizer is the one it names)")
    ap.add_argument("--limit", type=int, default=10000, help="test images (default: the whole split)")
    ap.add_argument("--group", type=int, default=256, help="images per coded group in the archive")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"machine: {machine()}")
    codec = Codec.from_pretrained(args.prior)
    data = load_image_data(DataArguments(max_eval_samples=args.limit))
    images, labels = load_tensors(data.test, codec.tokenizer.config.in_channels)
    labels = labels.tolist()
    originals = np.stack([np.asarray(im) for im in to_pil(images)])
    n, grid = len(images), codec.grid(tuple(images.shape[-2:]))
    raw = originals[0].size  # bytes of one image's 8-bit pixels

    t = time.perf_counter()
    codes = np.concatenate([codec.encode_images(chunk) for chunk in images.split(500)])
    archive = codec.compress_archive(codes, labels, grid, group=args.group)
    t_compress = time.perf_counter() - t
    t = time.perf_counter()
    decoded, _, _, _ = codec.decompress_archive(archive)
    recon = torch.cat([codec.decode_codes(chunk, grid) for chunk in np.array_split(decoded, max(1, n // 500))])
    t_decompress = time.perf_counter() - t
    assert np.array_equal(decoded, codes), "the archive did not decode to the encoded codes"
    ours_psnr = float(psnr(originals, np.stack([np.asarray(im) for im in to_pil(recon)])).mean())
    ours = len(archive) / n
    single = float(np.mean([len(codec.compress_codes(c, lb, grid)) for c, lb in zip(codes[:200], labels[:200])]))

    png, _ = pil_codec(originals, "PNG", optimize=True)
    webp_ll, _ = pil_codec(originals, "WEBP", lossless=True, quality=100, method=6)
    q_jpeg, jpeg, jpeg_psnr = matched_quality(originals, "JPEG", ours_psnr)
    q_webp, webp, webp_psnr = matched_quality(originals, "WEBP", ours_psnr)

    print(f"\n{n} Fashion-MNIST test images ({raw} bytes of raw pixels each), prior {args.prior}, archive groups of {args.group}")  # fmt: skip
    print("| codec | bytes / image | bits / pixel | ratio vs raw | PSNR (dB) |\n|---|---|---|---|---|")
    rows = [("vqgpt archive (prior-coded codes)", ours, ours_psnr), ("vqgpt single .vqg file", single, ours_psnr),
            ("PNG (lossless, optimize)", png, float("inf")), ("WebP lossless", webp_ll, float("inf")),
            (f"JPEG q={q_jpeg} (matched PSNR)", jpeg, jpeg_psnr), (f"WebP q={q_webp} (matched PSNR)", webp, webp_psnr)]  # fmt: skip
    for name, size, p in rows:
        print(f"| {name} | {size:.1f} | {8 * size / raw:.3f} | {raw / size:.1f}x | {'lossless' if p == float('inf') else f'{p:.2f}'} |")
    print(f"throughput: compress {n / t_compress:.0f} img/s (tokenizer + prior tables + ANS), "
          f"decompress {n / t_decompress:.0f} img/s (ANS + prior tables + decoder), on {machine()}")  # fmt: skip
    report("codec: bytes per image (archive, with headers)", ours, "B", f"WebP lossy q={q_webp} at >= {ours_psnr:.2f} dB", webp,
           ratio=webp / ours, target=">= 3x smaller than WebP", ok=webp / ours >= 3, psnr=round(ours_psnr, 2))  # fmt: skip
    report("codec: bytes per image (one .vqg file)", single, "B", f"JPEG q={q_jpeg}", jpeg, ratio=jpeg / single)
    report("codec: compress throughput", n / t_compress, "img/s")
    report("codec: decompress throughput", n / t_decompress, "img/s")


if __name__ == "__main__":
    main()
