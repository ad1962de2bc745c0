"""The reference classifier of the evaluation: a third stage of the one training loop.

    accelerate launch -m train.classifier --dataset fashion_mnist --output-dir runs/classifier

Its features are the offline feature space of ``python -m evaluation`` (Fréchet distance, precision,
recall) and its predictions give the class accuracy of samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from common.cli import UsageError, option, parse_args, run_main
from common.data import ImageTransform, TrainingDataArguments, image_loaders, load_image_data
from evaluation.classifier import Classifier, ClassifierConfig
from train.loop import TrainingArguments, make_accelerator, train


@dataclass
class ClassifierArguments:
    width: int = option(16, "Channels at full resolution (features: 4 x width).", domain="positive")
    dropout: float = option(0.2, "Dropout before the last layer.", domain="probability")
    shift: int = option(0, "Random translation of up to N pixels while training (no flips: not every domain is symmetric).", domain="non-negative")  # fmt: skip


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in both directions, filling with black (-1)."""
    if pixels == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, b)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


class ClassifierStage:
    name = "classifier"

    def __init__(self, data_args: TrainingDataArguments, model_args: ClassifierArguments):
        self.data_args, self.model_args = data_args, model_args

    def training_loss(self, model, batch, step):
        logits = model(random_shift(batch["pixel_values"], self.model_args.shift))
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        correct, losses, n = 0.0, 0.0, 0
        for batch in loader:
            logits = model(batch["pixel_values"]).float()
            loss = F.cross_entropy(logits, batch["labels"], reduction="none")
            hit, loss = accelerator.gather_for_metrics(((logits.argmax(-1) == batch["labels"]).float(), loss))
            correct, losses, n = correct + float(hit.sum()), losses + float(loss.sum()), n + len(hit)
        return {"accuracy": correct / max(n, 1), "loss": losses / max(n, 1)}

    def image(self, model, accelerator):
        return None

    def model_card(self, model):
        cfg = model.config
        return dict(
            title="vqgpt reference classifier",
            summary=(f"A VGG-style CNN classifying {cfg.in_channels}-channel {cfg.image_size[0]}x{cfg.image_size[1]} images into "
                     f"{cfg.num_classes} classes, trained by vqgpt. Its {cfg.feature_dim}-dimensional pooled features are the "
                     "feature space of vqgpt's offline Fréchet distance and precision/recall; its predictions give class accuracy."),  # fmt: skip
            dataset=self.data_args.dataset,
            details={"dataset": self.data_args.dataset, **{k: v for k, v in asdict(cfg).items() if k != "class_names"}},
            tags=["image-classification", "evaluation"],
            usage='python -m evaluation --samples samples/ --classifier PATH_OR_REPO_ID',
        )  # fmt: skip


def main(argv=None):
    args, data_args, model_args = parse_args((TrainingArguments, TrainingDataArguments, ClassifierArguments), argv,
                                             learning_rate=3e-3, lr_scheduler="cosine", weight_decay=0.05,
                                             train_batch_size=128, max_train_steps=1000, lr_warmup_steps=100)  # fmt: skip
    accelerator = make_accelerator(args, "classifier")
    with accelerator.main_process_first():
        data = load_image_data(data_args, seed=args.seed)
    if len(data.class_names) < 2:
        raise UsageError(f"dataset {data_args.dataset} has {len(data.class_names)} class(es); a classifier needs labels of at least 2 classes")  # fmt: skip
    size = (data_args.resolution,) * 2 if data_args.resolution else data.size
    config = ClassifierConfig(in_channels=data.channels, num_classes=len(data.class_names), width=model_args.width,
                              dropout=model_args.dropout, class_names=data.class_names,
                              dataset=data_args.dataset, image_size=list(size))  # fmt: skip
    transform = ImageTransform(data.channels, data_args.resolution, size=data.size, convert=data_args.image_channels is not None)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = Classifier(config)
    train_loader, eval_loader = image_loaders(data, transform, args, data_args, accelerator)
    stage = ClassifierStage(data_args, model_args)
    metrics = train(accelerator, args, stage, model, train_loader, eval_loader,
                    tracker_config={**asdict(data_args), **asdict(model_args)})  # fmt: skip
    return model, metrics, stage


if __name__ == "__main__":
    run_main(main)
