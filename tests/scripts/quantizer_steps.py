"""Train an EMAQuantizer for a few steps on a fixed global batch; save the final buffers.

Run with one process it quantizes the whole batch; under `accelerate launch --multi_gpu
--num_processes 2` each rank takes its half. DESIGN.md: both must end with the same codebook.
Usage: python quantizer_steps.py OUT_DIR [low-dim]   (low-dim: 4-dimensional l2-normalised codes behind a projection)
"""

import sys

import torch
from accelerate import Accelerator

from tokenizer.quantizer import EMAQuantizer

state = Accelerator()  # initialises torch.distributed (gloo on CPU) under accelerate launch
out_dir = sys.argv[1]
g = torch.Generator().manual_seed(0)
batches = [torch.randn(8, 16, 4, 4, generator=g) + 3 * step for step in range(6)]  # drifting data kills codes
options = {"codebook_dim": 4, "l2_codes": True} if sys.argv[2:] == ["low-dim"] else {}
torch.manual_seed(0)  # the projection's initial weights, the same on every rank
q = EMAQuantizer(num_codes=64, dim=16, dead_threshold=2.0, kmeans_iters=3, seed=7, **options).train()
restarted = 0
for batch in batches:
    per_rank = batch.shape[0] // state.num_processes
    local = batch[state.process_index * per_rank : (state.process_index + 1) * per_rank]
    restarted += q(local).restarted
torch.save({**{k: v.clone() for k, v in q.state_dict().items()}, "restarted": restarted}, f"{out_dir}/rank{state.process_index}.pt")
state.wait_for_everyone()
state.end_training()  # destroys the process group: left to interpreter exit, gloo's threads can abort it
