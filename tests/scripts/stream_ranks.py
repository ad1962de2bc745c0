"""Read one epoch of this rank's training stream (ShuffledStream) and save the image digests it saw.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/stream_ranks.py DATASET_DIR OUT_DIR
"""

import hashlib
import json
import os
import sys

from accelerate import Accelerator

from common.data import TrainingDataArguments, ShuffledStream, load_image_data

state = Accelerator()  # initialises torch.distributed (gloo on CPU) under accelerate launch
data = load_image_data(TrainingDataArguments(dataset=sys.argv[1], streaming=True, max_eval_samples=20))
stream = ShuffledStream(data.train, buffer_size=16, seed=0, rank=state.process_index, world_size=state.num_processes)
seen = []
for example in stream:
    if stream.state_dict()["epoch"] > 0:  # the buffer is drained at an epoch's end, before the next begins
        break
    seen.append(hashlib.sha1(example["image"]["bytes"]).hexdigest())
held_out = [hashlib.sha1(v["bytes"]).hexdigest() for v in data.test["image"]]
with open(os.path.join(sys.argv[2], f"rank{state.process_index}.json"), "w") as f:
    json.dump({"seen": seen, "held_out": held_out}, f)
state.end_training()  # destroys the process group: left to interpreter exit, gloo's threads can abort it
