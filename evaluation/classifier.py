"""The reference classifier: a small CNN trained by vqgpt on the dataset itself.

Its penultimate activations are the feature space of the offline Fréchet distance and precision/recall,
and its predictions give the class accuracy of samples. Trained with ``train.classifier`` (the shared
loop), saved and pushed like the tokenizer (``PyTorchModelHubMixin``, strict loading).
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

    @property
    def feature_dim(self) -> int:
        return self.width * 4


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Classifier(nn.Module, HubMixin, library_name="vqgpt", tags=["vqgpt", "image-classification"]):
    """Images (B, C, H, W) in [-1, 1] -> class logits; :meth:`features` gives the evaluation's embedding."""

    model_kind = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        # VGG-style with batch norm: it learns Fashion-MNIST to ~90% test accuracy in 1000 CPU steps
        # (GroupNorm and residual blocks were measured slower to learn at this size).
        self.body = nn.Sequential(
            *_conv(config.in_channels, w), *_conv(w, w), nn.MaxPool2d(2),  # (H, W) -> (H/2, W/2)
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),  # -> (H/4, W/4)
            *_conv(2 * w, 4 * w),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(4 * w, config.num_classes))

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
