"""Our EMAQuantizer against vector-quantize-pytorch's VectorQuantize, configured the same.

Training mode, forward + backward, EMA update and dead-code check included; N = 8192 vectors, D = 64,
K = 512 and 4096. The two are timed alternately in one process. Target: ours at least 5x faster.

    python -m bench.quantizer
"""

import time

import torch
from vector_quantize_pytorch import VectorQuantize

from bench.common import machine, report
from tokenizer.quantizer import EMAQuantizer

N, D, REPEATS = 8192, 64, 30


def main():
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    for k in (512, 4096):
        ours = EMAQuantizer(k, D, beta=0.25, decay=0.99, dead_threshold=1.0, kmeans_iters=0).train()
        theirs = VectorQuantize(dim=D, codebook_size=k, decay=0.99, commitment_weight=0.25, threshold_ema_dead_code=1,
                                kmeans_init=False, rotation_trick=False, straight_through=False).train()  # fmt: skip
        z_ours = torch.randn(8, D, 32, 32, requires_grad=True)  # (B, D, h, w), B*h*w = N
        z_theirs = torch.randn(8, 32 * 32, D, requires_grad=True)  # (B, n, D)

        def step_ours():
            out = ours(z_ours)
            (out.quantized.sum() + out.loss).backward()

        def step_theirs():
            q, _, loss = theirs(z_theirs)
            (q.sum() + loss.sum()).backward()

        t_ours, t_theirs = [], []
        for i in range(REPEATS + 2):  # alternate so both see the same machine state
            for fn, acc in ((step_ours, t_ours), (step_theirs, t_theirs)):
                t = time.perf_counter()
                fn()
                if i >= 2:
                    acc.append(time.perf_counter() - t)
        a, b = sorted(t_ours)[len(t_ours) // 2], sorted(t_theirs)[len(t_theirs) // 2]
        print(f"K={k}: ours {a * 1e3:.1f} ms, vector-quantize-pytorch {b * 1e3:.1f} ms, speed-up {b / a:.1f}x")
        report(f"quantizer fwd+bwd, N={N} D={D} K={k}", a * 1e3, "ms", "vector-quantize-pytorch", b * 1e3,
               ratio=b / a, target=">= 5x faster", ok=b / a >= 5)  # fmt: skip


if __name__ == "__main__":
    main()
