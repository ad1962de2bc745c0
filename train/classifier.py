"""The evaluation's networks: a third stage of the one training loop.

    accelerate launch -m train.classifier --dataset fashion_mnist --output-dir runs/classifier
    accelerate launch -m train.classifier --arch resnet --shift 2 --flip --output-dir runs/resnet
    accelerate launch -m train.classifier --arch resnet --objective contrastive --output-dir runs/contrastive

Each one's features are a feature space of ``python -m evaluation`` (Fréchet distance, KID, precision,
recall); the reference classifier's predictions give the class accuracy of samples. The contrastive
encoder never sees a label: SimCLR's loss over two augmented views of every image.
"""

from __future__ import annotations

import math
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
    shift: int = option(0, "Random translation of up to N pixels while training.", domain="non-negative")
    flip: bool = option(False, "Random horizontal flips while training (off by default: not every domain is symmetric).")
    arch: str = option("vgg", "Network family: vgg (the reference classifier) or resnet (a small ResNet).", choices=["vgg", "resnet"])  # fmt: skip
    objective: str = option("labels", "labels (cross-entropy), or contrastive: SimCLR over two augmented views, no labels (a feature space not trained on the classes).", choices=["labels", "contrastive"])  # fmt: skip
    crop_scale: float = option(0.5, "Contrastive: the smallest area of a random crop, as a fraction of the image.", domain="fraction")  # fmt: skip
    temperature: float = option(0.2, "Contrastive: the NT-Xent temperature.", domain="positive")


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in both directions, filling with black (-1)."""
    if pixels == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, b)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def random_view(x: torch.Tensor, crop_scale: float, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """SimCLR's view of each image: a random crop (area in [crop_scale, 1], aspect in [3/4, 4/3]) resized
    back, an optional horizontal flip, and brightness/contrast jitter. No blur and no noise: those are
    what the evaluation's spaces must tell apart from real images."""
    b = x.shape[0]
    u = torch.rand(b, 7, generator=generator).to(x.device)
    area = crop_scale + (1 - crop_scale) * u[:, 0]
    aspect = torch.exp((u[:, 1] - 0.5) * 2 * math.log(4 / 3))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    tx, ty = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)
    mirror = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=x.device)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * mirror, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast, brightness = (0.6 + 0.8 * u[:, 5]).view(b, 1, 1, 1), (0.4 * u[:, 6] - 0.2).view(b, 1, 1, 1)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    return ((view - mean) * contrast + mean + brightness).clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's loss: each view's positive is the other view of its image, the other 2B - 2 rows are its
    negatives -> (loss, fraction of rows whose nearest other row is their positive)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target), (sim.argmax(1) == target).float().mean()


class ClassifierStage:
    name = "classifier"

    def __init__(self, data_args: TrainingDataArguments, model_args: ClassifierArguments):
        self.data_args, self.model_args = data_args, model_args

    def _contrastive(self, model, x, generator=None):
        a = self.model_args
        views = torch.cat([random_view(x, a.crop_scale, a.flip, generator) for _ in range(2)])  # one batch-norm batch
        z1, z2 = model(views).chunk(2)
        return nt_xent(z1, z2, a.temperature)

    def training_loss(self, model, batch, step):
        x = random_shift(batch["pixel_values"], self.model_args.shift)
        if self.model_args.objective == "contrastive":
            loss, hit = self._contrastive(model, x)
            return loss, {"positive_top1": hit}
        if self.model_args.flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        correct, losses, n = 0.0, 0.0, 0
        g = torch.Generator().manual_seed(accelerator.process_index)  # the same views at every evaluation
        for batch in loader:
            if self.model_args.objective == "contrastive":
                loss, hit = self._contrastive(model, batch["pixel_values"], g)
                hit, loss = accelerator.gather_for_metrics((hit.view(1) * len(batch["labels"]), loss.view(1) * len(batch["labels"])))
                count = accelerator.gather_for_metrics(torch.tensor([len(batch["labels"])], device=hit.device))
                correct, losses, n = correct + float(hit.sum()), losses + float(loss.sum()), n + int(count.sum())
                continue
            logits = model(batch["pixel_values"]).float()
            loss = F.cross_entropy(logits, batch["labels"], reduction="none")
            hit, loss = accelerator.gather_for_metrics(((logits.argmax(-1) == batch["labels"]).float(), loss))
            correct, losses, n = correct + float(hit.sum()), losses + float(loss.sum()), n + len(hit)
        name = "positive_top1" if self.model_args.objective == "contrastive" else "accuracy"
        return {name: correct / max(n, 1), "loss": losses / max(n, 1)}

    def image(self, model, accelerator):
        return None

    def model_card(self, model):
        cfg = model.config
        family = {"vgg": "A VGG-style CNN", "resnet": "A small ResNet"}[cfg.arch]
        size = f"{cfg.in_channels}-channel {cfg.image_size[0]}x{cfg.image_size[1]} images"
        what = (f"{family} classifying {size} into {cfg.num_classes} classes, trained by vqgpt" if cfg.objective == "labels" else
                f"{family} encoder of {size} trained by vqgpt without labels (SimCLR: NT-Xent over two augmented views)")  # fmt: skip
        return dict(
            title=f"vqgpt evaluation network ({cfg.kind})",
            summary=(f"{what}. Its {cfg.feature_dim}-dimensional pooled features are a feature space of vqgpt's offline "
                     "Fréchet distance, KID and precision/recall" + ("; its predictions give class accuracy." if cfg.objective == "labels" else ".")),  # fmt: skip
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
    if len(data.class_names) < 2 and model_args.objective == "labels":
        raise UsageError(f"dataset {data_args.dataset} has {len(data.class_names)} class(es); a classifier needs labels of at least 2 classes (or --objective contrastive)")  # fmt: skip
    size = (data_args.resolution,) * 2 if data_args.resolution else data.size
    config = ClassifierConfig(in_channels=data.channels, num_classes=len(data.class_names), width=model_args.width,
                              dropout=model_args.dropout, class_names=data.class_names, dataset=data_args.dataset,
                              image_size=list(size), arch=model_args.arch, objective=model_args.objective)  # fmt: skip
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
