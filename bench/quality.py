"""Quality of the Fashion-MNIST presets trained on this machine, through the real command lines.

Tokenizer: at most 15 minutes; target test PSNR >= 24 dB (mean over the 10k test images, 28x28, pixel
range [0, 1]) with >= 95% of the codes in use on the test split. Prior: at most 20 minutes; test bits
per token and per image next to the uniform baseline log2(K).

    python -m bench.quality [--out runs/bench] [--tokenizer-steps 2000] [--prior-steps 1800]
"""

import argparse
import math

from bench.common import machine, report
from demo import run_chain


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--tokenizer-steps", type=int, default=2000)
    p.add_argument("--prior-steps", type=int, default=1800)
    args = p.parse_args()
    print(f"machine: {machine()}")
    r = run_chain(args.out, args.tokenizer_steps, args.prior_steps, fresh=True)
    tm, pm, minutes = r["tokenizer_metrics"], r["prior_metrics"], r["minutes"]
    k = 512
    print(f"tokenizer: {args.tokenizer_steps} steps in {minutes['tokenizer']:.1f} min, test PSNR {tm['psnr']:.2f} dB, "
          f"usage {tm['codebook_usage']:.1%}, perplexity {tm['perplexity']:.0f}; grid {r['tokenizer']}/images")  # fmt: skip
    print(f"prior: {args.prior_steps} steps in {minutes['prior']:.1f} min, {pm['bits_per_token']:.3f} bits/token, "
          f"{pm['bits_per_image']:.0f} bits/image (uniform {math.log2(k):.0f} / {49 * math.log2(k):.0f}); samples {r['grid']}")  # fmt: skip
    report("tokenizer test PSNR (fashion-mnist preset)", tm["psnr"], "dB", target=">= 24 dB in <= 15 min",
           ok=tm["psnr"] >= 24 and minutes["tokenizer"] <= 15, steps=args.tokenizer_steps, minutes=round(minutes["tokenizer"], 1))  # fmt: skip
    report("tokenizer test codebook usage", tm["codebook_usage"] * 100, "%", target=">= 95%",
           ok=tm["codebook_usage"] >= 0.95, perplexity=round(tm["perplexity"], 1))  # fmt: skip
    report("prior test bits/token (fashion-mnist preset)", pm["bits_per_token"], "bits", "uniform log2(K)", math.log2(k),
           ratio=pm["bits_per_token"] / math.log2(k), target="below uniform, <= 20 min",
           ok=minutes["prior"] <= 20, steps=args.prior_steps, minutes=round(minutes["prior"], 1))  # fmt: skip
    report("prior test bits/image", pm["bits_per_image"], "bits", "uniform 49 log2(K)", 49 * math.log2(k),
           ratio=pm["bits_per_image"] / (49 * math.log2(k)), target="(reported)")  # fmt: skip


if __name__ == "__main__":
    main()
