"""The fourth use of a tokenizer: features for classification with few labels, clustering and image search."""

from .extract import DESCRIPTIONS, CodeBag, FeatureExtractor, code_counts, features, fingerprint
from .index import FeatureIndex, ImageSearch
from .protocols import balanced_draw, cluster_accuracy, cluster_scores, clustering, clusters, few_labels, linear_probe, n2d_clusters, precision_at_k

__all__ = ["DESCRIPTIONS", "CodeBag", "FeatureExtractor", "FeatureIndex", "ImageSearch", "balanced_draw", "cluster_accuracy", "cluster_scores", "clustering", "clusters", "n2d_clusters",
           "code_counts", "features", "few_labels", "fingerprint", "linear_probe", "precision_at_k"]  # fmt: skip
