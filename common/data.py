"""Image datasets for both stages: any ``--dataset`` source -> ``datasets`` splits -> [-1, 1] tensors.

Sources: a Hub dataset id, an imagefolder folder (``root/<class>/*.png``, optional ``train/``/``test/``),
a folder written by ``save_to_disk``, or the builtin ``fashion_mnist`` (the IDX files of Debian's
``dataset-fashion-mnist``). Images are kept undecoded (``Image(decode=False)``) and decoded per batch
here, so an unreadable file is reported with its path.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import random
import sys
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, DatasetDict, Features, Image
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import generate_random_fingerprint
from PIL import Image as PILImage

from common.cli import UsageError, UserError, option
from common.files import publish_dir, staging_dir

FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = ("L", "1", "I", "I;16", "F", "LA")
STREAM_SHARDS = 16  # shards of a local dataset streamed with --streaming (split among the processes)


class DataError(UserError):
    """Bad dataset input; the message is one line naming the value and what was expected."""


@dataclass
class DataArguments:
    """Where the images come from: the options of every command that reads a dataset."""

    dataset: str = option("fashion_mnist", "Hub id, imagefolder folder, save_to_disk folder, or 'fashion_mnist'.")
    dataset_config: str | None = option(None, "Config name of a Hub dataset.")
    image_column: str | None = option(None, "Image column; found by name when unset.")
    label_column: str | None = option(None, "Label column; found by name when unset.")
    image_channels: int | None = option(None, "Convert every image to 1 (grayscale) or 3 (RGB) channels; unset: an image whose colour mode differs from the model's (or, training a new model, from the first image's) is an error.", choices=[1, 3])  # fmt: skip
    test_fraction: float = option(0.1, "Held-out fraction when the dataset has no test split.", domain="fraction")
    only_classes: str | None = option(None, "Keep only the images of these classes (comma list of names or ids), e.g. one class for anomaly detection.")  # fmt: skip
    max_train_samples: int | None = option(None, "Use only the first N training images.", domain="positive")
    max_eval_samples: int | None = option(None, "Use only the first N test images.", domain="positive")

    # What the training commands add (TrainingDataArguments); a command that reads a split whole has these.
    resolution = None
    pad_to_multiple = False
    num_workers = 0
    streaming = False
    shuffle_buffer = 1000

    def validate(self) -> None:
        pass


@dataclass
class TrainingDataArguments(DataArguments):
    """The data options of the training commands: resizing or padding, loader workers, streaming."""

    resolution: int | None = option(None, "Resize images to this square size.", domain="positive")
    pad_to_multiple: bool = option(False, "Pad images to a multiple of the downsampling factor.")
    num_workers: int = option(0, "DataLoader worker processes that decode images.", domain="non-negative")
    streaming: bool = option(False, "Stream the dataset (datasets.IterableDataset) instead of downloading it whole.")
    shuffle_buffer: int = option(1000, "Examples in the shuffle buffer of a stream (kept undecoded, saved with checkpoints).", domain="positive")  # fmt: skip
    max_eval_samples: int | None = option(None, "Use only the first N test images (streaming: the evaluation set, default 1000).", domain="positive")  # fmt: skip

    def validate(self) -> None:
        if self.streaming and self.num_workers:
            raise UsageError(f"--num-workers {self.num_workers} with --streaming: a stream is decoded in the main process, "
                             "so that checkpoints hold its exact position; drop --num-workers")  # fmt: skip
        if self.resolution and self.pad_to_multiple:
            raise UsageError("--resolution and --pad-to-multiple together: pass one (resize, or pad to the factor)")


@dataclass
class ImageData:
    train: datasets.Dataset | datasets.IterableDataset  # columns: image (undecoded), label; a stream with --streaming
    test: datasets.Dataset  # in memory even when streaming: the first --max-eval-samples of the held-out split
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


class DatasetWriter:
    """A ``datasets`` dataset written batch by batch in the folder layout of ``save_to_disk`` (``datasets.
    load_from_disk`` reads it back): memory holds one batch, never the dataset.

        with staged(out) as tmp, DatasetWriter(tmp, features) as writer:
            for labels, codes in batches:
                writer.write({"label": labels, "codes": codes})  # a column: a list, or an array (rows, ...)

    A column of ``Sequence(..., length=n)`` takes an array (rows, n). A new Arrow file (an IPC stream, as
    datasets writes them) starts every ``shard_bytes``, like save_to_disk's ``max_shard_size``.
    """

    def __init__(self, path: str, features: Features, split: str | None = None, shard_bytes: int = 500 << 20):
        os.makedirs(path, exist_ok=True)
        self.path, self.features, self.split, self.shard_bytes = path, features, split, shard_bytes
        self.schema, self.files, self.rows = features.arrow_schema, [], 0
        self._sink = self._stream = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        elif self._sink is not None:
            self._sink.close()

    @staticmethod
    def _column(values, kind: pa.DataType) -> pa.Array:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):  # a column read back from a dataset: as it is
            return values if values.type == kind else values.cast(kind)
        if isinstance(values, np.ndarray) and pa.types.is_fixed_size_list(kind):
            flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind.value_type)
            return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
        return pa.array(values, type=kind)

    def _open(self) -> None:
        name = f"data-{len(self.files):05d}.arrow"
        self.files.append(name)
        self._sink = pa.OSFile(os.path.join(self.path, name), "wb")
        self._stream = pa.ipc.new_stream(self._sink, self.schema)

    def _close_shard(self) -> None:
        self._stream.close()
        self._sink.close()
        self._sink = self._stream = None

    def write(self, columns: dict) -> None:
        table = pa.Table.from_arrays([self._column(columns[f.name], f.type) for f in self.schema], schema=self.schema)
        if self._stream is None:
            self._open()
        self._stream.write_table(table)
        self.rows += table.num_rows
        if self._sink.tell() >= self.shard_bytes:
            self._close_shard()

    def close(self) -> None:
        """Finish the last file and write what ``load_from_disk`` reads first (state.json, dataset_info.json)."""
        if self._stream is None and not self.files:  # no rows: one empty file, as save_to_disk writes
            self._open()
        if self._stream is not None:
            self._close_shard()
        datasets.DatasetInfo(features=self.features).write_to_directory(self.path)
        state = {"_data_files": [{"filename": f} for f in self.files], "_fingerprint": generate_random_fingerprint(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": self.split}  # fmt: skip
        with open(os.path.join(self.path, "state.json"), "w") as f:
            json.dump(state, f, indent=2)


def write_splits_index(path: str, splits: list[str]) -> None:
    """The ``dataset_dict.json`` that makes a folder of split folders (each a :class:`DatasetWriter`'s) a DatasetDict."""
    with open(os.path.join(path, "dataset_dict.json"), "w") as f:
        json.dump({"splits": list(splits)}, f)


def read_batches(path: str, batch_rows: int = 1000):
    """The record batches of a dataset folder (``save_to_disk``/:class:`DatasetWriter` layout) as pyarrow
    tables, read from the files without memory-mapping them: a second pass over a written dataset keeps
    only the batch resident (``load_from_disk`` maps the files, and every page read stays in the process)."""
    with open(os.path.join(path, "state.json")) as f:
        files = [d["filename"] for d in json.load(f)["_data_files"]]
    for name in files:
        with pa.OSFile(os.path.join(path, name), "rb") as source:
            reader, pending = pa.ipc.open_stream(source), []
            for batch in reader:
                pending.append(batch)
                if sum(b.num_rows for b in pending) >= batch_rows:
                    yield pa.Table.from_batches(pending)
                    pending = []
            if pending:
                yield pa.Table.from_batches(pending)


# ---------------------------------------------------------------- sources -> splits


def _has_images(root: str) -> bool:
    for _, _, files in os.walk(root):
        if any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files):
            return True
    return False


def _load_source(args: DataArguments) -> DatasetDict | datasets.Dataset | datasets.IterableDatasetDict:
    src = args.dataset
    if src == "fashion_mnist":
        if os.path.exists(os.path.join(fashion_mnist_dir(), "train-images-idx3-ubyte.gz")):
            return _as_stream(load_fashion_mnist()) if args.streaming else load_fashion_mnist()
        src = FASHION_MNIST_HUB_ID  # no local files: the same data from the Hub
    if os.path.isdir(src):
        if any(os.path.exists(os.path.join(src, f)) for f in ("dataset_dict.json", "state.json")):
            local = datasets.load_from_disk(src)
            return _as_stream(local) if args.streaming else local
        if not _has_images(src):
            raise DataError(f"dataset folder {src} contains no images; expected root/<class>/*.png (imagefolder) or a save_to_disk folder")  # fmt: skip
        dd = load_folder(src, streaming=args.streaming)
        _warn_dropped_labels(src, dd)
        return dd
    if os.path.exists(src):
        raise DataError(f"dataset {src} is a file; expected a folder, a Hub dataset id or 'fashion_mnist'")
    try:
        return datasets.load_dataset(src, args.dataset_config, streaming=args.streaming)
    except Exception as e:  # offline, unknown id, ...: one line, naming the id
        raise DataError(f"cannot load dataset {src!r} from the Hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip


def load_folder(root: str, streaming: bool = False):
    """datasets' imagefolder over a local folder, without its download and split-building progress bars
    (a command's output is its own messages; reading a local folder downloads nothing)."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        return datasets.load_dataset("imagefolder", data_dir=root, streaming=streaming)
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def _warn_dropped_labels(root: str, dd) -> None:
    """datasets' imagefolder takes labels from folder names only when every image lies at the same depth
    below its split folder; otherwise it drops them without a word (a class named "T-shirt/top" written as
    a path does it). Say so, naming an image at each of two depths."""
    if "label" in (next(iter(dd.values())).features or {}):
        return
    by_depth: dict[int, str] = {}
    for folder, _, files in os.walk(root):
        parts = [] if folder == root else os.path.relpath(folder, root).split(os.sep)
        depth = len(parts) - (1 if parts and parts[0] in dd else 0)
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                by_depth.setdefault(depth, os.path.join(folder, f))
    if len(by_depth) > 1:
        shallow, deep = by_depth[min(by_depth)], by_depth[max(by_depth)]
        print(f"warning: {root} loaded without labels: its images lie at different folder depths ({shallow}, {deep}), "
              "and datasets' imagefolder then reads no classes; put every image at <root>/<class>/<file>", file=sys.stderr, flush=True)  # fmt: skip


def _as_stream(local: DatasetDict | datasets.Dataset) -> datasets.IterableDatasetDict:
    """A dataset on disk read as a stream, in shards, exactly as a Hub dataset would be streamed."""
    if isinstance(local, datasets.Dataset):
        local = DatasetDict({"train": local})
    return datasets.IterableDatasetDict(
        {k: v.to_iterable_dataset(num_shards=max(1, min(STREAM_SHARDS, len(v)))) for k, v in local.items()}
    )


def _find_column(ds, given: str | None, candidates: tuple[str, ...], kind: str) -> str | None:
    columns = ds.column_names or []
    if given is not None:
        if given not in columns:
            raise DataError(f"{kind} column {given!r} not in dataset columns {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    if kind == "image":
        for name, feat in (ds.features or {}).items():
            if isinstance(feat, Image):
                return name
        raise DataError(f"dataset has no image column among {columns}; pass --image-column")
    return None


def _check_columns(ds, image_col: str, label_col: str | None) -> None:
    """One line for an image column that holds no images, or a label column that holds no classes."""
    features = ds.features or {}
    feat = features.get(image_col)
    if feat is not None and not isinstance(feat, Image):
        raise DataError(f"image column {image_col!r} holds {_describe(feat)}, not images; pass --image-column")
    if label_col is not None:
        feat = features.get(label_col)
        ok = isinstance(feat, ClassLabel) or (isinstance(feat, datasets.Value) and (feat.dtype.startswith(("int", "uint")) or feat.dtype == "string"))  # fmt: skip
        if feat is not None and not ok:
            raise DataError(f"label column {label_col!r} holds {_describe(feat)}, not integers or class names; pass --label-column")  # fmt: skip


def _describe(feat) -> str:
    return f"values of type {feat.dtype}" if isinstance(feat, datasets.Value) else type(feat).__name__


def _normalise(ds, image_col: str, label_col: str | None):
    """Columns ``image`` (undecoded) and ``label`` (-1 when the dataset has none), in that order."""
    if label_col is None:
        ds = ds.map(lambda ex: {"__label": -1}) if isinstance(ds, datasets.IterableDataset) else ds.add_column("__label", [-1] * len(ds))  # fmt: skip
        label_col = "__label"
    ds = ds.select_columns([image_col, label_col])
    ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n})
    return ds.cast_column("image", Image(decode=False))


def class_ids(spec: str, names: list[str], option: str = "--only-classes") -> set[int]:
    """'Bag,3' -> {8, 3}: a comma list of class names or ids of ``names``."""
    keep = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in names:
            keep.add(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            keep.add(int(item))
        else:
            raise DataError(f"{option}: unknown class {item!r}; expected names or ids of {names}")
    return keep


def _fingerprint(value: dict) -> str:
    """Identity of an undecoded image: its bytes, or its path when it has none."""
    return hashlib.sha1(value.get("bytes") or str(value.get("path")).encode()).hexdigest()


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """A whole column as one array (``ds[name]`` is a lazy column in datasets 5: row by row, slow)."""
    return ds.with_format("numpy", columns=[name])[:][name]


def _class_names(feature, labels) -> list[str]:
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(int(max(labels, default=-1)) + 1)]


def load_image_data(args: DataArguments, seed: int = 0) -> ImageData:
    """Load ``args.dataset`` into train/test splits with columns ``image`` (undecoded) and ``label``.

    With ``args.streaming`` the training split stays a stream (:class:`ShuffledStream` splits and
    shuffles it per process) and the evaluation set is its first ``max_eval_samples`` images (1000 by
    default) of the test split, or, without one, taken off the head of the stream by count.
    """
    dd = _load_source(args)
    if isinstance(dd, (datasets.Dataset, datasets.IterableDataset)):
        dd = DatasetDict({"train": dd}) if isinstance(dd, datasets.Dataset) else datasets.IterableDatasetDict({"train": dd})
    train_split = "train" if "train" in dd else next(iter(dd))
    train = dd[train_split]
    image_col = _find_column(train, args.image_column, ("image", "img"), "image")
    label_col = _find_column(train, args.label_column, ("label", "labels"), "label")
    _check_columns(train, image_col, label_col)
    streaming = isinstance(train, datasets.IterableDataset)
    label_feature = (train.features or {}).get(label_col) if label_col else None
    if not streaming and label_col is not None and getattr(label_feature, "dtype", None) == "string":
        dd = dd.class_encode_column(label_col)  # class names as strings (e.g. metadata.jsonl) -> ClassLabel
        train = dd[train_split]
        label_feature = train.features[label_col]
    test_split = next((s for s in ("test", "validation", "valid") if s in dd), None)
    if streaming:
        n_eval = args.max_eval_samples or 1000
        train = _normalise(train, image_col, label_col)
        test = train if test_split is None else _normalise(dd[test_split], image_col, label_col)
        test = datasets.Dataset.from_list(list(test.take(n_eval)), features=test.features)
        if test_split is None:
            # Held out by count off the head of the stream, so it is the same every run. The training
            # stream drops those images by content: `skip` would count per process after the split.
            held_out = {_fingerprint(v) for v in test["image"]}
            train = train.filter(lambda ex: _fingerprint(ex["image"]) not in held_out)
        if args.max_train_samples:
            train = train.take(args.max_train_samples)
        first = next(iter(train), None)
        if first is None:
            raise DataError(f"dataset {args.dataset} has no training images")
        class_names = _class_names(label_feature, column(test, "label"))
        first = decode_image(first["image"])
    else:
        if test_split is None:
            # A fixed held-out fraction with a fixed seed, so every run evaluates on the same images.
            parts = train.train_test_split(test_size=args.test_fraction, seed=seed)
            train, test = parts["train"], parts["test"]
        else:
            test = dd[test_split]
        class_names = [] if label_col is None else _class_names(label_feature, column(train, label_col) if not isinstance(label_feature, ClassLabel) else [])  # fmt: skip
        train, test = _normalise(train, image_col, label_col), _normalise(test, image_col, label_col)
        if args.max_train_samples:
            train = train.select(range(min(args.max_train_samples, len(train))))
        if args.max_eval_samples:
            test = test.select(range(min(args.max_eval_samples, len(test))))
        if len(train) == 0:
            raise DataError(f"dataset {args.dataset} has no training images")
        first = decode_image(train[0]["image"])
    if label_col is None:
        class_names = []
    if args.only_classes:
        keep = class_ids(args.only_classes, class_names)
        train, test = (d.filter(lambda label: label in keep, input_columns="label") for d in (train, test))
        if not isinstance(test, datasets.IterableDataset) and (len(train) == 0 or len(test) == 0):
            raise DataError(f"--only-classes {args.only_classes}: no training or no test images of these classes")
    channels = args.image_channels or (1 if _is_gray(first) else 3)
    return ImageData(train, test, class_names, channels, (first.height, first.width))


# ---------------------------------------------------------------- images -> tensors


def _where(value) -> str:
    return (value.get("path") if isinstance(value, dict) else None) or "(in-memory bytes)"


def decode_image(value) -> PILImage.Image:
    """An undecoded ``Image`` value ({'bytes', 'path'}) or a PIL image -> PIL image, or a DataError."""
    if isinstance(value, PILImage.Image):
        return value
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        raise DataError(f"image value {str(value)[:60]!r} is not an image; expected encoded image bytes or a file path")
    try:
        img = PILImage.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        img.load()
        return img
    except Exception as e:
        raise DataError(f"cannot read image {_where(value)}: {type(e).__name__}: {e}") from None


def _is_gray(img: PILImage.Image) -> bool:
    return img.mode in GRAY_MODES


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


FIRST_IMAGE = "the dataset's first image"


class ImageTransform:
    """The collate function of every image loader: undecoded examples -> a batch of [-1, 1] tensors.

    Decoding happens here, per batch (in the DataLoader's workers when there are any), so an unreadable
    file, an image of another size (without ``resolution``) or of another colour mode (without
    ``convert``) is reported with its path instead of being silently reshaped.
    """

    def __init__(self, channels: int, resolution: int | None = None, multiple: int | None = None,
                 size: tuple[int, int] | None = None, convert: bool = True, expected_by: str = FIRST_IMAGE,
                 convert_option: str = "--image-channels"):  # fmt: skip
        self.channels, self.resolution, self.multiple = channels, resolution, multiple
        self.size = None if resolution else size  # (H, W) every image must have, when not resized
        self.convert = convert  # False: a grayscale image in an RGB dataset (or the reverse) is an error
        self.expected_by = expected_by  # what fixed the colour mode, for that error
        self.convert_option = convert_option  # what the error tells the user to set (the service's field is image_channels)

    def pixels(self, value) -> torch.Tensor:
        img = decode_image(value)
        where = _where(value)
        if not self.convert and _is_gray(img) != (self.channels == 1):
            kind = "grayscale" if _is_gray(img) else f"colour ({img.mode})"
            if self.expected_by == FIRST_IMAGE:  # training a new model: the first image set the mode
                want, fix = "is " + ("grayscale" if self.channels == 1 else "colour"), "1 or 3"
            else:
                want, fix = "takes " + ("grayscale (1 channel)" if self.channels == 1 else "colour (3 channels)"), str(self.channels)  # fmt: skip
            raise DataError(f"image {where} is {kind} but {self.expected_by} {want}; pass {self.convert_option} {fix} to convert every image")  # fmt: skip
        if self.size and (img.height, img.width) != tuple(self.size):
            raise DataError(f"image {where} is {img.width}x{img.height} but the dataset's first image is "
                            f"{self.size[1]}x{self.size[0]}; pass --resolution N to resize every image")  # fmt: skip
        return image_to_uint8(img, self.channels, self.resolution, self.multiple)

    def __call__(self, examples: list[dict]) -> dict:
        return {
            "pixel_values": to_float(torch.stack([self.pixels(e["image"]) for e in examples])),
            "labels": torch.tensor([e.get("label", -1) for e in examples], dtype=torch.long),  # -1: no label
        }


def model_input(data: ImageData, args: DataArguments, channels: int, f: int) -> tuple[ImageTransform, tuple[int, int], tuple[int, int]]:  # fmt: skip
    """The transform that feeds a model with downsampling factor ``f``, with the (H, W) it produces and
    the (H, W) of the original pixels (smaller when padding); a DataError if ``f`` does not divide it."""
    original = (args.resolution,) * 2 if args.resolution else data.size
    multiple = f if args.pad_to_multiple else None
    h, w = (original[0] + -original[0] % f, original[1] + -original[1] % f) if multiple else original
    if h % f or w % f:
        raise DataError(f"image size {h}x{w} is not divisible by the downsampling factor f={f}; "
                        "pass --pad-to-multiple or --resolution")  # fmt: skip
    transform = ImageTransform(channels, args.resolution, multiple, size=data.size, convert=args.image_channels is not None)
    return transform, (h, w), original


def image_loader(ds: datasets.Dataset, transform: ImageTransform, batch_size: int, shuffle: bool,
                 num_workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:  # fmt: skip
    """A DataLoader over ``ds`` that fetches (``Dataset.__getitems__``) and decodes one batch per call.

    On a GPU machine the batches are pinned so the copy to the device overlaps compute; workers persist
    across epochs so each epoch does not pay their start-up again.
    """
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, collate_fn=transform, num_workers=num_workers,
        drop_last=drop_last, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
    )  # fmt: skip


def image_batches(ds: datasets.Dataset, transform: ImageTransform, batch_size: int = 500):
    """(images (B, C, H, W) in [-1, 1], labels (B,)) of a map-style split, batch after batch, in order:
    how every command reads a split (one batch decoded at a time, never the split whole)."""
    for batch in image_loader(ds, transform, batch_size, shuffle=False):
        yield batch["pixel_values"], batch["labels"]


def load_tensors(ds: datasets.Dataset, channels: int | ImageTransform, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (map-style) split in memory: images (N, C, H, W) in [-1, 1] and labels (N,), in order (for
    the sets a benchmark holds; commands read :func:`image_batches`).

    ``channels`` is a channel count (every image converted to it) or the transform to apply
    (:func:`model_transform`: a colour mode other than the model's is an error)."""
    transform = channels if isinstance(channels, ImageTransform) else ImageTransform(channels)
    batches = list(image_batches(ds, transform, batch_size))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def model_transform(data_args: DataArguments, channels: int, model: str) -> ImageTransform:
    """How a command that feeds an existing ``model`` (taking ``channels``) reads images: every command
    follows one rule, as training does. An image of the model's colour mode is read as it is; one of the
    other mode is an error naming the image, unless ``--image-channels`` (which must match the model)
    asks to convert every image."""
    if data_args.image_channels not in (None, channels):
        raise UsageError(f"--image-channels {data_args.image_channels}: {model} takes {channels} channel{'s' * (channels > 1)}")  # fmt: skip
    return ImageTransform(channels, convert=data_args.image_channels is not None, expected_by=model)


@dataclass
class FolderImages:
    """The images of a folder (or of one file), undecoded, with what the folder says of each; decoded by
    :meth:`batches` (one batch at a time) or :attr:`images` (all at once, for a handful of queries)."""

    dataset: datasets.Dataset  # column image (undecoded), in the order of ``files``
    transform: ImageTransform
    labels: list[str | None]  # class name: the image's <class>/ folder or its metadata.jsonl label; None where none
    files: list[str]  # path relative to the folder (the file's name, for one file), sorted

    def __len__(self) -> int:
        return len(self.files)

    def class_ids(self, names: list[str]) -> torch.Tensor:
        """The labels as indices into ``names``; -1 where an image has none or one that is not in ``names``."""
        return torch.tensor([names.index(n) if n in names else -1 for n in self.labels], dtype=torch.long)

    def batches(self, batch_size: int = 500):
        """Images (B, C, H, W) in [-1, 1], batch after batch in the order of ``files``."""
        for images, _ in image_batches(self.dataset, self.transform, batch_size):
            yield images

    @property
    def images(self) -> torch.Tensor:
        """Every image (N, C, H, W) in [-1, 1]."""
        return torch.cat(list(self.batches()))


def read_images(path: str, channels: int | ImageTransform) -> FolderImages:
    """One image file, or every image below a folder in datasets' imagefolder layout (``<class>/`` folders,
    optionally under ``train/``/``test/``, or a ``metadata.jsonl`` with a ``label``), in order of path: the
    reader of every command that takes images from a folder (evaluation, codec, anomaly, features).
    ``channels`` as in :func:`load_tensors`. Nothing is decoded yet; the first image is, to fail early."""
    transform = channels if isinstance(channels, ImageTransform) else ImageTransform(channels)
    if os.path.isfile(path):
        one = datasets.Dataset.from_dict({"image": [{"path": path, "bytes": None}]}, features=Features({"image": Image(decode=False)}))
        found = FolderImages(one, transform, [None], [os.path.basename(path)])
    else:
        if not os.path.isdir(path):
            raise DataError(f"{path}: no such image file or folder")
        if not _has_images(path):
            raise DataError(f"folder {path} contains no images; expected <folder>/<class>/*.png or a folder of images")
        try:
            dd = load_folder(path)
        except Exception as e:
            raise DataError(f"cannot read the images of {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip
        _warn_dropped_labels(path, dd)
        ds = datasets.concatenate_datasets(list(dd.values())).cast_column("image", Image(decode=False))
        files = [os.path.relpath(v["path"], path) for v in ds["image"]]
        order = sorted(range(len(ds)), key=files.__getitem__)
        ds = ds.select(order)
        feature = ds.features.get("label")
        raw = list(ds["label"]) if "label" in ds.column_names else [None] * len(ds)
        labels = [None if v is None else feature.names[v] if isinstance(feature, ClassLabel) else str(v) for v in raw]
        found = FolderImages(ds.select_columns(["image"]), transform, labels, [files[i] for i in order])
    transform.pixels(found.dataset[0]["image"])
    return found


# ---------------------------------------------------------------- streams larger than the disk


class ShuffledStream(torch.utils.data.IterableDataset):
    """One process's share of a streamed dataset, shuffled through a seeded buffer, endless over epochs.

    ``split_dataset_by_node`` gives every process disjoint shards. The buffer is ours rather than
    ``IterableDataset.shuffle``'s so that :meth:`state_dict` can hold it: the source's own ``state_dict``
    (its position in its shards), the buffered examples (undecoded) and the RNG. A run resumed from that
    state yields exactly the examples an uninterrupted run would. It must be iterated in the main process
    (``num_workers=0``), where the DataLoader draws exactly ``batch_size`` examples per batch.
    """

    def __init__(self, source: datasets.IterableDataset, buffer_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.source = split_dataset_by_node(source, rank=rank, world_size=world_size)
        self.buffer_size, self.seed, self.rank = max(1, buffer_size), seed, rank
        self._state = {"epoch": 0, "source": None, "buffer": [], "rng": None}

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.rank}-{epoch}")

    def __iter__(self):
        state = self._state
        while True:
            epoch = state["epoch"]
            self.source.set_epoch(epoch)
            if state["source"] is not None:  # resuming mid-epoch
                self.source.load_state_dict(state["source"])
            rng = self._rng(epoch)
            if state["rng"] is not None:
                rng.setstate(state["rng"])
            buffer = state["buffer"]
            produced = False
            for example in self.source:
                if len(buffer) < self.buffer_size:
                    buffer.append(example)
                    continue
                i = rng.randrange(len(buffer))
                out, buffer[i] = buffer[i], example
                state.update(source=self.source.state_dict(), rng=rng.getstate())
                produced = True
                yield out
            rng.shuffle(buffer)  # the end of this process's shards: drain the buffer, then a new epoch
            while buffer:
                out = buffer.pop()
                state.update(rng=rng.getstate())
                produced = True
                yield out
            if not produced:
                raise DataError(f"process {self.rank} has no training images in its share of the stream")
            state.update(epoch=epoch + 1, source=None, buffer=[], rng=None)

    def state_dict(self) -> dict:
        """Where this process is: epoch, the source's position, the buffered examples, the RNG."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._state = copy.deepcopy(state)


def image_loaders(data: ImageData, transform: ImageTransform, args, data_args: DataArguments, accelerator):
    """(training loader, evaluation loader) of an image stage: ``args`` gives the batch sizes and the seed,
    ``accelerator`` this process's rank among ``num_processes``."""
    train = training_loader(data, transform, args.train_batch_size, data_args, args.seed,
                            accelerator.process_index, accelerator.num_processes)  # fmt: skip
    return train, image_loader(data.test, transform, args.eval_batch_size, shuffle=False, num_workers=data_args.num_workers)


def training_loader(data: ImageData, transform: ImageTransform, batch_size: int, args: DataArguments, seed: int,
                    rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:  # fmt: skip
    """The training batches of ``data``: a shuffled map-style loader, or this process's resumable stream."""
    if isinstance(data.train, datasets.IterableDataset):
        return stream_loader(data.train, transform, batch_size, seed, args.shuffle_buffer, rank, world_size)
    return image_loader(data.train, transform, batch_size, shuffle=True, num_workers=args.num_workers, drop_last=True)


def stream_loader(ds: datasets.IterableDataset, transform: ImageTransform, batch_size: int, seed: int,
                  buffer_size: int, rank: int, world_size: int) -> torch.utils.data.DataLoader:  # fmt: skip
    """An endless, resumable DataLoader over this process's shards of ``ds`` (see :class:`ShuffledStream`)."""
    stream = ShuffledStream(ds, buffer_size, seed, rank, world_size)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=transform, num_workers=0,
                                       drop_last=True, pin_memory=torch.cuda.is_available())  # fmt: skip
