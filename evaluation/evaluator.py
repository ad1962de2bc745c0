"""Score a set of images against a real split in several feature spaces, with the real-data floor beside
every figure.

    spaces, clf = load_spaces("runs/classifier", ["runs/resnet", "runs/contrastive"])
    ev = Evaluator.from_dataset(spaces, DataArguments(dataset="fashion_mnist"), classifier=clf)
    report = ev.score(images, labels)        # images (N, C, H, W) in [-1, 1], labels (N,) asked-for classes
    print(report.table())

The reference is the dataset's test split. In every space: Fréchet distance, KID, precision and recall;
once: the class accuracy (the reference classifier's predictions) and the detail statistic (the images'
mean Laplacian variance over the reference's). The floor of each metric is the same metric for N real
*training* images against the same reference (N = the number of samples, drawn with the same number of
images per class when the samples have classes): at 800 images a Fréchet distance is far from zero even
for real data, so a figure means something only beside its floor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

import datasets
import torch

from common.cli import UserError
from common.data import DataArguments, FolderImages, ImageData, ImageTransform, column, image_loader, load_image_data, read_images

from .classifier import Classifier
from .features import ClassifierSpace
from .metrics import Gaussian, class_accuracy, frechet_distance, kernel_distance, laplacian_variance, precision_recall


@dataclass
class SpaceReport:
    """The feature metrics of one image set in one space, each beside its real-data floor."""

    space: str
    fd: float
    fd_floor: float
    kid: float  # unbiased: real data scores around 0
    kid_std: float  # standard deviation over the KID subsets
    kid_floor: float
    kid_floor_std: float
    precision: float
    precision_floor: float
    recall: float
    recall_floor: float

    @property
    def fd_ratio(self) -> float:
        return self.fd / max(self.fd_floor, 1e-12)


@dataclass
class Report:
    """Every space's :class:`SpaceReport`, the class accuracy and the detail statistic. ``fd``, ``precision``
    and the like without a space name are the first space's (the reference classifier's)."""

    reference: str  # what the samples were compared with
    num_samples: int
    num_reference: int
    spaces: list[SpaceReport] = field(default_factory=list)
    detail: float = 1.0  # mean Laplacian variance over the reference's: < 1 blurrier than real, > 1 noisier
    detail_floor: float = 1.0  # the same for the real training images
    accuracy: float | None = None  # samples classified as the class they were asked for
    accuracy_floor: float | None = None  # the classifier's accuracy on the real reference images

    def space(self, name: str) -> SpaceReport:
        return next(s for s in self.spaces if s.space == name)

    @property
    def feature_space(self) -> str:
        return self.spaces[0].space

    fd = property(lambda self: self.spaces[0].fd)
    fd_floor = property(lambda self: self.spaces[0].fd_floor)
    fd_ratio = property(lambda self: self.spaces[0].fd_ratio)
    precision = property(lambda self: self.spaces[0].precision)
    precision_floor = property(lambda self: self.spaces[0].precision_floor)
    recall = property(lambda self: self.spaces[0].recall)
    recall_floor = property(lambda self: self.spaces[0].recall_floor)

    @property
    def worst_fd_ratio(self) -> float:
        return max(s.fd_ratio for s in self.spaces)

    def summary(self) -> str:
        """One line: every space's FD over its floor and KID, the detail ratio and the class accuracy."""
        spaces = ", ".join(f"{s.space} {s.fd_ratio:.2f}x (KID {1e3 * s.kid:.2g}e-3)" for s in self.spaces)
        accuracy = f", class accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        return f"FD / floor: {spaces}; detail {self.detail:.2f} (floor {self.detail_floor:.2f}){accuracy}"

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics for a training log: the first space's under their plain names (``fd``, ``fd_ratio``,
        ``precision``, ``recall``, ``class_accuracy``), every space's FD ratio and KID by name, and ``detail``."""
        out = {"fd": self.fd, "fd_floor": self.fd_floor, "fd_ratio": self.fd_ratio, "precision": self.precision,
               "recall": self.recall, "detail": self.detail, "worst_fd_ratio": self.worst_fd_ratio}  # fmt: skip
        for s in self.spaces:
            out.update({f"fd_ratio_{s.space}": s.fd_ratio, f"kid_{s.space}": s.kid})
        if self.accuracy is not None:
            out["class_accuracy"] = self.accuracy
        return {prefix + k: v for k, v in out.items()}

    def to_dict(self) -> dict:
        first = {k: getattr(self, k) for k in ("feature_space", "fd", "fd_floor", "fd_ratio", "precision", "precision_floor", "recall", "recall_floor")}
        return {**asdict(self), **first, "spaces": [{**asdict(s), "fd_ratio": s.fd_ratio} for s in self.spaces]}

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        """The report :meth:`to_dict` (``--output-json``) wrote."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "spaces"]
        kept = [f.name for f in dataclasses.fields(SpaceReport)]
        return cls(**{k: d[k] for k in names if k in d}, spaces=[SpaceReport(**{k: s[k] for k in kept}) for s in d["spaces"]])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        lines = [f"{self.num_samples} images against {self.reference} ({self.num_reference} images); "
                 f"floor: {self.num_samples} real training images", "",
                 "| space | FD | floor | FD / floor | KID x 1e3 | floor | precision | floor | recall | floor |",
                 "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {s.space} | {s.fd:.4g} | {s.fd_floor:.4g} | {s.fd_ratio:.2f}x | {1e3 * s.kid:.3g} ± {1e3 * s.kid_std:.2g} | "
                  f"{1e3 * s.kid_floor:.3g} ± {1e3 * s.kid_floor_std:.2g} | {s.precision:.3f} | {s.precision_floor:.3f} | "
                  f"{s.recall:.3f} | {s.recall_floor:.3f} |" for s in self.spaces]  # fmt: skip
        lines += ["", "| statistic | images | real-data floor |", "|---|---|---|",
                  f"| detail (Laplacian variance / real) | {self.detail:.3f} | {self.detail_floor:.3f} |"]  # fmt: skip
        if self.accuracy is not None:
            lines.append(f"| class accuracy ({self.feature_space}) | {self.accuracy:.4f} | {self.accuracy_floor:.4f} (real test images) |")  # fmt: skip
        return "\n".join(lines)


@dataclass
class Embedded:
    """An image set as the evaluation sees it: features in every space, the reference classifier's logits,
    and each image's Laplacian variance."""

    features: dict[str, torch.Tensor]  # space name -> (N, D)
    logits: torch.Tensor | None  # (N, classes)
    detail: torch.Tensor  # (N,)

    @classmethod
    def cat(cls, parts: list[Embedded]) -> Embedded:
        logits = [p.logits for p in parts]
        return cls({k: torch.cat([p.features[k] for p in parts]) for k in parts[0].features},
                   torch.cat(logits) if logits[0] is not None else None, torch.cat([p.detail for p in parts]))  # fmt: skip

    def cpu(self) -> Embedded:
        return Embedded({k: v.cpu() for k, v in self.features.items()}, None if self.logits is None else self.logits.cpu(), self.detail.cpu())  # fmt: skip


@dataclass
class _Floor:
    spaces: dict[str, tuple[float, float, float, float, float]]  # name -> (FD, KID, KID sd, precision, recall)
    detail: float


class Evaluator:
    """Holds the reference split's features in every space once; scores any number of image sets against them."""

    def __init__(self, spaces, data: ImageData, classifier: Classifier | None = None, reference_name: str = "",
                 batch_size: int = 500, max_reference: int | None = None, seed: int = 0, kid_subsets: int = 100):  # fmt: skip
        self.spaces = list(spaces) if isinstance(spaces, (list, tuple)) else [spaces]
        self.data, self.batch_size, self.seed, self.kid_subsets = data, batch_size, seed, kid_subsets
        self.accuracy_space = next((s for s in self.spaces if getattr(s, "predicts_classes", False)), None)
        if self.accuracy_space is None and classifier is not None:
            self.accuracy_space = ClassifierSpace(classifier)
        channels = classifier.config.in_channels if classifier is not None else data.channels
        self.transform = ImageTransform(channels)  # native size; the feature extractor resizes
        reference = data.test if max_reference is None else data.test.select(range(min(max_reference, len(data.test))))
        if len(reference) < 2:
            raise UserError(f"the reference split has {len(reference)} image(s); the metrics need at least 2")
        self.reference_name = reference_name or "the test split"
        ref, labels = self._embed_dataset(reference)
        self.reference_features = ref.features
        self.reference = {name: Gaussian.fit(f) for name, f in ref.features.items()}
        self.reference_detail = float(ref.detail.mean())
        self.reference_accuracy = class_accuracy(ref.logits, labels) if ref.logits is not None else None
        self._floors: dict[tuple, _Floor] = {}

    @property
    def space(self):
        """The first space (the reference classifier's)."""
        return self.spaces[0]

    @classmethod
    def from_dataset(cls, spaces, data_args: DataArguments, classifier: Classifier | None = None, **kw) -> Evaluator:
        return cls(spaces, load_image_data(data_args), classifier, reference_name=f"{data_args.dataset} test split", **kw)

    # -- features ----------------------------------------------------------------------------------

    def embed_batch(self, x: torch.Tensor) -> Embedded:
        """One batch (B, C, H, W) in [-1, 1] -> its :class:`Embedded`, on the spaces' device (for gathering)."""
        features, logits = {}, None
        for space in self.spaces:
            f, lg = space.embed(x)
            features[space.name] = f
            if space is self.accuracy_space:
                logits = lg
        if logits is None and self.accuracy_space is not None:
            logits = self.accuracy_space.embed(x)[1]
        return Embedded(features, logits, laplacian_variance(x.clamp(-1, 1)).to(next(iter(features.values())).device))

    def embed(self, images) -> Embedded:
        """Images (N, C, H, W) in [-1, 1], or batches of them (read one at a time) -> :class:`Embedded` on the CPU."""
        chunks = images.split(self.batch_size) if isinstance(images, torch.Tensor) else images
        return Embedded.cat([self.embed_batch(chunk).cpu() for chunk in chunks])

    def _embed_dataset(self, ds: datasets.Dataset) -> tuple[Embedded, torch.Tensor]:
        parts, labels = [], []
        for batch in image_loader(ds, self.transform, self.batch_size, shuffle=False):
            parts.append(self.embed_batch(batch["pixel_values"]).cpu())
            labels.append(batch["labels"])
        return Embedded.cat(parts), torch.cat(labels)

    # -- the floor and the scores ----------------------------------------------------------------

    def _reference_subset(self, name: str, n: int) -> torch.Tensor:
        """n reference features (a fixed draw): precision/recall compare sets of equal size."""
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.reference_features[name]), generator=g)[:n]
        return self.reference_features[name][order]

    def _space_metrics(self, name: str, feats: torch.Tensor) -> tuple[float, float, float, float, float]:
        kid, kid_std = kernel_distance(feats, self.reference_features[name], subsets=self.kid_subsets, seed=self.seed)
        p, r = precision_recall(self._reference_subset(name, len(feats)), feats)
        return frechet_distance(feats, self.reference[name]), kid, kid_std, p, r

    def floor(self, n: int, labels: torch.Tensor | None = None) -> _Floor:
        """Every space's (FD, KID, KID sd, precision, recall), and the detail ratio, of n real training images
        (a fixed draw) against the reference.

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
            real, _ = self._embed_dataset(train)
            self._floors[key] = _Floor({name: self._space_metrics(name, f) for name, f in real.features.items()},
                                       float(real.detail.mean()) / self.reference_detail)  # fmt: skip
        return self._floors[key]

    def score_features(self, embedded: Embedded, labels: torch.Tensor | None = None) -> Report:
        """A :class:`Report` of an already embedded image set (``labels``: the classes asked for, or None)."""
        n = len(embedded.detail)
        floor = self.floor(n, labels)
        spaces = []
        for name, feats in embedded.features.items():
            fd, kid, kid_std, p, r = self._space_metrics(name, feats)
            f_fd, f_kid, f_kid_std, f_p, f_r = floor.spaces[name]
            spaces.append(SpaceReport(name, fd, f_fd, kid, kid_std, f_kid, f_kid_std, p, f_p, r, f_r))
        logits = embedded.logits
        accuracy = class_accuracy(logits, labels) if logits is not None and labels is not None else None
        return Report(self.reference_name, n, len(next(iter(self.reference_features.values()))), spaces,
                      float(embedded.detail.mean()) / self.reference_detail, floor.detail,
                      accuracy, self.reference_accuracy if accuracy is not None else None)  # fmt: skip

    def score(self, images, labels: torch.Tensor | None = None) -> Report:
        """Images (N, C, H, W) in [-1, 1] or batches of them; ``labels`` (N,) the classes they were asked to be (-1: none)."""
        embedded = self.embed(images)
        if labels is not None and (torch.as_tensor(labels) < 0).all():
            labels = None
        return self.score_features(embedded, None if labels is None else torch.as_tensor(labels))


def load_sample_folder(path: str, class_names: list[str], channels: int | ImageTransform) -> tuple[FolderImages, torch.Tensor]:
    """A folder in the layout ``python -m sample`` writes (``<class>/<i>.png`` + ``metadata.jsonl``), or
    any imagefolder -> (its images, read batch by batch: :class:`common.data.FolderImages`; class ids (N,)
    in ``class_names``, -1 if none); ``channels`` as in :func:`common.data.read_images`."""
    found = read_images(path, channels)
    unknown = sorted({w for w in found.labels if w is not None and w != "unconditional" and w not in class_names})
    if unknown:
        raise UserError(f"sample folder {path} has classes {unknown} that the classifier does not know; expected among {class_names}")  # fmt: skip
    return found, found.class_ids(class_names)
