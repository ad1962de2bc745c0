"""The standard protocols of unsupervised feature learning, by scikit-learn (docs/features.md).

- :func:`clustering`: k clusters over every image, by k-means (``method='kmeans'``: ``n_init`` starts) or
  by N2D's recipe (``method='n2d'``, McConville et al. 2020: PCA to 50 dimensions where wider, UMAP to k
  dimensions with 20 neighbours and ``min_dist`` 0, then a full-covariance Gaussian mixture of k, both
  seeded); accuracy under the best one-to-one matching of clusters to classes (Hungarian, scipy's
  ``linear_sum_assignment``), NMI (arithmetic averaging, scikit-learn's default) and ARI; mean and
  standard deviation over seeds.
- :func:`linear_probe`: standardised features, multinomial logistic regression, C chosen on a held-out
  part of the training rows, refitted on all of them, accuracy on the test rows.
- :func:`few_labels`: n labelled images per class drawn class-balanced from the training rows, per seed;
  logistic regression (C=1) and k nearest neighbours (k=1, k=10, cosine); test accuracy's mean and spread.
- :func:`precision_at_k`: the fraction of each query's k nearest neighbours that share its class.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.cli import UserError


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy of ``clusters`` read as classes through the one-to-one matching that maximises it."""
    table = contingency_matrix(labels, clusters)  # (classes, clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(labels))


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": len(values)}


CLUSTERING = ("kmeans", "n2d")


def n2d_clusters(x: np.ndarray, k: int = 10, seed: int = 0, pca: int = 50, neighbours: int = 20) -> np.ndarray:
    """N2D's clusters of the rows of ``x``: PCA to ``pca`` dimensions (where wider), UMAP to ``k``
    dimensions (``neighbours`` neighbours, min_dist 0), a full-covariance Gaussian mixture of ``k``."""
    try:
        import umap
    except ImportError:
        raise UserError("N2D clustering needs umap-learn: pip install 'vqgpt[cluster]'") from None
    if x.shape[1] > pca:
        x = PCA(pca, random_state=seed).fit_transform(x)
    embedded = umap.UMAP(n_components=k, n_neighbors=neighbours, min_dist=0.0, random_state=seed, n_jobs=1).fit_transform(x)  # seeded: one thread
    return GaussianMixture(k, covariance_type="full", random_state=seed).fit_predict(embedded)


def clusters(x: np.ndarray, k: int = 10, seed: int = 0, method: str = "kmeans", n_init: int = 20) -> np.ndarray:
    """The cluster of every row of ``x``: k-means (``n_init`` starts) or N2D's recipe (:func:`n2d_clusters`)."""
    if method not in CLUSTERING:
        raise ValueError(f"clustering method {method!r}: expected one of {', '.join(CLUSTERING)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    return KMeans(k, n_init=n_init, random_state=seed).fit_predict(x) if method == "kmeans" else n2d_clusters(x, k, seed)


def cluster_scores(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """{'accuracy' (best one-to-one matching), 'nmi', 'ari'} of clusters ``pred`` against ``labels``."""
    return {"accuracy": cluster_accuracy(labels, pred), "nmi": normalized_mutual_info_score(labels, pred, average_method="arithmetic"),
            "ari": adjusted_rand_score(labels, pred)}  # fmt: skip


def clustering(x: np.ndarray, labels: np.ndarray, k: int = 10, n_init: int = 20, seeds=range(10), method: str = "kmeans") -> dict[str, dict]:
    """{'accuracy', 'nmi', 'ari'}: each {'mean', 'std', 'runs'} over one clustering per seed (``method``:
    k-means with ``n_init`` starts, or N2D's recipe)."""
    runs = [cluster_scores(labels, clusters(x, k, seed, method, n_init)) for seed in seeds]
    return {name: _summary([r[name] for r in runs]) for name in ("accuracy", "nmi", "ari")}


def _logistic(c: float, max_iter: int = 1000):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def linear_probe(train_x, train_y, test_x, test_y, cs=(1e-3, 1e-2, 1e-1, 1.0), held_out: int = 10000, seed: int = 0,
                 max_iter: int = 1000) -> dict:  # fmt: skip
    """{'accuracy', 'c', 'held_out_accuracy': {c: accuracy}}: C chosen on ``held_out`` training rows."""
    order = np.random.default_rng(seed).permutation(len(train_x))
    fit_rows, val_rows = order[held_out:], order[:held_out]
    held = {c: float(_logistic(c, max_iter).fit(train_x[fit_rows], train_y[fit_rows]).score(train_x[val_rows], train_y[val_rows])) for c in cs}  # fmt: skip
    best = max(held, key=held.get)
    accuracy = float(_logistic(best, max_iter).fit(train_x, train_y).score(test_x, test_y))
    return {"accuracy": accuracy, "c": best, "held_out_accuracy": held}


def balanced_draw(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Row indices of ``per_class`` images of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)])


FEW_LABEL_CLASSIFIERS = {
    "logistic": lambda: _logistic(1.0),
    "knn1": lambda: KNeighborsClassifier(1, metric="cosine"),
    "knn10": lambda: KNeighborsClassifier(10, metric="cosine"),
}


def few_labels(train_x, train_y, test_x, test_y, per_class: int, seeds=range(10)) -> dict[str, dict]:
    """{classifier: {'mean', 'std', 'runs'}} of test accuracy, one class-balanced draw per seed."""
    scores: dict[str, list[float]] = {name: [] for name in FEW_LABEL_CLASSIFIERS}
    for seed in seeds:
        rows = balanced_draw(train_y, per_class, seed)
        for name, make in FEW_LABEL_CLASSIFIERS.items():
            scores[name].append(float(make().fit(train_x[rows], train_y[rows]).score(test_x, test_y)))
    return {name: _summary(v) for name, v in scores.items()}


def precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Mean fraction of the neighbours (Q, k) of each query that share its class (Q,)."""
    return float((neighbour_labels == np.asarray(query_labels)[:, None]).mean())
