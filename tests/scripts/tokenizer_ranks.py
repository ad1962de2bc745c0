"""Train the tokenizer through train.tokenizer.main; save this rank's tokenizer and discriminator weights
(rank{i}.pt in $RANKS_DIR)."""

import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel

from train.tokenizer import main

model, _, stage = main(sys.argv[1:])
weights = {f"tokenizer.{k}": v for k, v in model.state_dict().items()}
weights.update({f"discriminator.{k}": v for k, v in extract_model_from_parallel(stage.auxiliary).state_dict().items()})
torch.save({k: v.detach().cpu().clone() for k, v in weights.items()},
           os.path.join(os.environ["RANKS_DIR"], f"rank{PartialState().process_index}.pt"))  # fmt: skip
