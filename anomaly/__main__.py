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
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from tqdm.auto import tqdm

from common.cli import UsageError, announce_memory, option, parse_args, run_main
from common.data import DataArguments, ImageTransform, class_ids, image_batches, load_image_data, model_transform, read_images
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
    output_dir: str = option("anomaly-scores", "Appears when complete (written in a staging folder beside it).")

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


def _load(args: AnomalyArguments, data_args: DataArguments, transform: ImageTransform, batch_size: int = 500):
    """(batches of (images, labels as class ids), class names, ids, the loaded dataset or None for --input),
    read one batch at a time."""
    if args.input is not None:
        found = read_images(args.input, transform)
        names = sorted({n for n in found.labels if n is not None})
        return zip(found.batches(batch_size), found.class_ids(names).split(batch_size)), names, found.files, None
    data = load_image_data(data_args)
    ds = data.test if args.split == "test" else data.train
    return image_batches(ds, transform, batch_size), data.class_names, [f"{args.split}/{i}" for i in range(len(ds))], data


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
    batches, names, ids, data = _load(args, data_args, transform)
    prior_names = scorer.info.class_names
    if args.condition not in ("null", "label", *prior_names):
        raise UsageError(f"--condition {args.condition!r}: expected null, label or one of {prior_names}")
    if args.condition == "label" and names != prior_names:
        raise UsageError(f"--condition label: the data's classes {names} are not the prior's {prior_names}")
    normal = class_ids(args.normal_classes, names, "--normal-classes") if args.normal_classes else None
    if args.reference:
        reference, count = reference_images(args.reference, args.normal_classes, data_args, transform, data)
        first = next(reference)  # the latents of every reference image are kept: their size, before they are computed
        h, w = scorer.tokenizer.code_grid(*first.shape[-2:])
        announce_memory(f"the knn reference of {count} images", 4 * count * scorer.tokenizer.config.code_dim * h * w)
        scorer.fit(itertools.chain([first], reference), k=args.knn_k)
    parts, labels = [], []
    for x, y in tqdm(batches, total=-(-len(ids) // 500), desc="score", unit="batch"):
        if args.condition in ("null", "label"):
            conditions = None if args.condition == "null" else y
        else:
            conditions = torch.full((len(x),), prior_names.index(args.condition))
        parts.append(scorer.score(x, conditions))
        labels.append(y)
    scores, labels = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, torch.cat(labels)
    anomalous = None
    summary: dict = {"images": len(labels), "prior": args.prior, "condition": args.condition, "sigma2": scorer.sigma2}
    if args.reference:
        summary.update(reference=args.reference, reference_images=count, knn_k=args.knn_k,
                       data=dataclasses.asdict(data_args))  # fmt: skip
    if normal is not None:
        anomalous = ~np.isin(labels.numpy(), sorted(normal))
        summary["normal_classes"] = [names[i] for i in sorted(normal)]
        for k in scores:
            threshold, tpr, fpr = threshold_at_fpr(scores[k], anomalous, args.fpr)
            summary[k] = {"auroc": auroc(scores[k], anomalous), "threshold": threshold, "tpr_at_fpr": tpr, "fpr": fpr}
    tmp = staging_dir(args.output_dir)
    with open(os.path.join(tmp, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", *scores])
        for i in range(len(labels)):
            label = names[int(labels[i])] if names and labels[i] >= 0 else ""
            writer.writerow([ids[i], label, *(f"{v[i]:.6g}" for v in scores.values())])
    with open(os.path.join(tmp, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    histograms(scores, anomalous, os.path.join(tmp, "histogram.png"))
    publish_dir(tmp, args.output_dir)
    print(f"scored {len(labels)} images -> {args.output_dir}/scores.csv, summary.json, histogram.png")
    if anomalous is not None:
        for k in scores:
            s = summary[k]
            print(f"  {k:14s} AUROC {s['auroc']:.4f}; at FPR {s['fpr']:.3f}: threshold {s['threshold']:.5g}, TPR {s['tpr_at_fpr']:.3f}")


if __name__ == "__main__":
    run_main(main)
