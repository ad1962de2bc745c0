"""Image search over features: a faiss index and what it needs to answer a query (docs/features.md).

faiss's HNSW graph (M=16, efConstruction=100, efSearch=64) is the default: against the exact search of
the same vectors it returns nearly the same neighbours several times faster (bench/features.py
measures it beside hnswlib, usearch and scikit-learn, docs/results.md). ``exact=True`` keeps a flat
index that compares every vector. With ``metric='cosine'`` vectors and queries are l2-normalised and
compared by Euclidean distance (a monotone function of the cosine); ``'l2'`` compares them as they are.
"""

from __future__ import annotations

import json
import os

import faiss
import numpy as np

from common.files import publish_dir, staging_dir

METRICS = ("cosine", "l2")


class FeatureIndex:
    """Vectors (N, F) and the metadata of their images: ``meta`` holds at least ``ids`` and ``labels``."""

    def __init__(self, dim: int, metric: str = "cosine", exact: bool = False, meta: dict | None = None,
                 m: int = 16, ef_construction: int = 100, ef_search: int = 64):  # fmt: skip
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
        self.metric, self.exact, self.meta = metric, exact, dict(meta or {})
        if exact:
            self.index = faiss.IndexFlatL2(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, m)
            self.index.hnsw.efConstruction, self.index.hnsw.efSearch = ef_construction, ef_search

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"feature rows of shape {x.shape}; this index holds vectors of {self.dim} values")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def add(self, vectors: np.ndarray) -> FeatureIndex:
        self.index.add(self._prepare(vectors))
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k), rows (Q, k)) of the ``k`` nearest vectors to each query, nearest first."""
        if not 1 <= k <= len(self):
            raise ValueError(f"-k {k}: expected between 1 and the {len(self)} images of the index")
        distances, rows = self.index.search(self._prepare(queries), k)
        return np.sqrt(np.maximum(distances, 0)), rows

    def save(self, path: str) -> None:
        """A folder, written whole: ``index.faiss`` and ``index.json`` (the metadata)."""
        tmp = staging_dir(path)
        faiss.write_index(self.index, os.path.join(tmp, "index.faiss"))
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"metric": self.metric, "exact": self.exact, **self.meta}, f)
        publish_dir(tmp, path)

    @classmethod
    def load(cls, path: str) -> FeatureIndex:
        files = [os.path.join(path, n) for n in ("index.faiss", "index.json")]
        if not all(os.path.isfile(f) for f in files):
            raise ValueError(f"--index {path}: not an index folder (expected index.faiss and index.json from python -m features index)")  # fmt: skip
        with open(files[1]) as f:
            meta = json.load(f)
        out = cls.__new__(cls)
        out.metric, out.exact = meta.pop("metric"), meta.pop("exact")
        out.meta, out.index = meta, faiss.read_index(files[0])
        return out
