"""From Fashion-MNIST to class-conditional samples, through the same commands a user runs.

    python demo.py [--out runs/demo] [--fresh] [--tokenizer-steps 1000] [--prior-steps 800] [--preset tiny --max-samples N]

1. accelerate launch -m train.tokenizer   (VQ-VAE, fashion-mnist preset)
2. accelerate launch -m train.encode      (codes of all 70k images)
3. accelerate launch -m train.prior       (GPT-2 prior, fashion-mnist preset)
4. python -m sample                       (10 classes x 8 images, guidance 2)

A stage whose output already exists is reused (and says so); --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


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


def run_chain(out: str, tokenizer_steps: int, prior_steps: int, fresh: bool = False, per_class: int = 8,
              preset: str = "fashion-mnist", max_samples: int | None = None) -> dict:  # fmt: skip
    """Run (or reuse) the four stages under ``out``; return paths, metrics and minutes per stage.

    ``preset`` names both stages' presets; ``max_samples`` limits every split (tests use both).
    """
    limit = ["--max-train-samples", str(max_samples), "--max-eval-samples", str(max_samples // 4)] if max_samples else []
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    tok, codes, prior, samples = (os.path.join(out, d) for d in ("tokenizer", "codes", "prior", "samples"))
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
        "train.prior", "--codes", codes, "--preset", preset, "--output-dir", prior,
        "--train-batch-size", "128", "--max-train-steps", str(prior_steps), "--lr-warmup-steps", "100",
        "--eval-steps", str(prior_steps), "--checkpointing-steps", "500", "--logging-steps", "50"))  # fmt: skip
    minutes["sample"] = _run([sys.executable, "-m", "sample", "--prior", prior, "--classes", "all",
                              "--per-class", str(per_class), "--guidance-scale", "2", "--seed", "0",
                              "--output-dir", samples]) / 60  # fmt: skip
    with open(os.path.join(tok, "metrics.json")) as f:
        tok_metrics = json.load(f)
    with open(os.path.join(prior, "metrics.json")) as f:
        prior_metrics = json.load(f)
    return {"tokenizer": tok, "prior": prior, "grid": os.path.join(samples, "grid.png"),
            "tokenizer_metrics": tok_metrics, "prior_metrics": prior_metrics, "minutes": minutes}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--tokenizer-steps", type=int, default=1000)
    p.add_argument("--prior-steps", type=int, default=800)
    p.add_argument("--preset", default="fashion-mnist", help="preset of both stages (tiny: a smoke test)")
    p.add_argument("--max-samples", type=int, default=None, help="use only this many training images")
    args = p.parse_args(argv)
    t = time.perf_counter()
    r = run_chain(args.out, args.tokenizer_steps, args.prior_steps, args.fresh, preset=args.preset, max_samples=args.max_samples)
    tm, pm = r["tokenizer_metrics"], r["prior_metrics"]
    print(f"""
vqgpt demo finished in {(time.perf_counter() - t) / 60:.1f} min
  tokenizer  {r['tokenizer']}   test PSNR {tm['psnr']:.2f} dB, codebook usage {tm['codebook_usage']:.1%}, perplexity {tm['perplexity']:.0f}
  prior      {r['prior']}   test {pm['bits_per_token']:.3f} bits/token ({pm['bits_per_image']:.0f} bits/image)
  grid       {r['grid']}""")  # fmt: skip


if __name__ == "__main__":
    main()
