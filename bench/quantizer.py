"""Our EMAQuantizer against vector-quantize-pytorch's VectorQuantize, configured the same, and our
ResidualQuantizer against its ResidualVQ.

Training mode, forward + backward, EMA update and dead-code check included; N = 8192 vectors, D = 64,
K = 512 and 4096; 4 residual levels at K = 512 (a codebook each, no quantizer dropout). Each pair is timed
alternately in one process. Targets: ours at least 5x faster, and a 4-level step at most 4x a one-level step.

    python -m bench.quantizer
"""

import time

import torch
from vector_quantize_pytorch import ResidualVQ, VectorQuantize

from bench.common import machine, report
from tokenizer.quantizer import EMAQuantizer, ResidualQuantizer

N, D, LEVELS, REPEATS = 8192, 64, 4, 30


def _steps(ours, theirs) -> tuple:
    """Median seconds of a training step (forward + backward) of each, timed alternately."""
    z_ours = torch.randn(8, D, 32, 32, requires_grad=True)  # (B, D, h, w), B*h*w = N
    z_theirs = torch.randn(8, 32 * 32, D, requires_grad=True)  # (B, n, D)

    def step_ours():
        out = ours(z_ours)
        (out.quantized.sum() + out.loss).backward()

    def step_theirs():
        q, _, loss = theirs(z_theirs)
        (q.sum() + loss.sum()).backward()

    times = [[], []]
    for i in range(REPEATS + 2):  # alternate so both see the same machine state
        for fn, acc in zip((step_ours, step_theirs), times):
            t = time.perf_counter()
            fn()
            if i >= 2:
                acc.append(time.perf_counter() - t)
    return tuple(sorted(t)[len(t) // 2] for t in times)


def main():
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    common = dict(decay=0.99, commitment_weight=0.25, threshold_ema_dead_code=1, kmeans_init=False, rotation_trick=False)
    one_level = {}
    for k in (512, 4096):
        ours = EMAQuantizer(k, D, beta=0.25, decay=0.99, dead_threshold=1.0, kmeans_iters=0).train()
        theirs = VectorQuantize(dim=D, codebook_size=k, straight_through=False, **common).train()
        a, b = _steps(ours, theirs)
        one_level[k] = a
        print(f"K={k}: ours {a * 1e3:.1f} ms, vector-quantize-pytorch {b * 1e3:.1f} ms, speed-up {b / a:.1f}x")
        report(f"quantizer fwd+bwd, N={N} D={D} K={k}", a * 1e3, "ms", "vector-quantize-pytorch", b * 1e3,
               ratio=b / a, target=">= 5x faster", ok=b / a >= 5)  # fmt: skip
    ours = ResidualQuantizer(512, D, levels=LEVELS, beta=0.25, decay=0.99, dead_threshold=1.0, kmeans_iters=0).train()
    theirs = ResidualVQ(dim=D, num_quantizers=LEVELS, codebook_size=512, **common).train()
    a, b = _steps(ours, theirs)
    flat, _ = _steps(EMAQuantizer(512, D, beta=0.25, decay=0.99, dead_threshold=1.0, kmeans_iters=0).train(), theirs)
    print(f"{LEVELS} residual levels, K=512: ours {a * 1e3:.1f} ms, ResidualVQ {b * 1e3:.1f} ms, speed-up {b / a:.1f}x; "
          f"{a / flat:.2f}x our one-level step ({flat * 1e3:.1f} ms)")  # fmt: skip
    report(f"residual quantizer fwd+bwd, {LEVELS} levels, N={N} D={D} K=512", a * 1e3, "ms", "vector-quantize-pytorch ResidualVQ",
           b * 1e3, ratio=b / a, target=">= 5x faster", ok=b / a >= 5)  # fmt: skip
    report(f"residual quantizer step against one level, {LEVELS} levels", a * 1e3, "ms", "one-level step", flat * 1e3,
           ratio=a / flat, target=f"<= {LEVELS}x", ok=a / flat <= LEVELS)  # fmt: skip


if __name__ == "__main__":
    main()
