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
import torch

from common.cli import UsageError, UserError
from common.data import DataArguments, ImageTransform, load_image_data, load_tensors, read_images
from common.files import staged
from tokenizer import VQVAE

from .extract import CodeBag, FeatureExtractor, features, fingerprint

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

    def estimate_bytes(self, n: int) -> int:
        """The memory ``n`` vectors take in this index: the vectors, and the HNSW graph's links."""
        links = 0 if self.exact else 4 * self.index.hnsw.nb_neighbors(0) * 1.2  # level 0's 2M int32 links, and the upper levels'
        return int(n * (4 * self.dim + links))

    def write(self, folder: str) -> None:
        """``index.faiss`` and ``index.json`` (the metadata) into an existing folder."""
        faiss.write_index(self.index, os.path.join(folder, "index.faiss"))
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump({"metric": self.metric, "exact": self.exact, **self.meta}, f)

    def save(self, path: str) -> None:
        """The folder ``path``, written whole or not at all."""
        with staged(path) as tmp:
            self.write(tmp)

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


class ImageSearch:
    """Query images -> their nearest indexed images: an index folder and the tokenizer that built it.

    >>> search = ImageSearch.from_folder("runs/index")
    >>> distances, rows = search(images, k=10)       # images (Q, C, H, W) in [-1, 1] -> (Q, k) each
    >>> search.ids[rows[0, 0]], search.label(rows[0, 0])
    """

    def __init__(self, index: FeatureIndex, tokenizer: VQVAE, where: str = "the index"):
        meta = index.meta
        if fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
            raise UserError(f"{where} was built with the tokenizer {meta['tokenizer']} (weights {meta['tokenizer_fingerprint']}); "
                            f"the tokenizer given holds other weights ({fingerprint(tokenizer)}): rebuild the index with it")  # fmt: skip
        self.index, self.meta, self.where = index, meta, where
        self.extractor, self.bag = FeatureExtractor(tokenizer, meta["pyramid"]), CodeBag(meta["idf"])
        self.ids, self.labels, self.class_names = meta["ids"], meta["labels"], meta["class_names"]

    @classmethod
    def from_folder(cls, path: str, tokenizer: str | VQVAE | None = None) -> ImageSearch:
        """An index folder (python -m features index) and its tokenizer (or ``tokenizer``, if it moved)."""
        index = FeatureIndex.load(path)
        tokenizer = tokenizer or index.meta["tokenizer"]
        return cls(index, VQVAE.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer, f"index {path}")

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.meta["image_size"])

    def label(self, row: int) -> str:
        """The class name of an indexed image ('' when it has none)."""
        return self.class_names[self.labels[row]] if self.labels[row] >= 0 else ""

    def source_images(self, ids: list[str]) -> torch.Tensor:
        """The indexed images ``ids`` (N, C, H, W) in [-1, 1], read from the index's source (a folder or a dataset)."""
        transform, source = ImageTransform(self.meta["channels"]), self.meta["source"]
        if "folder" in source:
            return torch.cat([read_images(os.path.join(source["folder"], i), transform).images for i in ids])
        data = load_image_data(DataArguments(**source["dataset"]))
        where = [(split, int(row)) for split, row in (i.split("/") for i in ids)]
        out: list = [None] * len(ids)
        for split in dict.fromkeys(s for s, _ in where):  # one read of each split's rows, then back in order
            at = [j for j, (s, _) in enumerate(where) if s == split]
            for j, image in zip(at, load_tensors(getattr(data, split).select([where[j][1] for j in at]), transform)[0]):
                out[j] = image
        return torch.stack(out)

    def check_k(self, k: int, name: str = "k") -> None:
        """A one-line error unless ``k`` neighbours can be found (``name``: the option or field that gave it)."""
        if not 1 <= k <= len(self.index):
            raise UsageError(f"{name} {k}: {self.where} holds {len(self.index)} images; expected 1 to {len(self.index)}")

    def __call__(self, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k), rows (Q, k)) of the ``k`` indexed images nearest to each query, nearest first."""
        self.check_k(k)
        if tuple(images.shape[-2:]) != self.image_size:
            (h, w), (qh, qw) = self.image_size, images.shape[-2:]
            raise UserError(f"query images are {qh}x{qw}; {self.where} holds features of {h}x{w} images: resize the queries to {h}x{w}")  # fmt: skip
        queries = features(self.extractor.extract(images), self.bag)[self.meta["feature"]]
        return self.index.search(queries, k)
