"""Anomaly scores from a tokenizer and its prior; higher means more anomalous.

- ``nll``: the negative log-likelihood of the image's codes under the prior, in bits per image (with a
  class condition, or the null class).
- ``reconstruction``: the mean squared error of the tokenizer's reconstruction, per pixel ([-1, 1] scale).
- ``combined``: the two-part code length of the image in bits: its codes under the prior, plus its pixels
  given the codes under a Gaussian whose variance is the tokenizer's mean squared error on normal data,
  ``nll + SSE / (2 sigma^2 ln 2)`` (the constant ``N/2 log2(2 pi sigma^2)`` is the same for every image and
  dropped). Both terms are bits of the same description, so neither needs a hand-set weight.
- ``knn``: the mean Euclidean distance from the image's encoder latent (the tokenizer's continuous output
  before quantization, flattened) to its ``k`` nearest latents among reference images known to be normal
  (``fit``), as deep nearest-neighbour anomaly detection does with a learned feature space (Bergman,
  Cohen & Hoshen 2020). Only present once the scorer has a reference; score images outside it (an image
  of the reference is at distance zero from itself).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors

from common.cli import UserError
from common.data import DataArguments, ImageData, ImageTransform, class_ids, image_batches, load_image_data, model_transform, read_images
from prior import bits, load_prior, prior_loss
from tokenizer import VQVAE

SCORES = ("nll", "reconstruction", "combined", "knn")


class AnomalyScorer:
    """Scores images (N, C, H, W) in [-1, 1] with a prior and the tokenizer it was trained on."""

    def __init__(self, tokenizer: VQVAE, prior, info, sigma2: float):
        info.check_tokenizer(tokenizer)
        self.tokenizer, self.prior, self.info, self.sigma2 = tokenizer.eval(), prior.eval(), info, sigma2
        self.reference: NearestNeighbors | None = None  # fitted on the latents of normal images by fit()
        self.k = 5

    @classmethod
    def from_pretrained(cls, prior_path: str, tokenizer: str | None = None, sigma2: float | None = None) -> AnomalyScorer:
        """``sigma2``: the variance of the pixel model; default the tokenizer's own test error (its metrics.json)."""
        prior, info = load_prior(prior_path)
        ref = tokenizer or info.tokenizer
        if not ref:
            raise UserError(f"prior {prior_path} names no tokenizer; pass --tokenizer")
        if sigma2 is None:
            metrics = os.path.join(ref, "metrics.json")
            if not os.path.exists(metrics):
                raise UserError(f"tokenizer {ref} has no metrics.json to take the pixel variance from; pass --sigma2")
            with open(metrics) as f:
                sigma2 = float(json.load(f)["rec_loss"])
        return cls(VQVAE.from_pretrained(ref), prior, info, sigma2)

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @torch.inference_mode()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        self.tokenizer.check_images(x)
        return self.tokenizer.encoder(x.to(self.device))

    @torch.inference_mode()
    def fit(self, normal_images, k: int = 5, batch_size: int = 500) -> AnomalyScorer:
        """Keep the encoder latents of ``normal_images`` as the reference of the ``knn`` score: a tensor
        (N, C, H, W), or batches of one (read one at a time; only the latents are kept)."""
        batches = normal_images.split(batch_size) if isinstance(normal_images, torch.Tensor) else normal_images
        latents = torch.cat([self._latents(x).flatten(1).cpu() for x in batches])
        if not 1 <= k <= len(latents):
            raise UserError(f"knn: k={k} needs between 1 and the {len(latents)} reference images")
        self.reference, self.k = knn_index(latents), k
        return self

    @torch.inference_mode()
    def score(self, images: torch.Tensor, conditions: torch.Tensor | None = None, batch_size: int = 500) -> dict[str, np.ndarray]:
        """Per-image scores: {'nll': bits per image, 'reconstruction': MSE per pixel, 'combined': bits,
        and after ``fit``, 'knn': latent distance}.

        ``conditions`` (N,): the class to score each image under (-1 or None: the null class).
        """
        out = {k: [] for k in SCORES if k != "knn" or self.reference is not None}
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(self.device)
            z = self._latents(x)
            levels, d = self.tokenizer.code_layout(*x.shape[-2:]), self.info.code_layout.num_levels  # the prior's levels
            codes = levels.flatten(self.tokenizer.quantizer.nearest_grid(z, d), d)  # as tokenizer.encode, flattened
            recon = self.info.decode(self.tokenizer, codes)
            sse = ((recon.float() - x.float()) ** 2).flatten(1).sum(1)
            cond = torch.full((len(x),), -1) if conditions is None else torch.as_tensor(conditions[start : start + batch_size])
            nats = prior_loss(self.prior, codes, cond.to(self.device), self.info.layout, reduction="none")
            nll = bits(nats) * self.info.seq_len  # bits per image
            out["nll"].append(nll.cpu())
            out["reconstruction"].append((sse / x[0].numel()).cpu())
            out["combined"].append((nll + sse / (2 * self.sigma2 * math.log(2))).cpu())
            if self.reference is not None:
                out["knn"].append(knn_distance(z.flatten(1), self.reference, self.k).cpu())
        return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def reference_images(reference: str, normal_classes: str | None, data_args: DataArguments, transform: ImageTransform,
                     data: ImageData | None = None):  # fmt: skip
    """(batches of the normal images of the knn score, how many there are): a folder, or with
    ``reference='train'`` the training images of ``normal_classes`` in ``data_args``' dataset (``data``:
    that dataset, if loaded already; only those are decoded)."""
    if reference != "train":
        found = read_images(reference, transform)
        return found.batches(), len(found)
    data = data or load_image_data(data_args)
    keep = class_ids(normal_classes, data.class_names, "--normal-classes")
    normal = data.train.filter(lambda label: label in keep, input_columns="label")
    return (x for x, _ in image_batches(normal, transform)), len(normal)


class AnomalyDetector:
    """Scores and flags from a ``python -m anomaly --normal-classes ...`` output folder: its models, its
    pixel variance and knn reference, and each score's threshold at its false-positive rate.

    >>> detector = AnomalyDetector.from_folder("runs/scores")
    >>> scores, flags = detector(images)     # {score: (N,)}, {score: (N,) bool}; flags[detector.decisive]
    """

    def __init__(self, scorer: AnomalyScorer, summary: dict, where: str):
        self.scorer, self.summary = scorer, summary
        self.thresholds = {k: summary[k]["threshold"] for k in SCORES if isinstance(summary.get(k), dict)}
        if not self.thresholds:
            raise UserError(f"{where} has no thresholds (summary.json): run python -m anomaly with --normal-classes")
        # The score that separated the folder's normal and anomalous images best decides the flag.
        self.decisive = max(self.thresholds, key=lambda k: summary[k]["auroc"])
        names = scorer.info.class_names
        condition = summary.get("condition", "null")
        self.condition = names.index(condition) if condition in names else -1  # 'label' cannot apply to unlabelled images

    @classmethod
    def from_folder(cls, path: str, prior: str | None = None, loaded: tuple | None = None) -> AnomalyDetector:
        """The folder's summary.json; its prior (or ``prior``: the same models moved; ``loaded``: that prior
        already loaded, as (tokenizer, prior model, PriorInfo)) and, for knn, its reference."""
        file = os.path.join(path, "summary.json")
        if not os.path.isfile(file):
            raise UserError(f"{path}: not a python -m anomaly output folder (no summary.json)")
        with open(file) as f:
            summary = json.load(f)
        if prior and os.path.exists(summary["prior"]) and os.path.realpath(prior) != os.path.realpath(summary["prior"]):
            raise UserError(f"{path} was scored with the prior {summary['prior']}, not {prior}: its thresholds hold for that prior only")
        if loaded is not None:
            scorer = AnomalyScorer(*loaded, sigma2=summary["sigma2"])
        else:
            scorer = AnomalyScorer.from_pretrained(prior or summary["prior"], sigma2=summary["sigma2"])
        if summary.get("reference"):
            if "data" not in summary:
                raise UserError(f"{path} records no dataset for its knn reference: score it again with this vqgpt")
            data_args = DataArguments(**summary["data"])
            transform = model_transform(data_args, scorer.tokenizer.config.in_channels, "the tokenizer")
            batches, _ = reference_images(summary["reference"], ",".join(summary["normal_classes"]), data_args, transform)
            scorer.fit(batches, k=summary["knn_k"])
        return cls(scorer, summary, path)

    def __call__(self, images: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-image scores (as ``AnomalyScorer.score``, under the folder's condition) and flags
        (score above its threshold)."""
        scores = self.scorer.score(images, torch.full((len(images),), self.condition))
        return scores, {k: scores[k] > t for k, t in self.thresholds.items() if k in scores}


def knn_index(reference: torch.Tensor) -> NearestNeighbors:
    """scikit-learn's exact nearest-neighbour search over the rows of ``reference`` (N, F), built once."""
    return NearestNeighbors().fit(reference.float().cpu().numpy())


def knn_distance(x: torch.Tensor, reference: torch.Tensor | NearestNeighbors, k: int) -> torch.Tensor:
    """Mean Euclidean distance from each row of ``x`` (B, F) to its ``k`` nearest rows of ``reference``:
    rows (N, F), or their :func:`knn_index` (built once, queried batch after batch)."""
    index = knn_index(reference) if isinstance(reference, torch.Tensor) else reference
    distances, _ = index.kneighbors(x.float().cpu().numpy(), n_neighbors=k)
    return torch.from_numpy(distances.mean(1)).to(x.device)


def auroc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve: the probability that an anomalous image scores above a normal one (ties
    count half); scikit-learn's ``roc_auc_score``."""
    scores, anomalous = np.asarray(scores, dtype=np.float64), np.asarray(anomalous, dtype=bool)
    n_pos, n_neg = int(anomalous.sum()), int((~anomalous).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"AUROC needs normal and anomalous images; got {n_neg} normal and {n_pos} anomalous")
    return float(roc_auc_score(anomalous, scores))


def threshold_at_fpr(scores: np.ndarray, anomalous: np.ndarray, fpr: float) -> tuple[float, float, float]:
    """(threshold, true-positive rate, false-positive rate) flagging ``score > threshold`` with at most
    ``fpr`` of the normal images flagged: the last point of scikit-learn's ROC curve within ``fpr``; the
    threshold reported is the highest normal score left unflagged."""
    scores, anomalous = np.asarray(scores, dtype=np.float64), np.asarray(anomalous, dtype=bool)
    fprs, tprs, cuts = roc_curve(anomalous, scores, drop_intermediate=False)  # flagged: score >= cut
    i = int(np.nonzero(fprs <= fpr + 1e-12)[0][-1])
    normal_left = scores[~anomalous & (scores < cuts[i])]
    threshold = float(normal_left.max()) if normal_left.size else -np.inf
    return threshold, float(tprs[i]), float(fprs[i])
