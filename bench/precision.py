"""Each stage's training step in float32 and under bf16 autocast, its achieved GFLOP/s against the machine's
matrix-multiply peak in both precisions, what ``--mixed-precision auto`` picks here, and the cheap levers
on the prior's step (attention kernel: scaled-dot-product against eager).

The peak is the best rate torch's own matrix multiply reaches on this machine (1024 x 1024 x 1024, float32
and bfloat16), the ceiling a training step can approach. Stages: the demo's tokenizer (fashion-mnist
preset, 8 residual levels, batch 128 of 28 px images), its Llama prior (fashion-mnist preset, 1 + 49
codes of 512, batch 128) and the reference classifier (batch 256). Steps of the two precisions are
interleaved, so the ratio is measured side by side.

    python -m bench.precision [--steps 8] [--stages tokenizer,prior,classifier]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from bench.common import flops, machine, report
from common.cli import keep_freed_memory
from evaluation.classifier import Classifier, ClassifierConfig
from prior import PriorInfo, build_prior, prior_loss
from tokenizer import VQVAE, get_config
from train.loop import cpu_flags, resolve_precision


def gemm_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of torch.mm at ``dtype``: the best of ``repeats``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stages() -> dict[str, tuple[torch.nn.Module, callable]]:
    """{stage: (model, step(model) -> loss)} with fixed inputs."""
    torch.manual_seed(0)
    tok = VQVAE(get_config("fashion-mnist", quantizer="residual", levels=8, quantizer_dropout=0.5)).train()
    images = torch.rand(128, 1, 28, 28) * 2 - 1
    info = PriorInfo(512, 10, [str(i) for i in range(10)], (7, 7), None, (28, 28))
    prior = build_prior("fashion-mnist", info, "llama").train()
    codes, labels = torch.randint(0, 512, (128, 49)), torch.randint(0, 10, (128,))
    clf = Classifier(ClassifierConfig()).train()
    clf_images, clf_labels = torch.rand(256, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (256,))
    return {
        "tokenizer": (tok, lambda m: m(images).loss),
        "prior": (prior, lambda m: prior_loss(m, codes, labels, info.layout, 0.1)),
        "classifier": (clf, lambda m: torch.nn.functional.cross_entropy(m(clf_images), clf_labels)),
    }


def step_times(model, step, variants: dict[str, callable], steps: int) -> dict[str, float]:
    """Seconds per training step (forward, backward, AdamW) of each variant, interleaved (2 warm-up rounds)."""
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    totals = dict.fromkeys(variants, 0.0)
    for i in range(steps + 2):
        for name in variants if i % 2 else reversed(list(variants)):
            with variants[name]():
                t = time.perf_counter()
                step(model).backward()
                opt.step()
                opt.zero_grad()
                if i >= 2:
                    totals[name] += time.perf_counter() - t
    return {k: v / steps for k, v in totals.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stages", default="tokenizer,prior,classifier", help="where bf16 is emulated (no bf16 unit) a step can take minutes")
    args = p.parse_args()
    keep_freed_memory()
    flags = cpu_flags()
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    print(f"machine: {machine()}; matrix-relevant flags: {', '.join(units) or 'none'}")
    peak = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    print(f"torch.mm peak: {peak['fp32']:.1f} GFLOP/s float32, {peak['bf16']:.2f} GFLOP/s bfloat16 ({peak['bf16'] / peak['fp32']:.3f}x)")
    report("matrix-multiply peak, float32 (torch.mm 1024^3)", peak["fp32"], "GFLOP/s", target="(the ceiling)")
    report("matrix-multiply peak, bfloat16 (torch.mm 1024^3)", peak["bf16"], "GFLOP/s", "float32", peak["fp32"], peak["bf16"] / peak["fp32"],
           target="(the ceiling)")  # fmt: skip
    precision = {"fp32": lambda: torch.autocast("cpu", enabled=False), "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    print("\n| stage | GFLOP per step | float32 ms | GFLOP/s (% of peak) | bf16 ms | GFLOP/s (% of bf16 peak) | bf16 speed-up | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, step) in stages().items():
        if name not in args.stages.split(","):
            continue
        work = flops(lambda: step(model).backward()) / 1e9
        model.zero_grad()
        t = step_times(model, step, precision, args.steps)
        rate = {k: work / t[k] for k in t}
        auto = resolve_precision("auto", name)
        print(f"| {name} | {work:.1f} | {t['fp32'] * 1e3:.0f} | {rate['fp32']:.0f} ({100 * rate['fp32'] / peak['fp32']:.0f}%) | "
              f"{t['bf16'] * 1e3:.0f} | {rate['bf16']:.1f} ({100 * rate['bf16'] / peak['bf16']:.0f}%) | {t['fp32'] / t['bf16']:.2f}x | {auto[0]} |", flush=True)  # fmt: skip
        report(f"{name} step, bf16 autocast against float32", t["bf16"] * 1e3, "ms", "float32", t["fp32"] * 1e3, t["fp32"] / t["bf16"],
               target=f"auto picks {auto[0]}", gflop_per_step=round(work, 1), gflop_per_s_fp32=round(rate["fp32"]), gflop_per_s_bf16=round(rate["bf16"]))  # fmt: skip
    # The prior's attention kernel: transformers' scaled-dot-product path against its eager one.
    info = PriorInfo(512, 10, [str(i) for i in range(10)], (7, 7), None, (28, 28))
    codes, labels = torch.randint(0, 512, (128, 49)), torch.randint(0, 10, (128,))
    torch.manual_seed(0)
    prior = build_prior("fashion-mnist", info, "llama").train()
    @contextmanager
    def attention(impl: str):
        prior.config._attn_implementation = impl  # read by every attention layer at each forward
        yield

    kernels = step_times(prior, lambda m: prior_loss(m, codes, labels, info.layout, 0.1),
                         {impl: (lambda i=impl: attention(i)) for impl in ("sdpa", "eager")}, args.steps)  # fmt: skip
    print(f"\nprior step, attention by SDPA {kernels['sdpa'] * 1e3:.0f} ms against eager {kernels['eager'] * 1e3:.0f} ms ({kernels['eager'] / kernels['sdpa']:.2f}x)")
    report("prior step, SDPA attention against eager", kernels["sdpa"] * 1e3, "ms", "eager attention", kernels["eager"] * 1e3,
           kernels["eager"] / kernels["sdpa"], target="(the default: sdpa)")  # fmt: skip


if __name__ == "__main__":
    main()
