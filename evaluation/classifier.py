"""The evaluation's own networks: small CNNs trained by vqgpt on the dataset itself.

Their pooled activations are feature spaces of the offline Fréchet distance, KID and precision/recall.
Three kinds, so that no single network decides sample quality: the reference classifier (VGG-style,
``arch="vgg"``), whose predictions also give the class accuracy of samples; a classifier of another
family (``arch="resnet"``, trained with augmentation); and an encoder trained without the labels
(``objective="contrastive"``, SimCLR's NT-Xent over two augmented views). Trained with
``train.classifier`` (the shared loop), saved and pushed like the tokenizer (``PyTorchModelHubMixin``,
strict loading).
"""

# No `from __future__ import annotations`: PyTorchModelHubMixin reads the real config annotation.
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.hub import HubMixin


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 16  # channels at full resolution, doubled at each of the two poolings; features: 4 x width
    dropout: float = 0.2  # before the last layer; the features are taken before it
    class_names: list = field(default_factory=list)
    dataset: str = ""  # the dataset it was trained on: the evaluation's default reference
    image_size: list = field(default_factory=lambda: [28, 28])  # (H, W) it was trained at; inputs are resized to it
    arch: str = "vgg"  # vgg | resnet
    objective: str = "labels"  # labels (cross-entropy) | contrastive (SimCLR: no labels, a projection head)
    projection_dim: int = 64  # contrastive: the projection head's output

    @property
    def feature_dim(self) -> int:
        return self.width * 4

    @property
    def kind(self) -> str:
        """The feature space's name in reports: vgg, resnet, contrastive-resnet, ..."""
        return self.arch if self.objective == "labels" else f"{self.objective}-{self.arch}"


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convolutions with batch norm, identity or 1x1 projected shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))  # fmt: skip
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _body(config: ClassifierConfig) -> nn.Module:
    w, c = config.width, config.in_channels
    if config.arch == "vgg":
        # VGG-style with batch norm: it learns Fashion-MNIST to ~90% test accuracy in 1000 CPU steps.
        return nn.Sequential(
            *_conv(c, w), *_conv(w, w), nn.MaxPool2d(2),  # (H, W) -> (H/2, W/2)
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),  # -> (H/4, W/4)
            *_conv(2 * w, 4 * w),
        )  # fmt: skip
    if config.arch == "resnet":  # a small ResNet: a stem, then two stages of one basic block, each halving the size
        return nn.Sequential(*_conv(c, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
    raise ValueError(f"classifier arch {config.arch!r}: expected vgg or resnet")


class Classifier(nn.Module, HubMixin, library_name="vqgpt", tags=["vqgpt", "image-classification"]):
    """Images (B, C, H, W) in [-1, 1] -> class logits (or, contrastive, projections); :meth:`features`
    gives the evaluation's embedding."""

    model_kind = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.objective not in ("labels", "contrastive"):
            raise ValueError(f"classifier objective {config.objective!r}: expected labels or contrastive")
        self.config = config
        self.body = _body(config)
        d = config.feature_dim
        if config.objective == "labels":
            self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d, config.num_classes))
        else:  # SimCLR's projection MLP; the features are taken before it
            self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, config.projection_dim))

    @property
    def predicts_classes(self) -> bool:
        return self.config.objective == "labels"

    def check_images(self, x: torch.Tensor) -> None:
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"images have shape {tuple(x.shape)}; the classifier expects (B, {c}, H, W)")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 4 * width): globally pooled activations before the last layer."""
        self.check_images(x)
        size = tuple(self.config.image_size)
        if tuple(x.shape[-2:]) != size:  # samples of another resolution are compared at the trained one
            x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
