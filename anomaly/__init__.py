"""Anomaly scores from a tokenizer and its prior: code likelihood, reconstruction error, their two-part code length."""

from .scores import SCORES, AnomalyDetector, AnomalyScorer, auroc, knn_distance, knn_index, threshold_at_fpr

__all__ = ["SCORES", "AnomalyDetector", "AnomalyScorer", "auroc", "knn_distance", "knn_index", "threshold_at_fpr"]
