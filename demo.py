"""From Fashion-MNIST to class-conditional samples and their measured quality, through the commands a user runs.

    python demo.py [--out runs/demo] [--fresh] [--tokenizer-steps 1000] [--prior-steps 600] [--prior-arch llama|gpt2] [--preset tiny --max-samples N]

1. accelerate launch -m train.tokenizer    (VQ-VAE, fashion-mnist preset)
2. accelerate launch -m train.encode       (codes of all 70k images)
3. accelerate launch -m train.prior        (Llama prior, fashion-mnist preset)
4. accelerate launch -m train.classifier   (the reference classifier of the evaluation)
5. python -m sample                        (10 classes x 80 images, the default sampling settings)
6. python -m evaluation                    (FD, precision, recall, class accuracy, each beside its real-data floor)

A stage whose output already exists is reused (and says so); --fresh starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from common.cli import option, parse_args, run_main
from prior import ARCHITECTURES


@dataclass
class DemoArguments:
    out: str = option("runs/demo", "Folder of every stage's output.")
    fresh: bool = option(False, "Start over instead of reusing finished stages.")
    tokenizer_steps: int = option(1000, "Training steps of the tokenizer.", domain="positive")
    prior_steps: int = option(600, "Training steps of the prior (at learning rate 1e-3: docs/recipe.md, rows llama-600 and lr1e-3-600).", domain="positive")  # fmt: skip
    prior_arch: str = option("llama", "The prior's architecture (llama: FD 0.58 against GPT-2's 0.74 at these steps, docs/recipe.md).", choices=list(ARCHITECTURES))  # fmt: skip
    classifier_steps: int = option(1000, "Training steps of the reference classifier.", domain="positive")
    per_class: int = option(80, "Samples per class, scored by the evaluation.", domain="positive")
    preset: str = option("fashion-mnist", "Preset of both stages (tiny: a smoke test).", choices=["fashion-mnist", "tiny"])
    max_samples: int | None = option(None, "Use only this many training images (a quarter as many test images).", domain="positive")  # fmt: skip


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
    out, tokenizer_steps, prior_steps, preset, max_samples = args.out, args.tokenizer_steps, args.prior_steps, args.preset, args.max_samples  # fmt: skip
    limit = ["--max-train-samples", str(max_samples), "--max-eval-samples", str(max(1, max_samples // 4))] if max_samples else []  # fmt: skip
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    tok, codes, prior, clf, samples = (os.path.join(out, d) for d in ("tokenizer", "codes", "prior", "classifier", "samples"))  # fmt: skip
    minutes: dict[str, float] = {}

    def stage(name: str, done: str, cmd: list[str]) -> None:
        if os.path.exists(done):
            print(f"\n[{name}] reusing {os.path.dirname(done)} (finished earlier; --fresh to redo)", flush=True)
        else:
            minutes[name] = _run(cmd) / 60

    stage("tokenizer", os.path.join(tok, "metrics.json"), _launch(
        "train.tokenizer", "--dataset", "fashion_mnist", "--preset", preset, "--output-dir", tok, *limit,
        "--train-batch-size", "128", "--max-train-steps", str(tokenizer_steps), "--learning-rate", "1e-3",
        "--lr-scheduler", "cosine", "--lr-warmup-steps", "100", "--eval-steps", str(tokenizer_steps),
        "--checkpointing-steps", "500", "--logging-steps", "50"))  # fmt: skip
    stage("encode", os.path.join(codes, "vqgpt_codes.json"), _launch(
        "train.encode", "--tokenizer", tok, "--dataset", "fashion_mnist", "--output-dir", codes, *limit))  # fmt: skip
    stage("prior", os.path.join(prior, "metrics.json"), _launch(
        "train.prior", "--codes", codes, "--preset", preset, "--arch", args.prior_arch, "--output-dir", prior,
        "--train-batch-size", "128", "--max-train-steps", str(prior_steps), "--learning-rate", "1e-3", "--lr-warmup-steps", "100",
        "--eval-steps", str(prior_steps), "--checkpointing-steps", "500", "--logging-steps", "50"))  # fmt: skip
    stage("classifier", os.path.join(clf, "metrics.json"), _launch(
        "train.classifier", "--dataset", "fashion_mnist", "--output-dir", clf, *limit,
        "--max-train-steps", str(args.classifier_steps), "--eval-steps", str(args.classifier_steps),
        "--checkpointing-steps", "500", "--logging-steps", "50"))  # fmt: skip
    # The sampling settings are the defaults of python -m sample (chosen in docs/recipe.md).
    minutes["sample"] = _run([sys.executable, "-m", "sample", "--prior", prior, "--classes", "all",
                              "--per-class", str(args.per_class), "--seed", "0", "--output-dir", samples]) / 60  # fmt: skip
    report = os.path.join(out, "evaluation.json")
    minutes["evaluation"] = _run([sys.executable, "-m", "evaluation", "--samples", samples, "--classifier", clf,
                                  *(["--max-reference", str(max_samples // 4)] if max_samples else []),
                                  "--output-json", report]) / 60  # fmt: skip
    metrics = {}
    for name, path in (("tokenizer", tok), ("prior", prior), ("classifier", clf)):
        with open(os.path.join(path, "metrics.json")) as f:
            metrics[name] = json.load(f)
    with open(report) as f:
        metrics["samples"] = json.load(f)
    return {"tokenizer": tok, "prior": prior, "grid": os.path.join(samples, "grid.png"), "metrics": metrics, "minutes": minutes}


def main(argv=None):
    (args,) = parse_args((DemoArguments,), argv)
    t = time.perf_counter()
    r = run_chain(args)
    tm, pm, cm, sm = (r["metrics"][k] for k in ("tokenizer", "prior", "classifier", "samples"))
    print(f"""
vqgpt demo finished in {(time.perf_counter() - t) / 60:.1f} min
  tokenizer  {r['tokenizer']}   test PSNR {tm['psnr']:.2f} dB, codebook usage {tm['codebook_usage']:.1%}, perplexity {tm['perplexity']:.0f}
  prior      {r['prior']}   test {pm['bits_per_token']:.3f} bits/token ({pm['bits_per_image']:.0f} bits/image)
  classifier test accuracy {cm['accuracy']:.3f}
  samples    FD {sm['fd']:.3f} (real-data floor {sm['fd_floor']:.3f}, {sm['fd'] / sm['fd_floor']:.1f}x), precision {sm['precision']:.3f} (floor {sm['precision_floor']:.3f}), recall {sm['recall']:.3f} (floor {sm['recall_floor']:.3f}), class accuracy {sm['accuracy']:.3f}
  grid       {r['grid']}""")  # fmt: skip


if __name__ == "__main__":
    run_main(main)
