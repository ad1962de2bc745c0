"""The medium prior (GPT-2 medium, 355M parameters) under FSDP: trains, checkpoints, resumes, saves the
gathered weights, and the saved folder loads alone and samples. Needs CUDA (accelerate runs FSDP on GPUs).

    python -m bench.fsdp [--num-processes N] [--out runs/fsdp]

Uses configs/accelerate/8gpu_fsdp.yaml with --num_processes set to the GPUs present.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from bench.common import machine, report

CONFIG = "configs/accelerate/8gpu_fsdp.yaml"


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-processes", type=int, default=torch.cuda.device_count())
    p.add_argument("--out", default="runs/fsdp")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: FSDP is not run")
        return
    print(f"machine: {machine()}, {args.num_processes} process(es)")
    out, py = args.out, sys.executable
    tok, codes = os.path.join(out, "tokenizer"), os.path.join(out, "codes")
    run([py, "-m", "train.tokenizer", "--preset", "fashion-mnist", "--max-train-steps", "300", "--train-batch-size", "256",
         "--learning-rate", "1e-3", "--mixed-precision", "bf16", "--eval-steps", "300", "--output-dir", tok])  # fmt: skip
    run([py, "-m", "train.encode", "--tokenizer", tok, "--output-dir", codes, "--overwrite"])
    launch = [py, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes", str(args.num_processes),
              "-m", "train.prior", "--codes", codes, "--preset", "medium", "--train-batch-size", "64",
              "--checkpointing-steps", str(args.steps // 2), "--eval-steps", str(args.steps), "--lr-warmup-steps", "5",
              "--learning-rate", "3e-4", "--samples-per-class", "2"]  # fmt: skip
    full, split = os.path.join(out, "full"), os.path.join(out, "split")
    seconds = run([*launch, "--max-train-steps", str(args.steps), "--output-dir", full])
    run([*launch, "--max-train-steps", str(args.steps // 2), "--output-dir", split])
    run([*launch, "--max-train-steps", str(args.steps), "--output-dir", split, "--resume-from-checkpoint", "latest"])
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(split, "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    shards = sorted(os.listdir(os.path.join(full, "checkpoints", f"checkpoint-{args.steps}")))
    print(f"checkpoint files: {shards}")

    from prior import load_prior
    from sample import ClassConditionalPipeline

    model, info = load_prior(full)
    params = sum(p.numel() for p in model.parameters())
    pipe = ClassConditionalPipeline.from_pretrained(full, device="cuda")
    images = pipe(list(range(10)), guidance_scale=2.0, seed=0)
    print(f"saved folder loads alone: {params / 1e6:.0f}M parameters; 10 samples {tuple(images.shape)}; "
          f"resumed vs uninterrupted: max |dw| = {diff:.2e}")  # fmt: skip
    report(f"FSDP medium prior ({args.num_processes} GPU), {args.steps} steps", seconds, "s", target="trains, saves whole, loads alone",
           ok=images.shape[0] == 10 and params > 3e8, parameters=params)  # fmt: skip
    report("FSDP resume vs uninterrupted: largest weight difference", diff, "", target="(reported; GPU kernels are not bitwise deterministic)")  # fmt: skip


if __name__ == "__main__":
    main()
