"""Sampling speed: 100 Fashion-MNIST images with the KV cache against the same generation without it,
and the cost of classifier-free guidance (scale 2) against none (scale 1). Targets: >= 3x, <= 2.2x.

    python -m bench.sampling [PRIOR_DIR]   # default: a fresh fashion-mnist prior and tokenizer (speed only)
"""

import sys
import time

from bench.common import machine, report
from common.cli import keep_freed_memory
from prior import PriorInfo, build_prior
from sample import ClassConditionalPipeline
from tokenizer import VQVAE, get_config

N = 100


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    print(f"machine: {machine()}")
    if len(sys.argv) > 1:
        pipe = ClassConditionalPipeline.from_pretrained(sys.argv[1])
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
