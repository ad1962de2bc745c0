"""Anomaly scores of images under a tokenizer and its prior: CSV, JSON and a histogram.

    python -m anomaly --prior runs/prior --input images/ --output-dir scores/
    python -m anomaly --prior runs/prior-bags --dataset fashion_mnist --split test --normal-classes Bag --reference train --output-dir scores/

writes OUTPUT_DIR/scores.csv (one row per image: id, label, nll, reconstruction, combined, and knn with
--reference), OUTPUT_DIR/summary.json and OUTPUT_DIR/histogram.png (one panel per score). With
--normal-classes (class names or ids of the dataset, or <class>/ folders of --input), every other class
counts as anomalous and the summary gives each score's AUROC and the threshold at --fpr. --reference
(a folder of normal images, or 'train': the training images of --normal-classes) adds the knn score.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from common.cli import UsageError, option, parse_args, run_main
from common.data import DataArguments, ImageTransform, class_ids, load_image_data, load_tensors, model_transform, read_images
from common.files import publish_dir, staging_dir

from .scores import AnomalyScorer, auroc, reference_images, threshold_at_fpr


@dataclass
class AnomalyArguments:
    prior: str = option(None, "Prior folder or Hub id (and the tokenizer it names).")
    tokenizer: str | None = option(None, "Override the tokenizer the prior names.")
    input: str | None = option(None, "A folder of images (<class>/ subfolders give labels); or use --dataset/--split.")
    split: str = option("test", "With --dataset: the split to score.", choices=["train", "test"])
    normal_classes: str | None = option(None, "Comma list of the normal classes (names or ids); the others are anomalies.")
    condition: str = option("null", "Score under the null class ('null'), each image's own class ('label', a cheat for evaluation), or one class name.")  # fmt: skip
    fpr: float = option(0.05, "False-positive rate at which the threshold is reported.", domain="fraction")
    sigma2: float | None = option(None, "Variance of the pixel model in 'combined'; default the tokenizer's test MSE.", domain="positive")  # fmt: skip
    reference: str | None = option(None, "Normal images for the knn score: a folder, or 'train' (the training images of --normal-classes in --dataset).")  # fmt: skip
    knn_k: int = option(5, "Nearest reference images averaged by the knn score.", domain="positive")
    output_dir: str = option("anomaly-scores", "Written whole at the end.")

    def validate(self) -> None:
        if not self.prior:
            raise UsageError("--prior is required: a train.prior output folder or a Hub id")
        if self.input is not None and not os.path.isdir(self.input):
            raise UsageError(f"--input {self.input!r}: expected a folder of images")
        if self.reference == "train" and not self.normal_classes:
            raise UsageError("--reference train: needs --normal-classes, the classes whose training images are normal")
        if self.reference == "train" and self.input is not None:
            raise UsageError("--reference train: takes the training split of --dataset; with --input, give a folder of normal images")  # fmt: skip
        if self.reference not in (None, "train") and not os.path.isdir(self.reference):
            raise UsageError(f"--reference {self.reference!r}: expected a folder of normal images or 'train'")


def _load(args: AnomalyArguments, data_args: DataArguments, transform: ImageTransform):
    """(images, labels as class ids, class names, ids, the loaded dataset or None for --input)."""
    if args.input is not None:
        found = read_images(args.input, transform)
        names = sorted({n for n in found.labels if n is not None})
        return found.images, found.class_ids(names), names, found.files, None
    data = load_image_data(data_args)
    ds = data.test if args.split == "test" else data.train
    images, labels = load_tensors(ds, transform)
    return images, labels, data.class_names, [f"{args.split}/{i}" for i in range(len(images))], data


def histograms(scores: dict[str, np.ndarray], anomalous: np.ndarray | None, path: str) -> None:
    """One histogram panel per score (normal images and anomalies apart when known), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    units = {"nll": "bits per image", "reconstruction": "MSE per pixel", "combined": "bits per image", "knn": "latent distance"}
    fig, axes = plt.subplots(len(scores), 1, figsize=(7, 2.6 * len(scores)), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], scores.items()):
        bins = np.histogram_bin_edges(values, bins=50)
        if anomalous is None:
            ax.hist(values, bins=bins, color="tab:blue", label="images")
        else:
            for mask, label, color in ((~anomalous, "normal", "tab:blue"), (anomalous, "anomalous", "tab:red")):
                ax.hist(values[mask], bins=bins, density=True, histtype="step", color=color, label=f"{label} ({int(mask.sum())})")
        ax.set(title=name, xlabel=f"{name} ({units[name]}); higher: more anomalous", ylabel="density" if anomalous is not None else "images")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args, data_args = parse_args((AnomalyArguments, DataArguments), argv)
    scorer = AnomalyScorer.from_pretrained(args.prior, args.tokenizer, args.sigma2)
    transform = model_transform(data_args, scorer.tokenizer.config.in_channels, "the tokenizer")
    images, labels, names, ids, data = _load(args, data_args, transform)
    prior_names = scorer.info.class_names
    if args.condition == "null":
        conditions = None
    elif args.condition == "label":
        if names != prior_names:
            raise UsageError(f"--condition label: the data's classes {names} are not the prior's {prior_names}")
        conditions = labels
    elif args.condition in prior_names:
        conditions = torch.full((len(images),), prior_names.index(args.condition))
    else:
        raise UsageError(f"--condition {args.condition!r}: expected null, label or one of {prior_names}")
    if args.reference:
        reference = reference_images(args.reference, args.normal_classes, data_args, transform, data)
        scorer.fit(reference, k=args.knn_k)
    scores = scorer.score(images, conditions)
    anomalous = None
    summary: dict = {"images": len(images), "prior": args.prior, "condition": args.condition, "sigma2": scorer.sigma2}
    if args.reference:
        summary.update(reference=args.reference, reference_images=len(reference), knn_k=args.knn_k,
                       data=dataclasses.asdict(data_args))  # fmt: skip
    if args.normal_classes:
        normal = class_ids(args.normal_classes, names, "--normal-classes")
        anomalous = ~np.isin(labels.numpy(), sorted(normal))
        summary["normal_classes"] = [names[i] for i in sorted(normal)]
        for k in scores:
            threshold, tpr, fpr = threshold_at_fpr(scores[k], anomalous, args.fpr)
            summary[k] = {"auroc": auroc(scores[k], anomalous), "threshold": threshold, "tpr_at_fpr": tpr, "fpr": fpr}
    tmp = staging_dir(args.output_dir)
    with open(os.path.join(tmp, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", *scores])
        for i in range(len(images)):
            label = names[int(labels[i])] if names and labels[i] >= 0 else ""
            writer.writerow([ids[i], label, *(f"{v[i]:.6g}" for v in scores.values())])
    with open(os.path.join(tmp, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    histograms(scores, anomalous, os.path.join(tmp, "histogram.png"))
    publish_dir(tmp, args.output_dir)
    print(f"scored {len(images)} images -> {args.output_dir}/scores.csv, summary.json, histogram.png")
    if anomalous is not None:
        for k in scores:
            s = summary[k]
            print(f"  {k:14s} AUROC {s['auroc']:.4f}; at FPR {s['fpr']:.3f}: threshold {s['threshold']:.5g}, TPR {s['tpr_at_fpr']:.3f}")


if __name__ == "__main__":
    run_main(main)
