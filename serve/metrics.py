"""The server's Prometheus metrics (prometheus-client), in a registry of its own per server.

Traffic: requests and latency per endpoint and status, images per model call, images waiting. The
dashboard of a deployed tokenizer: the reconstruction error of the images served, the share of each
level's codebook their codes use (over the last ``window`` images), and the rate at which the anomaly
detector flags them (a counter per verdict, and the share over the last ``window`` images scored).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MSE_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1)


class Metrics:
    def __init__(self, levels: int, num_codes: int, window: int = 1000):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vqgpt_requests", "HTTP requests answered.", ["endpoint", "status"], registry=r)
        self.latency = Histogram("vqgpt_request_seconds", "Time to answer a request.", ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("vqgpt_batch_images", "Images per model call.", ["queue"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("vqgpt_queue_images", "Images waiting for the model.", ["queue"], registry=r)
        self.reconstruction = Histogram("vqgpt_reconstruction_mse", "Reconstruction error (MSE per pixel, [-1, 1] scale) of the images served.",
                                        buckets=MSE_BUCKETS, registry=r)  # fmt: skip
        self.usage = Gauge("vqgpt_codebook_usage", f"Share of each level's codes used by the last {window} images served.", ["level"], registry=r)  # fmt: skip
        self.flagged = Counter("vqgpt_anomaly_images", "Images scored by the anomaly detector, by its verdict.", ["anomalous"], registry=r)
        self.flag_rate = Gauge("vqgpt_anomaly_flag_rate", f"Share of the last {window} images scored that were flagged anomalous.", registry=r)  # fmt: skip
        self.num_codes = num_codes
        self.recent_codes = [deque(maxlen=window) for _ in range(levels)]  # per level: each image's codes
        self.recent_flags: deque[bool] = deque(maxlen=window)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(seconds)

    def batch(self, queue: str, images: int, waiting: int) -> None:
        self.batch_size.labels(queue).observe(images)
        self.queue_depth.labels(queue).set(waiting)

    def served(self, mse: list[float], levels: list[torch.Tensor]) -> None:
        """Images served: their reconstruction errors and their codes, one grid (B, h, w) per level."""
        for v in mse:
            self.reconstruction.observe(v)
        for level, grids in enumerate(levels):
            recent = self.recent_codes[level]
            recent.extend(grids.flatten(1).cpu().numpy())
            used = np.unique(np.concatenate(recent)).size
            self.usage.labels(str(level + 1)).set(used / self.num_codes)

    def anomalies(self, flags: list[bool], mse: list[float]) -> None:
        for flag in flags:
            self.flagged.labels(str(flag).lower()).inc()
        self.recent_flags.extend(flags)
        self.flag_rate.set(sum(self.recent_flags) / len(self.recent_flags))
        for v in mse:
            self.reconstruction.observe(v)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
