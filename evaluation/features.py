"""Feature spaces of the sample-quality metrics: vqgpt's own evaluation networks, and Inception-v3.

No single network decides quality: an evaluation holds several spaces of different kinds (the reference
classifier, a classifier of another family, an encoder trained without labels; Inception-v3 where its
weights exist), made by :func:`load_spaces` from the command lines' ``--classifier`` and ``--spaces``.
"""

from __future__ import annotations

import torch

from common.cli import UserError
from common.images import to_uint8

from .classifier import Classifier


class ClassifierSpace:
    """The pooled features of a network made by ``train.classifier`` (any ``--arch``, any ``--objective``),
    and its logits when it predicts classes (class accuracy). Works offline."""

    def __init__(self, classifier: Classifier, name: str | None = None):
        self.classifier = classifier.eval()
        self.name = name or classifier.config.kind
        self.predicts_classes = classifier.predicts_classes

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, C, H, W) in [-1, 1] -> (features (B, D), logits (B, classes) or None), float32 on the
        space's device."""
        f = self.classifier.features(images.to(self.device).float()).float()
        return f, (self.classifier.head(f).float() if self.predicts_classes else None)


class InceptionSpace:
    """Inception-v3 pool features as in the standard FID, through torch-fidelity.

    torch-fidelity downloads the weights on first use, so this space needs a network once; offline it
    fails with one line. Grayscale images are repeated to three channels; torch-fidelity resizes to
    299 px itself, as the reference TensorFlow implementation does.
    """

    name = "inception"
    predicts_classes = False

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("the inception space needs torch-fidelity: pip install 'vqgpt[fid]'") from None
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval().to(device)
        except Exception as e:  # weights not cached and no network
            raise UserError(f"the Inception-v3 weights could not be loaded ({type(e).__name__}); torch-fidelity fetches them on first use, "
                            "so the standard FID needs a network once; offline, leave inception out of --spaces") from None  # fmt: skip
        self.device = torch.device(device)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        (features,) = self.net(x.to(self.device))
        return features.float(), None


def load_spaces(classifier: str, spaces: list[str] | None = None, device: str | torch.device = "cpu") -> tuple[list, Classifier]:
    """``--classifier`` (the reference classifier: the first space, and class accuracy) and ``--spaces``
    (more spaces: ``train.classifier`` outputs or Hub ids of any architecture or objective, or
    ``inception``) -> (the spaces, the reference classifier). Names are unique (``resnet``, ``resnet-2``)."""
    reference = Classifier.from_pretrained(classifier).to(device).eval()
    if not reference.predicts_classes:
        raise UserError(f"--classifier {classifier}: a {reference.config.kind} network does not predict classes; "
                        "the reference classifier is one trained with --objective labels (pass this one in --spaces)")  # fmt: skip
    out = [ClassifierSpace(reference)]
    for spec in spaces or []:
        space = InceptionSpace(device) if spec == "inception" else ClassifierSpace(Classifier.from_pretrained(spec).to(device))
        if isinstance(space, ClassifierSpace):
            cfg, ref = space.classifier.config, reference.config
            if cfg.in_channels != ref.in_channels or (cfg.class_names and cfg.class_names != ref.class_names):
                raise UserError(f"--spaces {spec}: trained on {cfg.in_channels}-channel images of classes {cfg.class_names}; "
                                f"the reference classifier on {ref.in_channels}-channel images of {ref.class_names}")  # fmt: skip
        taken = {s.name for s in out}
        if space.name in taken:
            space.name = next(f"{space.name}-{i}" for i in range(2, len(out) + 2) if f"{space.name}-{i}" not in taken)
        out.append(space)
    return out, reference
