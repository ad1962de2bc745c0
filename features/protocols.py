"""The standard protocols of unsupervised feature learning, by scikit-learn (docs/features.md).

- :func:`clustering`: k-means with k classes over every image; accuracy under the best one-to-one
  matching of clusters to classes (Hungarian, scipy's ``linear_sum_assignment``), NMI (arithmetic
  averaging, scikit-learn's default) and ARI; mean and standard deviation over seeds.
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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy of ``clusters`` read as classes through the one-to-one matching that maximises it."""
    table = contingency_matrix(labels, clusters)  # (classes, clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(labels))


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": len(values)}


def clustering(x: np.ndarray, labels: np.ndarray, k: int = 10, n_init: int = 20, seeds=range(10)) -> dict[str, dict]:
    """{'accuracy', 'nmi', 'ari'}: each {'mean', 'std', 'runs'} over one k-means (``n_init`` starts) per seed."""
    scores: dict[str, list[float]] = {"accuracy": [], "nmi": [], "ari": []}
    x = np.ascontiguousarray(x, dtype=np.float32)
    for seed in seeds:
        pred = KMeans(k, n_init=n_init, random_state=seed).fit_predict(x)
        scores["accuracy"].append(cluster_accuracy(labels, pred))
        scores["nmi"].append(normalized_mutual_info_score(labels, pred, average_method="arithmetic"))
        scores["ari"].append(adjusted_rand_score(labels, pred))
    return {name: _summary(v) for name, v in scores.items()}


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
