"""Feature spaces for the sample-quality metrics: the reference classifier, or Inception-v3 (standard FID)."""

from __future__ import annotations

import torch

from common.cli import UserError
from common.images import to_uint8

from .classifier import Classifier


class ClassifierSpace:
    """The reference classifier's pooled features, and its logits for class accuracy. Works offline."""

    name = "classifier"

    def __init__(self, classifier: Classifier):
        self.classifier = classifier.eval()

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> (features (B, D), logits (B, num_classes)), float32 on the CPU."""
        f = self.classifier.features(images.to(self.device).float())
        return f.float().cpu(), self.classifier.head(f).float().cpu()


class InceptionSpace:
    """Inception-v3 pool features as in the standard FID, through torch-fidelity.

    torch-fidelity downloads the weights on first use, so this space needs a network once; offline it
    fails with one line. Grayscale images are repeated to three channels; torch-fidelity resizes to
    299 px itself, as the reference TensorFlow implementation does.
    """

    name = "inception"

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("--features inception needs torch-fidelity: pip install 'vqgpt[fid]'") from None
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval().to(device)
        except Exception as e:  # weights not cached and no network
            raise UserError(f"the Inception-v3 weights could not be loaded ({type(e).__name__}); torch-fidelity fetches them on first use, "
                            "so the standard FID needs a network once; offline, use --features classifier") from None  # fmt: skip
        self.device = torch.device(device)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        (features,) = self.net(x.to(self.device))
        return features.float().cpu(), None
