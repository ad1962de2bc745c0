"""Train an EMAQuantizer for a few steps on a fixed global batch; save the final buffers.

Run with one process it quantizes the whole batch; under `accelerate launch --multi_gpu
--num_processes 2` each rank takes its half. DESIGN.md: both must end with the same codebook.
Usage: python quantizer_steps.py OUT_DIR [low-dim|residual|residual-shared|multiscale]
(low-dim: 4-dimensional l2-normalised codes behind a projection; residual: 3 levels with quantizer dropout,
a codebook each or one shared; multiscale: scales 1, 2, 4 with quantizer dropout)
"""

import sys

import torch
from accelerate import Accelerator

from tokenizer.quantizer import EMAQuantizer, MultiScaleQuantizer, ResidualQuantizer

state = Accelerator()  # initialises torch.distributed (gloo on CPU) under accelerate launch
out_dir = sys.argv[1]
g = torch.Generator().manual_seed(0)
batches = [torch.randn(8, 16, 4, 4, generator=g) + 3 * step for step in range(6)]  # drifting data kills codes
kind = sys.argv[2] if len(sys.argv) > 2 else "plain"
torch.manual_seed(0)  # the projection's initial weights, the same on every rank
if kind == "multiscale":
    q = MultiScaleQuantizer(num_codes=64, dim=16, scales=[1, 2, 4], dropout=0.5, dead_threshold=2.0, kmeans_iters=3, seed=7).train()
elif kind.startswith("residual"):
    q = ResidualQuantizer(num_codes=64, dim=16, levels=3, shared_codebook=kind == "residual-shared", dropout=0.5,
                          dead_threshold=2.0, kmeans_iters=3, seed=7).train()  # fmt: skip
else:
    options = {"codebook_dim": 4, "l2_codes": True} if kind == "low-dim" else {}
    q = EMAQuantizer(num_codes=64, dim=16, dead_threshold=2.0, kmeans_iters=3, seed=7, **options).train()
restarted = 0
for batch in batches:
    per_rank = batch.shape[0] // state.num_processes
    local = batch[state.process_index * per_rank : (state.process_index + 1) * per_rank]
    restarted += q(local).restarted
torch.save({**{k: v.clone() for k, v in q.state_dict().items()}, "restarted": restarted}, f"{out_dir}/rank{state.process_index}.pt")
state.wait_for_everyone()
state.end_training()  # destroys the process group: left to interpreter exit, gloo's threads can abort it
