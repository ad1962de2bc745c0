"""From Fashion-MNIST to class-conditional samples and their measured quality, through the commands a user runs.

    python demo.py [--out runs/demo] [--fresh] [--grid 7|14] [--tokenizer-steps 1000] [--prior-steps N] [--prior-arch llama|gpt2] [--preset tiny --max-samples N]

1. accelerate launch -m train.tokenizer    (VQ-VAE, fashion-mnist preset: 8 residual levels of 7x7 codes from 512 each,
                                            or with --grid 14 one 14x14 grid from 1024)
2. accelerate launch -m train.encode       (codes of all 70k images)
3. accelerate launch -m train.prior        (fashion-mnist preset: Llama over the first level, 600 steps; with --grid 14 GPT-2, 6400 steps)
4. accelerate launch -m train.classifier   (the evaluation's three networks: the reference classifier, a ResNet,
                                            and a contrastive encoder trained without labels)
5. python -m sample                        (10 classes x 80 images, at the sampling settings the prior records)
6. python -m evaluation                    (FD and KID in the three spaces, precision, recall, class accuracy and the
                                            detail statistic, each beside its real-data floor)

A stage whose output already exists is reused (and says so); --fresh starts over. The folder records the
settings that trained it (demo.json), and a run with other settings in the same folder stops with one line
instead of reusing stages trained otherwise. --grid 14 is the recipe whose samples come closest to real
data, and its prior wants a GPU (docs/recipe.md; its figures are in docs/results.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from common.cli import UsageError, option, parse_args, run_main
from common.files import atomic_write_text
from evaluation import Report
from prior import ARCHITECTURES

# The demo's chain for each code grid, chosen in docs/recipe.md and docs/tokenizer.md: the tokenizer's
# options beyond the preset, the prior's options, steps and architecture, and the sampling the prior records
# (python -m sample's defaults for it). 7x7 positions are what 2 CPU cores train in the demo's budget: 8
# residual levels (every prefix decodes; all 8: the codec's 31.6 dB), the prior over the first; 14x14
# reconstructs far better, and its prior over 4x the codes samples best with a guidance that rises over the codes.
RECIPES = {
    7: dict(tokenizer=["--learning-rate", "4e-3", "--quantizer", "residual", "--levels", "8", "--quantizer-dropout", "0.5"],
            prior=["--levels", "1"], prior_steps=600, prior_arch="llama", sampling=[]),
    14: dict(tokenizer=["--num-downsamples", "1", "--num-codes", "1024", "--learning-rate", "4e-3"], prior=[], prior_steps=6400,
             prior_arch="gpt2", sampling=["--sample-guidance-scale", "2.5", "--sample-guidance-schedule", "linear", "--sample-top-k", "200"]),
}  # fmt: skip

# The evaluation's other networks (python -m evaluation --spaces): another family, and one without labels.
JUDGES = {"resnet": ["--arch", "resnet", "--shift", "2", "--flip"],
          "contrastive": ["--arch", "resnet", "--objective", "contrastive", "--train-batch-size", "64"]}  # 128 views a step

# A prior step over 196 codes on 2 CPU cores, the range of the machines in docs/results.md.
CPU_SECONDS_PER_196_CODE_STEP = (1.9, 3.9)


@dataclass
class DemoArguments:
    out: str | None = option(None, "Folder of every stage's output (default: runs/demo, and runs/demo-grid14 with --grid 14).")
    fresh: bool = option(False, "Start over instead of reusing finished stages.")
    grid: int = option(7, "Code grid of a 28 px image: 7 (7x7 codes, a CPU's budget) or 14 (14x14 codes, the prior on a GPU).", choices=list(RECIPES))  # fmt: skip
    tokenizer_steps: int = option(1000, "Training steps of the tokenizer.", domain="positive")
    prior_steps: int | None = option(None, "Training steps of the prior at learning rate 1e-3 (default: 600 at --grid 7, 6400 at --grid 14; docs/recipe.md).", domain="positive")  # fmt: skip
    prior_arch: str | None = option(None, "The prior's architecture (default: llama at --grid 7, gpt2 at --grid 14; docs/recipe.md).", choices=list(ARCHITECTURES))  # fmt: skip
    classifier_steps: int = option(1000, "Training steps of each of the evaluation's networks.", domain="positive")
    per_class: int = option(80, "Samples per class, scored by the evaluation.", domain="positive")
    preset: str = option("fashion-mnist", "Preset of both stages (tiny: a smoke test).", choices=["fashion-mnist", "tiny"])
    max_samples: int | None = option(None, "Use only this many training images (a quarter as many test images).", domain="positive")  # fmt: skip
    mixed_precision: str = option("auto", "Of the three trainings: auto (bf16 where this hardware makes a stage faster, docs/training.md), no or bf16.", choices=["auto", "no", "bf16"])  # fmt: skip


def _run(cmd: list[str]) -> float:
    print("\n$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def _launch(module: str, *args: str) -> list[str]:
    # One process here; the same command takes --multi_gpu --num_processes N on a bigger machine. Without
    # --num_cpu_threads_per_process, accelerate launch pins a CPU-only process to one thread.
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--num_cpu_threads_per_process", str(os.cpu_count()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", module, *args]  # fmt: skip


def run_chain(args: DemoArguments) -> dict:
    """Run (or reuse) the stages under ``args.out``; return paths, metrics and minutes per stage."""
    out = args.out or ("runs/demo" if args.grid == 7 else f"runs/demo-grid{args.grid}")
    tokenizer_steps, preset, max_samples = args.tokenizer_steps, args.preset, args.max_samples
    recipe = RECIPES[args.grid]
    prior_steps = args.prior_steps or recipe["prior_steps"]
    prior_arch = args.prior_arch or recipe["prior_arch"]
    if args.grid == 14 and preset != "tiny" and not torch.cuda.is_available():
        lo, hi = (prior_steps * s / 60 for s in CPU_SECONDS_PER_196_CODE_STEP)  # minutes
        span = f"{lo / 60:.0f} to {hi / 60:.0f} hours" if hi >= 120 else f"{lo:.0f} to {max(hi, 1):.0f} minutes"
        print(f"--grid 14 without a GPU: the prior's {prior_steps} steps over 196 codes take {span} on 2 CPU cores "
              "(docs/results.md)", flush=True)  # fmt: skip
    limit = ["--max-train-samples", str(max_samples), "--max-eval-samples", str(max(1, max_samples // 4))] if max_samples else []  # fmt: skip
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    # What the stages are trained with (the samples and their scores are made again at every run).
    settings = dict(grid=args.grid, preset=preset, tokenizer_steps=tokenizer_steps, prior_steps=prior_steps, prior_arch=prior_arch,
                    classifier_steps=args.classifier_steps, max_samples=max_samples,
                    tokenizer_options=" ".join(recipe["tokenizer"]), prior_options=" ".join(recipe["prior"]))  # fmt: skip
    record = os.path.join(out, "demo.json")
    if os.path.exists(record):
        with open(record) as f:
            before = json.load(f)
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise UsageError(f"{out} holds a demo trained with other settings ({', '.join(changed)}); "
                             "pass --fresh to start over in it, or --out for another folder")  # fmt: skip
    else:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(record, json.dumps(settings, indent=2) + "\n")
    tok, codes, prior, clf, samples = (os.path.join(out, d) for d in ("tokenizer", "codes", "prior", "classifier", "samples"))  # fmt: skip
    judges = {name: os.path.join(out, name) for name in JUDGES}
    minutes: dict[str, float] = {}

    def stage(name: str, done: str, cmd: list[str]) -> None:
        if os.path.exists(done):
            print(f"\n[{name}] reusing {os.path.dirname(done)} (finished earlier; --fresh to redo)", flush=True)
        else:
            minutes[name] = _run(cmd) / 60

    stage("tokenizer", os.path.join(tok, "metrics.json"), _launch(
        "train.tokenizer", "--dataset", "fashion_mnist", "--preset", preset, *recipe["tokenizer"], "--output-dir", tok, *limit,
        "--train-batch-size", "128", "--max-train-steps", str(tokenizer_steps), "--lr-scheduler", "cosine", "--lr-warmup-steps", "100", "--eval-steps", str(tokenizer_steps),
        "--checkpointing-steps", "500", "--logging-steps", "50", "--mixed-precision", args.mixed_precision))  # fmt: skip
    stage("encode", os.path.join(codes, "vqgpt_codes.json"), _launch(
        "train.encode", "--tokenizer", tok, "--dataset", "fashion_mnist", "--output-dir", codes, *limit))  # fmt: skip
    stage("prior", os.path.join(prior, "metrics.json"), _launch(
        "train.prior", "--codes", codes, "--preset", preset, "--arch", prior_arch, *recipe["prior"], *recipe["sampling"], "--output-dir", prior,
        "--train-batch-size", "128", "--max-train-steps", str(prior_steps), "--learning-rate", "1e-3", "--lr-warmup-steps", "100",
        "--eval-steps", str(prior_steps), "--checkpointing-steps", "500", "--logging-steps", "50", "--mixed-precision", args.mixed_precision))  # fmt: skip
    for name, path, options in (("classifier", clf, []), *((n, judges[n], o) for n, o in JUDGES.items())):
        stage(name, os.path.join(path, "metrics.json"), _launch(
            "train.classifier", "--dataset", "fashion_mnist", *options, "--output-dir", path, *limit,
            "--max-train-steps", str(args.classifier_steps), "--eval-steps", str(args.classifier_steps),
            "--checkpointing-steps", "500", "--logging-steps", "50", "--mixed-precision", args.mixed_precision))  # fmt: skip
    # The sampling settings are those the prior records (chosen in docs/recipe.md), python -m sample's default.
    minutes["sample"] = _run([sys.executable, "-m", "sample", "--prior", prior, "--classes", "all",
                              "--per-class", str(args.per_class), "--seed", "0", "--output-dir", samples]) / 60  # fmt: skip
    report = os.path.join(out, "evaluation.json")
    minutes["evaluation"] = _run([sys.executable, "-m", "evaluation", "--samples", samples, "--classifier", clf, "--spaces", *judges.values(),
                                  *(["--max-reference", str(max_samples // 4)] if max_samples else []),
                                  "--output-json", report]) / 60  # fmt: skip
    metrics = {}
    for name, path in (("tokenizer", tok), ("prior", prior), ("classifier", clf), *judges.items()):
        with open(os.path.join(path, "metrics.json")) as f:
            metrics[name] = json.load(f)
    with open(report) as f:
        metrics["samples"] = json.load(f)
    return {"tokenizer": tok, "prior": prior, "prior_steps": prior_steps, "prior_arch": prior_arch, "samples": samples,
            "grid": os.path.join(samples, "grid.png"), "metrics": metrics, "minutes": minutes}  # fmt: skip


def main(argv=None):
    (args,) = parse_args((DemoArguments,), argv)
    t = time.perf_counter()
    r = run_chain(args)
    tm, pm, cm, sm = (r["metrics"][k] for k in ("tokenizer", "prior", "classifier", "samples"))
    print(f"""
vqgpt demo finished in {(time.perf_counter() - t) / 60:.1f} min
  tokenizer  {r['tokenizer']}   test PSNR {tm['psnr']:.2f} dB{f" (its first level alone {tm['psnr_levels_1']:.2f})" if 'psnr_levels_1' in tm else ''}, codebook usage {tm['codebook_usage']:.1%}, perplexity {tm['perplexity']:.0f}
  prior      {r['prior']}   {r['prior_arch']}, {r['prior_steps']} steps, test {pm['bits_per_token']:.3f} bits/token ({pm['bits_per_image']:.0f} bits/image)
  evaluation networks: the reference classifier's test accuracy {cm['accuracy']:.3f}, the ResNet's {r['metrics']['resnet']['accuracy']:.3f}, the contrastive encoder's positive top-1 {r['metrics']['contrastive']['positive_top1']:.3f}
  samples    {Report.from_dict(sm).summary()}
             precision {sm['precision']:.3f} (floor {sm['precision_floor']:.3f}), recall {sm['recall']:.3f} (floor {sm['recall_floor']:.3f}) in the reference classifier's space
  grid       {r['grid']}
             one row per class, its name on the left: the first {min(args.per_class, 16)} of its {args.per_class} samples;
             every sample is a file under {r['samples']}/<class>/""")  # fmt: skip


if __name__ == "__main__":
    run_main(main)
