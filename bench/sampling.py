"""Sampling speed: 100 Fashion-MNIST images with the KV cache against the same generation without it,
and the cost of classifier-free guidance (scale 2) against none (scale 1). Targets: >= 3x, <= 2.2x.

    python -m bench.sampling [PRIOR_DIR]   # default: a fresh fashion-mnist prior and tokenizer (speed only)
    python -m bench.sampling --layouts     # every prior over its codes against the flat 14x14 prior

``--layouts``: images per second (prior and decoder, batch 64, guidance 2, 128 images, the best of three)
of fresh fashion-mnist-preset priors and tokenizers over each layout of codes, side by side in one run:
speed does not depend on the weights. Target: a prior over levels at least 3x faster than the flat 14x14.
"""

import argparse
import time
from dataclasses import replace

from bench.common import machine, report
from common.cli import keep_freed_memory
from prior import PriorInfo, build_prior
from sample import ClassConditionalPipeline
from tokenizer import VQVAE, get_config

N = 100


# name -> (tokenizer preset and overrides, prior architecture)
LAYOUTS = {
    "flat 14x14 (llama)": (("fashion-mnist-14", {}), "llama"),
    "flat 7x7 (llama)": (("fashion-mnist", {}), "llama"),
    "flat, 2 residual levels of 7x7 (llama)": (("fashion-mnist", dict(quantizer="residual", levels=2)), "llama"),
    "depth, 2 residual levels of 7x7": (("fashion-mnist", dict(quantizer="residual", levels=2)), "depth"),
    "depth, 4 residual levels of 7x7": (("fashion-mnist", dict(quantizer="residual", levels=4)), "depth"),
    "next-scale, scales 1,2,4,7": (("fashion-mnist", dict(quantizer="multiscale", scales=[1, 2, 4, 7])), "scales"),
    "next-scale, 4 residual levels of 7x7": (("fashion-mnist", dict(quantizer="residual", levels=4)), "scales"),
}


def layouts() -> None:
    n, rates = 128, {}
    for name, ((preset, overrides), arch) in LAYOUTS.items():
        tok = VQVAE(replace(get_config(preset), **overrides)).eval()
        layout = tok.code_layout(28, 28)
        info = PriorInfo(tok.config.num_codes, 10, [str(i) for i in range(10)], layout.grid, None, (28, 28),
                         levels=layout.grids if layout.num_levels > 1 else None)  # fmt: skip
        pipe = ClassConditionalPipeline(build_prior("fashion-mnist", info, arch=arch), tok, info)
        labels = [i % 10 for i in range(n)]
        pipe(labels[:64], seed=0, batch_size=64, guidance_scale=2.0)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            pipe(labels, seed=0, batch_size=64, guidance_scale=2.0)
            times.append(time.perf_counter() - t)
        rates[name] = n / min(times)
        print(f"{name}: {info.seq_len} codes, {rates[name]:.1f} img/s", flush=True)
    base = rates["flat 14x14 (llama)"]
    for name, rate in rates.items():
        report(f"sampling images/s, {name}", rate, "img/s", "flat 14x14 (llama)", base, ratio=rate / base,
               target=">= 3x faster than the flat 14x14" if name != "flat 14x14 (llama)" else "")  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prior", nargs="?", help="a prior folder (default: a fresh fashion-mnist prior and tokenizer)")
    ap.add_argument("--layouts", action="store_true", help="every layout of codes and its prior against the flat 14x14 prior")
    args = ap.parse_args()
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    print(f"machine: {machine()}")
    if args.layouts:
        return layouts()
    if args.prior:
        pipe = ClassConditionalPipeline.from_pretrained(args.prior)
    else:
        info = PriorInfo(512, 10, [str(i) for i in range(10)], (7, 7), None, (28, 28))
        pipe = ClassConditionalPipeline(build_prior("fashion-mnist", info), VQVAE(get_config("fashion-mnist")), info)
    labels = [i % pipe.info.num_classes for i in range(N)]

    def run(**kw):
        t = time.perf_counter()
        pipe(labels, seed=0, batch_size=N, **kw)
        return time.perf_counter() - t

    run(guidance_scale=2.0)  # warm-up
    cached = min(run(guidance_scale=1.0) for _ in range(3))
    uncached = run(guidance_scale=1.0, use_cache=False)
    guided = min(run(guidance_scale=2.0) for _ in range(3))
    print(f"{N} images: KV cache {N / cached:.1f} img/s, without {N / uncached:.1f} img/s ({uncached / cached:.1f}x); "
          f"guidance {guided:.2f} s vs {cached:.2f} s ({guided / cached:.2f}x)")  # fmt: skip
    report("sampling 100 images with the KV cache", N / cached, "img/s", "same, without the cache", N / uncached,
           ratio=uncached / cached, target=">= 3x faster", ok=uncached / cached >= 3)  # fmt: skip
    report("classifier-free guidance cost (scale 2 vs 1)", guided, "s", "no guidance", cached,
           ratio=guided / cached, target="<= 2.2x", ok=guided / cached <= 2.2)  # fmt: skip


if __name__ == "__main__":
    main()
