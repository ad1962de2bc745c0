"""Sample-quality metrics: Fréchet distance, KID, precision/recall, class accuracy over feature vectors,
and the detail statistic over pixels.

The feature metrics compare a set of features (N, D) with a reference set; none of them cares which
network made the features (the evaluation's own networks or Inception-v3), so the standard FID and the
offline FD run through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Gaussian:
    """Mean and covariance of a feature set, in float64 (FD subtracts large, close numbers)."""

    mean: torch.Tensor  # (D,)
    cov: torch.Tensor  # (D, D)

    @classmethod
    def fit(cls, features: torch.Tensor) -> Gaussian:
        x = features.double()
        if x.shape[0] < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 feature vectors, got {x.shape[0]}")
        return cls(x.mean(0), torch.cov(x.T))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: Gaussian | torch.Tensor, b: Gaussian | torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``.

    The trace of the matrix square root is taken as the sum of the square roots of the eigenvalues of
    the symmetric ``S_a^(1/2) S_b S_a^(1/2)``, which has the same spectrum as ``S_a S_b`` and, being
    symmetric positive semi-definite, has a stable real eigendecomposition (scipy's ``sqrtm`` of the
    non-symmetric product, as in pytorch-fid, can return complex noise).
    """
    a = a if isinstance(a, Gaussian) else Gaussian.fit(a)
    b = b if isinstance(b, Gaussian) else Gaussian.fit(b)
    root_a = _sqrtm_psd(a.cov)
    middle = root_a @ b.cov @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = ((a.mean - b.mean) ** 2).sum() + a.cov.trace() + b.cov.trace() - 2 * trace_sqrt
    return float(value.clamp(min=0))


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """KID (Bińkowski et al. 2018): the unbiased estimate of the squared MMD between two feature sets under
    the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, over ``subsets`` random subsets of
    ``min(subset_size, half the smaller set)`` rows of each -> (mean, standard deviation over the subsets).
    Unbiased: two draws of one distribution give values around 0, negative ones included; unlike FD it
    does not grow as the sets shrink. Subsets of at most half of each set make the spread that of the
    sets themselves (torch-fidelity's subsets of 1000 from a set of 800 would all be the whole set).
    """
    m = min(subset_size, len(a) // 2, len(b) // 2)
    if m < 2:
        raise ValueError(f"KID needs at least 4 feature vectors per set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    d = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    values = torch.stack(values)
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> (N,): the variance of each image's Laplacian, taken on [0, 1]
    pixels and every channel (scipy's ``ndimage.laplace``, edges reflected). Its mean over a set, against
    real images', is the evaluation's detail statistic: blur lowers it, noise raises it."""
    x = (images.float() + 1) / 2
    n, c, h, w = x.shape
    x = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")  # scipy's "reflect" at one pixel
    lap = F.conv2d(x, _LAPLACE.to(x.device).view(1, 1, 3, 3)).reshape(n, -1)
    return lap.var(dim=1, correction=0).cpu()


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the row itself excluded)."""
    radii = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)  # (chunk, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the zero distance to itself
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each point: does it lie within some centre's radius?"""
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], centres)  # (chunk, M)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds.

    Precision: the fraction of ``fake`` inside the real manifold (the union of balls around each real
    feature reaching its k-th nearest real neighbour). Recall: the fraction of ``real`` inside the fake
    manifold, built the same way. Both sets should have the same size (the paper's protocol).
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {len(real)} and {len(fake)}")
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_neighbour_radii(real, k)).float().mean()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k)).float().mean()
    return float(precision), float(recall)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the label asked for."""
    return float((logits.argmax(-1) == labels.to(logits.device)).double().mean())
