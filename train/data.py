"""Image datasets for both stages: any ``--dataset`` source -> ``datasets`` splits -> [-1, 1] tensors.

Sources: a Hub dataset id, an imagefolder folder (``root/<class>/*.png``, optional ``train/``/``test/``),
a folder written by ``save_to_disk``, or the builtin ``fashion_mnist`` (the IDX files of Debian's
``dataset-fashion-mnist``). Images are kept undecoded (``Image(decode=False)``) and decoded per batch
here, so an unreadable file is reported with its path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from datasets import ClassLabel, DatasetDict, Features, Image
from PIL import Image as PILImage

from train.files import publish_dir, staging_dir

FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """Bad dataset input; the message is one line naming the value and what was expected."""


@dataclass
class DataArguments:
    dataset: str = field(default="fashion_mnist", metadata={"help": "Hub id, imagefolder folder, save_to_disk folder, or 'fashion_mnist'."})  # fmt: skip
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; found by name when unset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column; found by name when unset."})
    resolution: int | None = field(default=None, metadata={"help": "Resize images to this square size."})
    pad_to_multiple: bool = field(default=False, metadata={"help": "Pad images to a multiple of the downsampling factor."})  # fmt: skip
    test_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction when the dataset has no test split."})  # fmt: skip
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N test images."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})


@dataclass
class ImageData:
    train: datasets.Dataset  # columns: image (undecoded), label
    test: datasets.Dataset
    class_names: list[str]
    channels: int  # 1 for grayscale sources, 3 otherwise
    size: tuple[int, int]  # (H, W) of the first training image as stored


# ---------------------------------------------------------------- builtin Fashion-MNIST


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data[4 : 4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> str:
    return os.environ.get("VQGPT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _cache_dir() -> str:
    return os.environ.get("VQGPT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vqgpt"))


def load_fashion_mnist() -> DatasetDict:
    """The Debian IDX files as a DatasetDict (train 60k, test 10k), cached once with save_to_disk."""
    root = fashion_mnist_dir()
    names = {"train": "train", "test": "t10k"}
    files = [os.path.join(root, f"{p}-{k}-idx{n}-ubyte.gz") for p in names.values() for k, n in (("images", 3), ("labels", 1))]  # fmt: skip
    key = hashlib.sha1("".join(f"{f}:{os.path.getsize(f)}" for f in files).encode()).hexdigest()[:12]
    cached = os.path.join(_cache_dir(), f"fashion_mnist-{key}")
    if os.path.isdir(cached):
        return datasets.load_from_disk(cached)
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    dd = DatasetDict()
    for split, prefix in names.items():
        images = _read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
        labels = _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
        dd[split] = datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features)
    atomic_save_to_disk(dd, cached)
    return datasets.load_from_disk(cached)


def atomic_save_to_disk(ds: datasets.Dataset | DatasetDict, path: str, extra_files: dict[str, str] | None = None) -> None:
    """``save_to_disk`` (plus ``extra_files``: name -> text) into a staging folder, then one rename."""
    tmp = staging_dir(path)
    ds.save_to_disk(tmp)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    publish_dir(tmp, path)


# ---------------------------------------------------------------- sources -> splits


def _has_images(root: str) -> bool:
    for _, _, files in os.walk(root):
        if any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files):
            return True
    return False


def _load_source(args: DataArguments) -> DatasetDict | datasets.Dataset:
    src = args.dataset
    if src == "fashion_mnist":
        if os.path.exists(os.path.join(fashion_mnist_dir(), "train-images-idx3-ubyte.gz")):
            return load_fashion_mnist()
        src = FASHION_MNIST_HUB_ID  # no local files: the same data from the Hub
    if os.path.isdir(src):
        if any(os.path.exists(os.path.join(src, f)) for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(src)
        if not _has_images(src):
            raise DataError(f"dataset folder {src} contains no images; expected root/<class>/*.png (imagefolder) or a save_to_disk folder")  # fmt: skip
        return datasets.load_dataset("imagefolder", data_dir=src)
    if os.path.exists(src):
        raise DataError(f"dataset {src} is a file; expected a folder, a Hub dataset id or 'fashion_mnist'")
    try:
        return datasets.load_dataset(src, args.dataset_config)
    except Exception as e:  # offline, unknown id, ...: one line, naming the id
        raise DataError(f"cannot load dataset {src!r} from the Hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip


def _find_column(ds: datasets.Dataset, given: str | None, candidates: tuple[str, ...], kind: str) -> str | None:
    if given is not None:
        if given not in ds.column_names:
            raise DataError(f"{kind} column {given!r} not in dataset columns {ds.column_names}")
        return given
    for name in candidates:
        if name in ds.column_names:
            return name
    if kind == "image":
        for name, feat in ds.features.items():
            if isinstance(feat, Image):
                return name
        raise DataError(f"dataset has no image column among {ds.column_names}; pass --image-column")
    return None


def load_image_data(args: DataArguments, seed: int = 0) -> ImageData:
    """Load ``args.dataset`` into train/test splits with columns ``image`` (undecoded) and ``label``."""
    dd = _load_source(args)
    if isinstance(dd, datasets.Dataset):
        dd = DatasetDict({"train": dd})
    train_split = "train" if "train" in dd else next(iter(dd))
    train = dd[train_split]
    image_col = _find_column(train, args.image_column, ("image", "img"), "image")
    label_col = _find_column(train, args.label_column, ("label", "labels"), "label")
    if label_col is not None and getattr(train.features[label_col], "dtype", None) == "string":
        dd = dd.class_encode_column(label_col)  # class names as strings (e.g. metadata.jsonl) -> ClassLabel
        train = dd[train_split]
    test_split = next((s for s in ("test", "validation", "valid") if s in dd), None)
    if test_split is None:
        # A fixed held-out fraction with a fixed seed, so every run evaluates on the same images.
        parts = train.train_test_split(test_size=args.test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
    else:
        test = dd[test_split]

    def normalise(ds: datasets.Dataset) -> datasets.Dataset:
        if label_col is None:
            ds = ds.add_column("__label", [-1] * len(ds))
            lc = "__label"
        else:
            lc = label_col
        ds = ds.select_columns([image_col, lc])
        ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (lc, "label")) if c != n})
        return ds.cast_column("image", Image(decode=False))

    if label_col is None:
        class_names: list[str] = []
    elif isinstance(train.features[label_col], ClassLabel):
        class_names = list(train.features[label_col].names)
    else:
        class_names = [str(i) for i in range(int(max(train[label_col])) + 1)]
    train, test = normalise(train), normalise(test)
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    if len(train) == 0:
        raise DataError(f"dataset {args.dataset} has no training images")
    first = decode_image(train[0]["image"])
    channels = 1 if first.mode in ("L", "1", "I", "I;16", "F", "LA") else 3
    return ImageData(train, test, class_names, channels, (first.height, first.width))


# ---------------------------------------------------------------- images -> tensors


def decode_image(value) -> PILImage.Image:
    """An undecoded ``Image`` value ({'bytes', 'path'}) or a PIL image -> PIL image, or a DataError."""
    if isinstance(value, PILImage.Image):
        return value
    path = value.get("path")
    try:
        img = PILImage.open(io.BytesIO(value["bytes"]) if value.get("bytes") else path)
        img.load()
        return img
    except Exception as e:
        raise DataError(f"cannot read image {path or '(in-memory bytes)'}: {type(e).__name__}: {e}") from None


def image_to_uint8(img: PILImage.Image, channels: int, resolution: int | None, multiple: int | None) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W); resized to ``resolution`` or padded (black, bottom/right) to ``multiple``."""
    img = img.convert("L" if channels == 1 else "RGB")
    if resolution:
        img = img.resize((resolution, resolution), PILImage.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.uint8))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    if multiple:
        h, w = x.shape[1:]
        # Padding goes bottom and right, so the original pixels keep their coordinates.
        x = torch.nn.functional.pad(x, (0, -w % multiple, 0, -h % multiple), value=0)
    return x


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (the image convention of vqgpt)."""
    return pixels.float().div_(127.5).sub_(1.0)


class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: undecoded images -> uint8 ``pixels``."""

    def __init__(self, channels: int, resolution: int | None = None, multiple: int | None = None):
        self.channels, self.resolution, self.multiple = channels, resolution, multiple

    def __call__(self, batch: dict) -> dict:
        pixels = [image_to_uint8(decode_image(v), self.channels, self.resolution, self.multiple) for v in batch["image"]]
        return {"pixels": pixels, "label": list(batch["label"])}


def model_input(data: ImageData, args: DataArguments, channels: int, f: int) -> tuple[ImageTransform, tuple[int, int], tuple[int, int]]:  # fmt: skip
    """The transform that feeds a model with downsampling factor ``f``, with the (H, W) it produces and
    the (H, W) of the original pixels (smaller when padding); a DataError if ``f`` does not divide it."""
    original = (args.resolution,) * 2 if args.resolution else data.size
    multiple = f if args.pad_to_multiple else None
    h, w = (original[0] + -original[0] % f, original[1] + -original[1] % f) if multiple else original
    if h % f or w % f:
        raise DataError(f"image size {h}x{w} is not divisible by the downsampling factor f={f}; "
                        "pass --pad-to-multiple or --resolution")  # fmt: skip
    return ImageTransform(channels, args.resolution, multiple), (h, w), original


def collate(examples: list[dict]) -> dict:
    """Stack uint8 pixels and convert the whole batch to [-1, 1] floats at once."""
    return {
        "pixel_values": to_float(torch.stack([e["pixels"] for e in examples])),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }


def image_loader(ds: datasets.Dataset, transform: ImageTransform, batch_size: int, shuffle: bool,
                 num_workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:  # fmt: skip
    """A DataLoader over ``ds`` that decodes one batch per call (``Dataset.__getitems__``)."""
    return torch.utils.data.DataLoader(
        ds.with_transform(transform), batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
        num_workers=num_workers, drop_last=drop_last,
    )  # fmt: skip
