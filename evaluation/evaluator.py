"""Score a set of images against a real split, with the real-data floor beside every figure.

    ev = Evaluator.from_dataset(ClassifierSpace(clf), DataArguments(dataset="fashion_mnist"), classifier=clf)
    report = ev.score(images, labels)        # images (N, C, H, W) in [-1, 1], labels (N,) asked-for classes
    print(report.table())

The reference is the dataset's test split. The floor of each metric is the same metric for N real
*training* images against the same reference (N = the number of samples, drawn with the same number of
images per class when the samples have classes): at 800 images a Fréchet distance is far from zero even
for real data, so a figure means something only beside its floor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import datasets
import torch

from common.cli import UserError
from common.data import DataArguments, FolderImages, ImageData, ImageTransform, column, image_loader, load_image_data, read_images

from .classifier import Classifier
from .features import ClassifierSpace
from .metrics import Gaussian, class_accuracy, frechet_distance, precision_recall


@dataclass
class Report:
    feature_space: str
    reference: str  # what the samples were compared with
    num_samples: int
    num_reference: int
    fd: float
    fd_floor: float
    precision: float
    precision_floor: float
    recall: float
    recall_floor: float
    accuracy: float | None = None  # samples classified as the class they were asked for
    accuracy_floor: float | None = None  # the classifier's accuracy on the real reference images

    @property
    def fd_ratio(self) -> float:
        return self.fd / max(self.fd_floor, 1e-12)

    def to_dict(self) -> dict:
        return {**asdict(self), "fd_ratio": self.fd_ratio}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [("Fréchet distance", self.fd, self.fd_floor, f"{self.fd_ratio:.2f}x floor"),
                ("precision", self.precision, self.precision_floor, ""),
                ("recall", self.recall, self.recall_floor, "")]  # fmt: skip
        if self.accuracy is not None:
            rows.append(("class accuracy", self.accuracy, self.accuracy_floor, "floor: real test images"))
        lines = [f"{self.num_samples} images against {self.reference} ({self.num_reference} images), "
                 f"{self.feature_space} features; floor: {self.num_samples} real training images",
                 "", "| metric | images | real-data floor | |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {name} | {v:.4g} | {f:.4g} | {note} |" for name, v, f, note in rows]
        return "\n".join(lines)


class Evaluator:
    """Holds the reference split's features once; scores any number of image sets against them."""

    def __init__(self, space, data: ImageData, classifier: Classifier | None = None, reference_name: str = "",
                 batch_size: int = 500, max_reference: int | None = None, seed: int = 0):  # fmt: skip
        self.space, self.data, self.batch_size, self.seed = space, data, batch_size, seed
        self.accuracy_space = space if isinstance(space, ClassifierSpace) else (ClassifierSpace(classifier) if classifier else None)  # fmt: skip
        channels = classifier.config.in_channels if classifier is not None else data.channels
        self.transform = ImageTransform(channels)  # native size; the feature extractor resizes
        reference = data.test if max_reference is None else data.test.select(range(min(max_reference, len(data.test))))
        if len(reference) < 2:
            raise UserError(f"the reference split has {len(reference)} image(s); the metrics need at least 2")
        self.reference_name = reference_name or "the test split"
        feats, logits, labels = self._embed_dataset(reference)
        self.reference_features, self.reference = feats, Gaussian.fit(feats)
        self.reference_accuracy = class_accuracy(logits, labels) if logits is not None else None
        self._floors: dict[int, tuple[float, float, float]] = {}

    @classmethod
    def from_dataset(cls, space, data_args: DataArguments, classifier: Classifier | None = None, **kw) -> Evaluator:
        return cls(space, load_image_data(data_args), classifier, reference_name=f"{data_args.dataset} test split", **kw)

    # -- features ----------------------------------------------------------------------------------

    def embed(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (N, C, H, W) in [-1, 1], or batches of them (read one at a time) -> features (N, D) and,
        with a classifier, logits (N, classes)."""
        feats, logits = [], []
        for chunk in images.split(self.batch_size) if isinstance(images, torch.Tensor) else images:
            f, lg = self.space.embed(chunk)
            if lg is None and self.accuracy_space is not None:
                lg = self.accuracy_space.embed(chunk)[1]
            feats.append(f)
            logits.append(lg)
        return torch.cat(feats), (torch.cat(logits) if logits and logits[0] is not None else None)

    def _embed_dataset(self, ds: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        feats, logits, labels = [], [], []
        for batch in image_loader(ds, self.transform, self.batch_size, shuffle=False):
            f, lg = self.embed(batch["pixel_values"])
            feats.append(f)
            logits.append(lg)
            labels.append(batch["labels"])
        return torch.cat(feats), (torch.cat(logits) if logits[0] is not None else None), torch.cat(labels)

    # -- the floor and the scores ----------------------------------------------------------------

    def _reference_subset(self, n: int) -> torch.Tensor:
        """n reference features (a fixed draw): precision/recall compare sets of equal size."""
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.reference_features), generator=g)[:n]
        return self.reference_features[order]

    def floor(self, n: int, labels: torch.Tensor | None = None) -> tuple[float, float, float]:
        """(FD, precision, recall) of n real training images (a fixed draw) against the reference.

        With ``labels`` (the classes the scored images were asked to be), the draw has the same number of
        images of every class, so a class-balanced sample set is not compared with an unbalanced floor.
        """
        counts = None if labels is None else torch.bincount(labels[labels >= 0], minlength=1)
        key = (n, None if counts is None else tuple(counts.tolist()))
        if key not in self._floors:
            train = self.data.train
            if isinstance(train, datasets.IterableDataset):  # a stream: its first n images
                train = datasets.Dataset.from_list(list(train.take(n)), features=train.features)
            elif counts is None or int(counts.sum()) != n:
                g = torch.Generator().manual_seed(self.seed + 1)
                train = train.select(torch.randperm(len(train), generator=g)[:n].tolist())
            else:
                train_labels = torch.as_tensor(column(train, "label"))
                pick = []
                for c, k in enumerate(counts.tolist()):
                    of_class = torch.nonzero(train_labels == c).flatten()
                    g = torch.Generator().manual_seed(self.seed + 1 + c)
                    pick.append(of_class[torch.randperm(len(of_class), generator=g)[:k]])
                train = train.select(torch.cat(pick).tolist())
            if len(train) < n:
                raise UserError(f"the floor needs {n} real training images but the dataset has {len(train)}; score fewer images")  # fmt: skip
            feats, _, _ = self._embed_dataset(train)
            p, r = precision_recall(self._reference_subset(n), feats)
            self._floors[key] = (frechet_distance(feats, self.reference), p, r)
        return self._floors[key]

    def score_features(self, feats: torch.Tensor, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Report:  # fmt: skip
        n = len(feats)
        fd_floor, p_floor, r_floor = self.floor(n, labels)
        p, r = precision_recall(self._reference_subset(n), feats)
        accuracy = class_accuracy(logits, labels) if logits is not None and labels is not None else None
        return Report(self.space.name, self.reference_name, n, len(self.reference_features),
                      frechet_distance(feats, self.reference), fd_floor, p, p_floor, r, r_floor,
                      accuracy, self.reference_accuracy if accuracy is not None else None)  # fmt: skip

    def score(self, images, labels: torch.Tensor | None = None) -> Report:
        """Images (N, C, H, W) in [-1, 1] or batches of them; ``labels`` (N,) the classes they were asked to be (-1: none)."""
        feats, logits = self.embed(images)
        if labels is not None and (torch.as_tensor(labels) < 0).all():
            labels = None
        return self.score_features(feats, logits, None if labels is None else torch.as_tensor(labels))


def load_sample_folder(path: str, class_names: list[str], channels: int | ImageTransform) -> tuple[FolderImages, torch.Tensor]:
    """A folder in the layout ``python -m sample`` writes (``<class>/<i>.png`` + ``metadata.jsonl``), or
    any imagefolder -> (its images, read batch by batch: :class:`common.data.FolderImages`; class ids (N,)
    in ``class_names``, -1 if none); ``channels`` as in :func:`common.data.read_images`."""
    found = read_images(path, channels)
    unknown = sorted({w for w in found.labels if w is not None and w != "unconditional" and w not in class_names})
    if unknown:
        raise UserError(f"sample folder {path} has classes {unknown} that the classifier does not know; expected among {class_names}")  # fmt: skip
    return found, found.class_ids(class_names)
