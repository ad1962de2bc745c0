"""Features of images from a tokenizer, for classifiers, clustering and search (docs/features.md).

For a tokenizer with code width D, a code grid h x w, K codes and L levels, every image gets:

- ``encoder`` (D*h*w,): the encoder's output before quantization, flattened channel-major (D, h, w).
- ``encoder_pooled`` (D,): the same averaged over the h*w positions.
- ``quantized`` (D*h*w,): the quantized latent the decoder reads (every level's codes summed).
- ``quantized_1`` (D*h*w,): a multi-level tokenizer's first level alone (its coarsest description).
- ``codes`` (L*R*K,): a bag of codes. ``counts`` holds, for every level and region, how many positions
  chose each code: a level's whole grid (R = 1) and, with ``pyramid``, its four quadrants too (R = 5,
  the 1x1 + 2x2 spatial pyramid; quadrant rows ``i < ceil(h/2)`` are the top half, columns likewise),
  so each level's and region's K counts sum to its positions. The ``codes`` feature weights the counts
  by TF-IDF (scikit-learn's ``TfidfTransformer``: ``idf = ln((1 + n) / (1 + df)) + 1`` over the images
  it was fitted on) and scales each row to unit l2 norm.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfTransformer

from tokenizer import VQVAE

DESCRIPTIONS = {
    "encoder": "encoder output before quantization, flattened (D, h, w)",
    "encoder_pooled": "encoder output averaged over positions (D,)",
    "quantized": "quantized latent, every level summed, flattened (D, h, w)",
    "quantized_1": "the first level's quantized latent, flattened (D, h, w)",
    "codes": "bag of codes: TF-IDF weighted counts per level (and quadrant), l2-normalised",
}


def fingerprint(tokenizer: VQVAE) -> str:
    """A short hash of the tokenizer's weights: features of two tokenizers are not comparable."""
    digest = hashlib.sha256()
    for name, value in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureExtractor:
    """Features (numpy, float32, one row per image) of images (N, C, H, W) in [-1, 1]."""

    def __init__(self, tokenizer: VQVAE, pyramid: bool = False):
        self.tokenizer, self.pyramid = tokenizer.eval(), pyramid

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def names(self) -> list[str]:
        levels = self.tokenizer.num_levels > 1
        return [n for n in DESCRIPTIONS if n != "quantized_1" or levels]

    def shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Each feature's shape for an image of this size."""
        cfg, (h, w) = self.tokenizer.config, self.tokenizer.code_grid(height, width)
        layout = self.tokenizer.code_layout(height, width)
        flat = (cfg.code_dim * h * w,)
        shapes = {"encoder": flat, "encoder_pooled": (cfg.code_dim,), "quantized": flat, "quantized_1": flat,
                  "codes": (layout.num_levels * (5 if self.pyramid else 1) * cfg.num_codes,)}  # fmt: skip
        return {n: shapes[n] for n in self.names()}

    @torch.inference_mode()
    def extract(self, images: torch.Tensor, batch_size: int = 1000, progress=None) -> dict[str, np.ndarray]:
        """{'encoder', 'encoder_pooled', 'quantized', ('quantized_1'), 'counts'}: rows of ``images``; the
        ``codes`` feature is :meth:`CodeBag.transform` of ``counts``."""
        tok = self.tokenizer
        tok.check_images(images)
        layout = tok.code_layout(*images.shape[-2:])
        out: dict[str, list] = {n: [] for n in self.names() if n != "codes"} | {"counts": []}
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(self.device)
            z = tok.encoder(x)
            codes = tok.quantizer.nearest_grid(z)
            out["encoder"].append(z.flatten(1))
            out["encoder_pooled"].append(z.mean((2, 3)))
            out["quantized"].append(tok.latent(codes).flatten(1))
            if "quantized_1" in out:
                out["quantized_1"].append(tok.latent(codes, levels=1, grid=layout.grid).flatten(1))
            out["counts"].append(code_counts(layout.split(codes), tok.config.num_codes, self.pyramid))
            if progress is not None:
                progress.update(len(x))
        return {n: torch.cat(v).float().cpu().numpy() for n, v in out.items()}


def code_counts(grids: list[torch.Tensor], num_codes: int, pyramid: bool = False) -> torch.Tensor:
    """(B, L*R*K) counts of each code per level ``grids[l]`` (B, h_l, w_l) and region (the grid, then
    with ``pyramid`` its quadrants top-left, top-right, bottom-left, bottom-right)."""
    parts = []
    for g in grids:
        b, h, w = g.shape
        regions = [g]
        if pyramid:
            top, left = math.ceil(h / 2), math.ceil(w / 2)
            regions += [g[:, :top, :left], g[:, :top, left:], g[:, top:, :left], g[:, top:, left:]]
        for r in regions:
            idx = r.reshape(b, -1)
            parts.append(torch.zeros(b, num_codes, device=g.device).scatter_add_(1, idx, torch.ones(idx.shape, device=g.device)))
    return torch.cat(parts, 1)


class CodeBag:
    """TF-IDF weighting of code counts, fitted once (on an index or a training split) and kept with it.

    The IDF is scikit-learn's (``TfidfTransformer(smooth_idf=True)``), from document frequencies that
    :meth:`update` accumulates batch by batch, so a split is never held whole to fit it."""

    def __init__(self, idf: np.ndarray | None = None):
        self.tfidf = TfidfTransformer(norm="l2", smooth_idf=True)
        self.df, self.n = None, 0
        if idf is not None:
            self.tfidf.idf_ = np.asarray(idf, dtype=np.float64)

    def update(self, counts: np.ndarray) -> CodeBag:
        """Count, for each column, the rows of ``counts`` where it is non-zero (its document frequency)."""
        df = (np.asarray(counts) > 0).sum(0)
        self.df, self.n = (df if self.df is None else self.df + df), self.n + len(counts)
        self.tfidf.idf_ = np.log((1 + self.n) / (1 + self.df)) + 1  # TfidfTransformer's smooth IDF
        return self

    def fit(self, counts: np.ndarray) -> CodeBag:
        self.df, self.n = None, 0
        return self.update(counts)

    @property
    def idf(self) -> np.ndarray:
        return self.tfidf.idf_

    def transform(self, counts: np.ndarray) -> np.ndarray:
        if counts.shape[1] != len(self.idf):
            raise ValueError(f"code counts of width {counts.shape[1]}; this bag of codes was fitted on width {len(self.idf)}")
        return self.tfidf.transform(counts).toarray().astype(np.float32)


def features(extracted: dict[str, np.ndarray], bag: CodeBag) -> dict[str, np.ndarray]:
    """The named features of :data:`DESCRIPTIONS` from :meth:`FeatureExtractor.extract`'s output."""
    return {n: v for n, v in extracted.items() if n != "counts"} | {"codes": bag.transform(extracted["counts"])}
