"""The codec against PNG, WebP and JPEG on the Fashion-MNIST test split, side by side in one run: one
point per prior, and of multi-level codes one per number of levels coded (the rate-distortion curve).

    python -m bench.codec runs/demo/prior [--limit 10000] [--group 256]
    python -m bench.codec runs/demo/prior runs/rq8-prior ... --levels all --plot docs/codec-rate-distortion.png

vqgpt: the whole split compressed into one archive (each image coded with its class) and decompressed;
bytes per image include the archive's per-image fields and its header's share, and, separately, the
size of one image as a stand-alone .vqg file (13-byte header). ``--levels all``: every prefix of its
levels a prior can code (a flat or next-scale prior: each; a depth prior: all it models). PNG and WebP
lossless: every image as its own file. JPEG and WebP lossy: every image as its own file at the lowest
quality whose mean PSNR reaches each vqgpt point's (binary search over quality), and over their whole
quality range for the plot. PSNR is the mean over images of each image's PSNR on its 8-bit pixels.
Target: every vqgpt point at least 3x smaller than WebP lossy at equal or better PSNR.
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


def code_split(codec: Codec, images: torch.Tensor, labels: list[int], originals: np.ndarray, group: int) -> dict:
    """One point: the split through the codec at its levels, timed; the archive must decode to its codes."""
    grid = codec.grid(tuple(images.shape[-2:]))
    n = len(images)
    t = time.perf_counter()
    codes = np.concatenate([codec.encode_images(chunk) for chunk in images.split(500)])
    archive = codec.compress_archive(codes, labels, grid, group=group)
    t_compress = time.perf_counter() - t
    t = time.perf_counter()
    decoded, _, _, _ = codec.decompress_archive(archive)
    recon = torch.cat([codec.decode_codes(chunk, grid) for chunk in np.array_split(decoded, max(1, n // 500))])
    t_decompress = time.perf_counter() - t
    assert np.array_equal(decoded, codes), "the archive did not decode to the encoded codes"
    single = float(np.mean([len(codec.compress_codes(c, lb, grid)) for c, lb in zip(codes[:200], labels[:200])]))
    return dict(bytes=len(archive) / n, single=single, codes=codes.shape[1],
                psnr=float(psnr(originals, np.stack([np.asarray(im) for im in to_pil(recon)])).mean()),
                compress=n / t_compress, decompress=n / t_decompress)  # fmt: skip


def plot(points: list[dict], curves: dict, png: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fmt, rows in curves.items():
        ax.plot([r[1] for r in rows], [r[2] for r in rows], ".-", label=f"{fmt} (quality 1-100)", alpha=0.7)
    for name in dict.fromkeys(p["prior"] for p in points):
        mine = [p for p in points if p["prior"] == name]
        ax.plot([p["bytes"] for p in mine], [p["psnr"] for p in mine], "o-", label=f"vqgpt: {name}")
        for p in mine:
            ax.annotate(f"d={p['levels']}", (p["bytes"], p["psnr"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axvline(png, color="grey", linestyle=":", label=f"PNG lossless ({png:.0f} B)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (Fashion-MNIST test split, 28x28 grey)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("priors", nargs="+", help="prior folders (each with the tokenizer it names)")
    ap.add_argument("--levels", default=None, help="'all': every prefix of the levels each prior can code; default: the levels each prior models")  # fmt: skip
    ap.add_argument("--limit", type=int, default=10000, help="test images (default: the whole split)")
    ap.add_argument("--group", type=int, default=256, help="images per coded group in the archive")
    ap.add_argument("--plot", default=None, help="write the rate-distortion plot (PNG) here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"machine: {machine()}")
    data = load_image_data(DataArguments(max_eval_samples=args.limit))
    points, split = [], {}  # the test split, loaded once per channel count
    for path in args.priors:
        codec = Codec.from_pretrained(path)
        channels = codec.tokenizer.config.in_channels
        if channels not in split:
            images, labels = load_tensors(data.test, channels)
            split[channels] = images, labels.tolist(), np.stack([np.asarray(im) for im in to_pil(images)])
        images, labels, originals = split[channels]
        most = codec.coded_levels
        for d in [d for d in range(1, most + 1) if codec.can_code(d)] if args.levels == "all" else [most]:
            point = code_split(Codec(codec.tokenizer, codec.prior, codec.info, levels=d), images, labels, originals, args.group)
            points.append(dict(prior=path, levels=d, **point))
            print(f"{path} levels {d}: {point['bytes']:.1f} B per image, {point['psnr']:.2f} dB, "
                  f"compress {point['compress']:.0f} img/s, decompress {point['decompress']:.0f} img/s", flush=True)  # fmt: skip
    raw = originals[0].size  # bytes of one image's 8-bit pixels
    png, _ = pil_codec(originals, "PNG", optimize=True)
    webp_ll, _ = pil_codec(originals, "WEBP", lossless=True, quality=100, method=6)
    curves = {fmt: [(q, *pil_codec(originals, fmt, quality=q)) for q in (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)]
              for fmt in ("JPEG", "WEBP")}  # fmt: skip

    print(f"\n{len(originals)} Fashion-MNIST test images ({raw} bytes of raw pixels each), archive groups of {args.group}; {machine()}")  # fmt: skip
    print("| prior | levels | codes | bytes / image (archive) | one .vqg file | PSNR (dB) | WebP at matched PSNR | JPEG at matched PSNR "
          "| smaller than WebP | compress / decompress img/s |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for p in points:
        q_webp, webp, webp_psnr = matched_quality(originals, "WEBP", p["psnr"])
        q_jpeg, jpeg, _ = matched_quality(originals, "JPEG", p["psnr"])
        reached = webp_psnr >= p["psnr"]
        print(f"| {p['prior']} | {p['levels']} | {p['codes']} | {p['bytes']:.1f} | {p['single']:.1f} | {p['psnr']:.2f} | "
              f"{webp:.1f} (q={q_webp}{'' if reached else ', best'}) | {jpeg:.1f} (q={q_jpeg}) | {webp / p['bytes']:.2f}x | "
              f"{p['compress']:.0f} / {p['decompress']:.0f} |")  # fmt: skip
        report(f"codec {p['prior']} levels {p['levels']}: bytes per image (archive)", p["bytes"], "B", f"WebP q={q_webp} at >= {p['psnr']:.2f} dB",
               webp, ratio=webp / p["bytes"], target=">= 3x smaller than WebP", ok=webp / p["bytes"] >= 3, psnr=round(p["psnr"], 2),
               compress=round(p["compress"], 1), decompress=round(p["decompress"], 1))  # fmt: skip
    print(f"| PNG (lossless, optimize) | | | {png:.1f} | | lossless | | | | |")
    print(f"| WebP lossless | | | {webp_ll:.1f} | | lossless | | | | |")
    for fmt, rows in curves.items():
        print(f"{fmt} over quality: " + ", ".join(f"q{q} {b:.0f} B {p:.2f} dB" for q, b, p in rows))
    if args.plot:
        plot(points, curves, png, args.plot)


if __name__ == "__main__":
    main()
