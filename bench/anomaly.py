"""One-class anomaly detection on Fashion-MNIST, the standard protocol: for each class, a tokenizer and a
prior trained on that class's training images only; the whole test split scored, the other nine classes
being the anomalies; AUROC per class and its mean, for each of the four scores of ``anomaly`` (knn with
that class's training images as the reference, k=5 as the command's default; --knn-k to vary it), beside
the same nearest-neighbour rule on raw pixels (no model).

    python -m bench.anomaly [--out runs/anomaly] [--preset fashion-mnist] [--tokenizer-steps 1000] [--prior-steps 1000] [--classes 0,1]

Published mean AUROCs (%) on this protocol, for orientation (as reported in the Deep SAD paper, and by
Golan & El-Yaniv 2018 and ARNet): OC-SVM 92.8, CAE + OC-SVM 91.7, DSEBM 86.6, ADGAN 88.4, Deep SVDD 89.2,
GEOM 93.5, ARNet 93.9.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from anomaly import SCORES, AnomalyScorer, auroc, knn_distance, knn_index
from bench.common import machine, report
from common.cli import keep_freed_memory
from common.data import FASHION_MNIST_CLASSES, DataArguments, load_image_data, load_tensors

PIXEL_KNN = "pixel knn (no model)"
COLUMNS = (*SCORES, PIXEL_KNN)
PUBLISHED = {"OC-SVM": 92.8, "CAE+OC-SVM": 91.7, "DSEBM": 86.6, "ADGAN": 88.4, "Deep SVDD": 89.2, "GEOM": 93.5, "ARNet": 93.9}


def train_one_class(out: str, c: int, preset: str, tokenizer_steps: int, prior_steps: int, extra: list[str]) -> str:
    from train import encode, prior, tokenizer

    tok, codes, pri = (os.path.join(out, f"{k}-{c}") for k in ("tokenizer", "codes", "prior"))
    only = ["--only-classes", str(c)]
    if not os.path.exists(os.path.join(tok, "metrics.json")):
        tokenizer.main(["--preset", preset, *only, "--train-batch-size", "128", "--max-train-steps", str(tokenizer_steps),
                        "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "50",
                        "--eval-steps", "100000", "--checkpointing-steps", "100000", "--logging-steps", "100",
                        *extra, "--output-dir", tok])  # fmt: skip
    if not os.path.exists(os.path.join(codes, "vqgpt_codes.json")):
        encode.main(["--tokenizer", tok, *only, "--output-dir", codes])
    if not os.path.exists(os.path.join(pri, "metrics.json")):
        prior.main(["--codes", codes, "--preset", preset, "--train-batch-size", "128",
                    "--max-train-steps", str(prior_steps), "--lr-warmup-steps", "50", "--eval-steps", "100000",
                    "--checkpointing-steps", "100000", "--logging-steps", "100", *extra, "--output-dir", pri])  # fmt: skip
    return pri


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/anomaly")
    p.add_argument("--preset", default="fashion-mnist", choices=["tiny", "fashion-mnist"], help="preset of both models")
    p.add_argument("--tokenizer-steps", type=int, default=1000)
    p.add_argument("--prior-steps", type=int, default=1000)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--knn-k", type=int, default=5, help="k of the knn scores (the command's default)")
    p.add_argument("--train-args", default="", help="extra options of every training command")
    args = p.parse_args()
    print(f"machine: {machine()}; per class: {args.preset} preset, tokenizer {args.tokenizer_steps} steps, prior {args.prior_steps} steps (batch 128)")
    data = load_image_data(DataArguments())
    images, labels = load_tensors(data.test, 1)
    train_images, train_labels = load_tensors(data.train, 1)
    results = {}
    for c in (int(s) for s in args.classes.split(",")):
        t = time.perf_counter()
        prior_dir = train_one_class(args.out, c, args.preset, args.tokenizer_steps, args.prior_steps, args.train_args.split())
        scorer = AnomalyScorer.from_pretrained(prior_dir)
        scorer.prior.to(args.device), scorer.tokenizer.to(args.device)
        scorer.fit(train_images[train_labels == c], k=args.knn_k)  # the normal class's training images: knn's reference
        scores = scorer.score(images, torch.full((len(images),), c))  # the normal class as the condition
        anomalous = (labels != c).numpy()
        # The same nearest-neighbour rule on raw pixels, no model: what the tokenizer's latent space adds.
        normal = knn_index(train_images[train_labels == c].flatten(1))
        pixel_knn = torch.cat([knn_distance(x.flatten(1), normal, args.knn_k) for x in images.split(1000)])
        scores[PIXEL_KNN] = pixel_knn.double().numpy()
        results[c] = {k: 100 * auroc(scores[k], anomalous) for k in COLUMNS}
        print(f"class {c} ({FASHION_MNIST_CLASSES[c]}): " + ", ".join(f"{k} {v:.1f}" for k, v in results[c].items())
              + f"  [{(time.perf_counter() - t) / 60:.1f} min]", flush=True)  # fmt: skip
    means = {k: float(np.mean([r[k] for r in results.values()])) for k in COLUMNS}
    with open(os.path.join(args.out, "auroc.json"), "w") as f:
        json.dump({"per_class": results, "mean": means, "preset": args.preset, "tokenizer_steps": args.tokenizer_steps,
                   "prior_steps": args.prior_steps, "knn_k": args.knn_k, "machine": machine()}, f, indent=2)  # fmt: skip
    print("\n| class | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
    for c, r in results.items():
        print(f"| {c} {FASHION_MNIST_CLASSES[c]} | " + " | ".join(f"{r[k]:.1f}" for k in COLUMNS) + " |")
    print("| **mean** | " + " | ".join(f"**{means[k]:.1f}**" for k in COLUMNS) + " |")
    best = max(SCORES, key=means.get)
    above = [name for name, v in PUBLISHED.items() if means[best] > v]
    print(f"best score {best}: mean AUROC {means[best]:.1f}; above {', '.join(above) or 'none'} of {list(PUBLISHED)}")
    for k in SCORES:
        report(f"one-class AUROC on Fashion-MNIST, mean over {len(results)} classes ({k})", means[k], "%", "GEOM", 93.5,
               ratio=means[k] / 93.5, target=">= 93.5" if k == best else "(reported)", ok=means[k] >= 93.5 if k == best else None)  # fmt: skip
    report("knn in the tokenizer's latent space against knn on raw pixels, mean AUROC", means["knn"], "%", PIXEL_KNN,
           means[PIXEL_KNN], ratio=means["knn"] / means[PIXEL_KNN], target="(reported)", ok=None)  # fmt: skip


if __name__ == "__main__":
    main()
