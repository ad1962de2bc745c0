"""The rate-distortion plot and table of multi-level tokenizers, from the rows of ``bench.recipe``.

Every tokenizer row decoded at every prefix of its levels (``kind: tokenizer-levels``): bits per image at
log2 K bits a code against PSNR and against the reconstructions' Fréchet distance over its real-data floor.
The table (markdown, printed) adds each row's training minutes and every level's codebook usage.

    python -m bench.levels_plot runs/recipe-levels/rows.jsonl --out docs/levels-rate-distortion.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", help="rows.jsonl files written by bench.recipe")
    p.add_argument("--out", default="docs/levels-rate-distortion.png")
    args = p.parse_args(argv)
    curves = defaultdict(dict)  # row -> levels -> record (the last record of a row and level wins)
    rows = {}  # row -> its tokenizer record
    for path in args.rows:
        for line in open(path):
            r = json.loads(line)
            if r.get("kind") == "tokenizer-levels":
                curves[r["row"]][r["levels"]] = r
            elif r.get("kind") == "tokenizer" and r["row"] != "originals":
                rows[r["row"]] = r
    print("| row | levels decoded | bits / image | PSNR (dB) | recon FD | FD / floor | usage per level | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in curves:
        t = rows.get(name, {})
        usage = [t[k] for k in sorted(t) if k.startswith("codebook_usage_level_")] or [t.get("codebook_usage")]
        for d, r in sorted(curves[name].items()):
            last = d == max(curves[name])
            print(f"| {name} | {d} | {r['bits_per_image']:.0f} | {r['psnr']:.2f} | {r['fd']:.3f} | {r['fd_ratio']:.2f}x | "
                  + (" / ".join(f"{100 * u:.0f}%" for u in usage if u is not None) if last else "") + " | "
                  + (f"{t['minutes']:.1f}" if last and t.get("minutes") else "") + " |")
    fig, (ax_psnr, ax_fd) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab20").colors  # one colour a row, up to 20 rows
    for n, (name, points) in enumerate(sorted(curves.items())):
        pts = [points[d] for d in sorted(points)]
        bits = [r["bits_per_image"] for r in pts]
        style = dict(marker="o", label=name, linestyle="-" if len(pts) > 1 else "none", color=colours[2 * n % 20 + n // 10])
        ax_psnr.plot(bits, [r["psnr"] for r in pts], **style)
        ax_fd.plot(bits, [r["fd_ratio"] for r in pts], **style)
    ax_psnr.set(xlabel="bits per image (log2 K per code)", ylabel="test PSNR (dB)", title="distortion")
    ax_fd.set(xlabel="bits per image (log2 K per code)", ylabel="reconstruction FD / real-data floor", title="quality", yscale="log")
    ax_fd.axhline(1.2, color="grey", linestyle=":", label="1.2x the floor")
    for ax in (ax_psnr, ax_fd):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_fd.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST test images, every prefix of the levels of each tokenizer")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(curves)} tokenizers)")


if __name__ == "__main__":
    main()
