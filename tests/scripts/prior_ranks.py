"""Train the prior through train.prior.main and save this rank's final weights (rank{i}.pt in $RANKS_DIR)."""

import os
import sys

import torch
from accelerate import PartialState

from train.prior import main

model, *_ = main(sys.argv[1:])
state = PartialState()
torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, os.path.join(os.environ["RANKS_DIR"], f"rank{state.process_index}.pt"))  # fmt: skip
