"""Score samples against a real split in several feature spaces: Fréchet distance, KID, precision, recall,
class accuracy and the detail statistic, each beside its real-data floor.

    python -m evaluation --samples samples/ --classifier runs/classifier --spaces runs/resnet runs/contrastive
    python -m evaluation --prior runs/prior --classifier runs/classifier --per-class 80 --guidance-scale 2
    python -m evaluation --samples samples/ --classifier runs/classifier --spaces inception   # standard FID

Prints a table and writes it as JSON (--output-json). The reference is the test split of --dataset (by
default the dataset the classifier was trained on); the floor is the same metric for as many real
training images as there are samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.cli import UsageError, option, parse_args, run_main
from common.data import DataArguments, model_transform
from common.files import atomic_write_text
from sample.pipeline import ClassConditionalPipeline, SamplingArguments

from .evaluator import Evaluator, load_sample_folder
from .features import load_spaces


@dataclass
class EvaluationArguments:
    samples: str | None = option(None, "A sample folder (as `python -m sample` writes it, or any imagefolder).")
    prior: str | None = option(None, "Or a prior: --per-class images of every class are sampled first.")
    classifier: str | None = option(None, "The reference classifier (train.classifier output or Hub id): the first feature space, and class accuracy.")  # fmt: skip
    spaces: list[str] = option([], "More feature spaces: train.classifier outputs or Hub ids (--arch resnet, --objective contrastive, ...), or inception (standard FID; downloads its weights once).")  # fmt: skip
    per_class: int = option(80, "With --prior: images per class.", domain="positive")
    max_reference: int | None = option(None, "Use only the first N images of the reference split.", domain="positive")
    output_json: str | None = option(None, "Write the report here as JSON.")

    def validate(self) -> None:
        if (self.samples is None) == (self.prior is None):
            raise UsageError("pass exactly one of --samples (a folder of images) or --prior (to sample from)")
        if self.samples is not None and not os.path.isdir(self.samples):
            raise UsageError(f"--samples {self.samples!r}: expected an existing folder of images")
        if self.classifier is None:
            raise UsageError("--classifier is required: a train.classifier output folder (the feature space, and class accuracy)")


def evaluate(args: EvaluationArguments, data_args: DataArguments, sampling: SamplingArguments):
    """The command as a function: the report."""
    spaces, classifier = load_spaces(args.classifier, args.spaces, sampling.device)
    if data_args.dataset == DataArguments.dataset and classifier.config.dataset:
        data_args.dataset = classifier.config.dataset  # the dataset the classifier knows
    names = list(classifier.config.class_names)
    if args.samples is not None:
        transform = model_transform(data_args, classifier.config.in_channels, "the classifier")
        found, labels = load_sample_folder(args.samples, names, transform)
        images = found.batches()  # read one batch at a time
    else:
        pipe = ClassConditionalPipeline.from_pretrained(args.prior, device=sampling.device)
        if pipe.class_names != names:
            raise UsageError(f"the prior's classes {pipe.class_names} are not the classifier's {names}")
        labels = torch.arange(len(names)).repeat_interleave(args.per_class)
        sampling.announce(pipe)
        images = pipe(labels.tolist(), **sampling.pipeline_kwargs()).cpu()
    evaluator = Evaluator.from_dataset(spaces, data_args, classifier=classifier, max_reference=args.max_reference)
    return evaluator.score(images, labels)


def main(argv=None):
    args, data_args, sampling = parse_args((EvaluationArguments, DataArguments, SamplingArguments), argv)
    report = evaluate(args, data_args, sampling)
    print(report.table())
    if args.output_json:
        atomic_write_text(args.output_json, report.to_json() + "\n")
        print(f"report written to {args.output_json}")


if __name__ == "__main__":
    run_main(main)
