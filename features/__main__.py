"""Features of images from a tokenizer; an index of them; image search (docs/features.md).

    python -m features extract --tokenizer runs/demo/tokenizer --split all --output-dir runs/features
    python -m features index --tokenizer runs/demo/tokenizer --split train --feature encoder --output-dir runs/index
    python -m features search --index runs/index --input query.png -k 10 --output-dir runs/search

extract writes a `datasets` dataset (image_id, label and one column per feature; features.json names
each feature, its shape and the bag of codes' IDF); index keeps one feature of every image in a faiss
index with what a search needs (the tokenizer, the images' source); search extracts the same feature of
each query image, prints its nearest images with their distances and writes neighbours.csv and
contact_sheet.png (a row per query: the query, then its neighbours).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import datasets
import torch
from tqdm.auto import tqdm

from common.cli import UsageError, option, parse_args, run_main
from common.data import DataArguments, atomic_save_to_disk, load_image_data, load_tensors, model_transform, read_images
from common.files import publish_dir, staging_dir
from tokenizer import VQVAE

from .extract import DESCRIPTIONS, CodeBag, FeatureExtractor, features, fingerprint
from .index import METRICS, FeatureIndex, ImageSearch


@dataclass
class SourceArguments:
    tokenizer: str = option(None, "Tokenizer folder or Hub id.")
    input: str | None = option(None, "An image or a folder of images (<class>/ subfolders give labels); unset: --dataset.")
    split: str = option("train", "With --dataset: the split to read, or 'all' (train then test).", choices=["train", "test", "all"])
    pyramid: bool = option(False, "Bag of codes per quadrant too (a 1x1 + 2x2 spatial pyramid).")
    batch_size: int = option(1000, "Images encoded at once.", domain="positive")
    output_dir: str = option(None, "Written whole at the end.")

    def validate(self) -> None:
        if not self.tokenizer:
            raise UsageError("--tokenizer is required: a train.tokenizer output folder or a Hub id")
        if self.output_dir is None:
            raise UsageError("--output-dir is required")
        if self.input is not None and not os.path.exists(self.input):
            raise UsageError(f"--input {self.input!r}: no such image file or folder")


@dataclass
class IndexArguments:
    feature: str = option("encoder", "The feature to index.", choices=list(DESCRIPTIONS))
    metric: str = option("cosine", "cosine (l2-normalised vectors) or l2.", choices=list(METRICS))
    exact: bool = option(False, "Compare every vector (a flat index) instead of searching the HNSW graph.")


@dataclass
class SearchArguments:
    index: str = option(None, "An index folder from python -m features index.")
    input: str = option(None, "A query image or a folder of them.")
    k: int = option(10, "Neighbours per query.", domain="positive", aliases=["-k"])
    tokenizer: str | None = option(None, "The tokenizer's folder if it moved since the index was built (must hold the same weights).")  # fmt: skip
    output_dir: str | None = option(None, "Where neighbours.csv and contact_sheet.png go; unset: printed only.")
    sheet_rows: int = option(16, "Queries shown in the contact sheet.", domain="positive")

    def validate(self) -> None:
        if self.index is None or self.input is None:
            raise UsageError("search needs --index (a python -m features index folder) and --input (a query image or folder)")
        if not os.path.exists(self.input):
            raise UsageError(f"--input {self.input!r}: no such image file or folder")


def _read(args: SourceArguments, data_args: DataArguments, tokenizer: VQVAE):
    """(images, labels (-1: none), class names, ids, source): the images to describe and where they are."""
    transform = model_transform(data_args, tokenizer.config.in_channels, "the tokenizer")
    if args.input is not None:
        found = read_images(args.input, transform, args.batch_size)
        names = sorted({n for n in found.labels if n is not None})
        source = {"folder": os.path.abspath(args.input if os.path.isdir(args.input) else os.path.dirname(args.input) or ".")}
        return found.images, found.class_ids(names).numpy(), names, found.files, source
    data = load_image_data(data_args)
    splits = ["train", "test"] if args.split == "all" else [args.split]
    images, labels, ids = [], [], []
    for split in splits:
        x, y = load_tensors(getattr(data, split), transform, args.batch_size)
        images.append(x), labels.append(y), ids.extend(f"{split}/{i}" for i in range(len(x)))
    source = {"dataset": dataclasses.asdict(data_args)}
    return torch.cat(images), torch.cat(labels).numpy(), data.class_names, ids, source


def _describe(args: SourceArguments, data_args: DataArguments):
    """(features {name: (N, F)}, labels, class names, ids, metadata shared by extract and index)."""
    tokenizer = VQVAE.from_pretrained(args.tokenizer)
    if torch.cuda.is_available():
        tokenizer.cuda()
    images, labels, names, ids, source = _read(args, data_args, tokenizer)
    extractor = FeatureExtractor(tokenizer, args.pyramid)
    with tqdm(total=len(images), desc="features", unit="img") as bar:
        raw = extractor.extract(images, args.batch_size, progress=bar)
    bag = CodeBag().fit(raw["counts"])
    shapes = extractor.shapes(*images.shape[-2:])
    meta = {"tokenizer": args.tokenizer, "tokenizer_fingerprint": fingerprint(tokenizer), "image_size": list(images.shape[-2:]),
            "channels": images.shape[1], "pyramid": args.pyramid, "class_names": names, "source": source, "idf": bag.idf.tolist(),
            "features": {n: {"shape": list(shapes[n]), "description": DESCRIPTIONS[n]} for n in shapes}}  # fmt: skip
    return features(raw, bag), labels, names, ids, meta


def extract(args: SourceArguments, data_args: DataArguments) -> None:
    feats, labels, names, ids, meta = _describe(args, data_args)
    columns = {"image_id": datasets.Value("string"), "label": datasets.Value("int64")}
    columns |= {n: datasets.Sequence(datasets.Value("float32"), length=v.shape[1]) for n, v in feats.items()}
    ds = datasets.Dataset.from_dict({"image_id": ids, "label": labels, **feats}, features=datasets.Features(columns))
    atomic_save_to_disk(ds, args.output_dir, {"features.json": json.dumps(meta)})
    print(f"{len(ids)} images -> {args.output_dir}: " + ", ".join(f"{n} {tuple(v.shape[1:])}" for n, v in feats.items()))


def index(args: SourceArguments, index_args: IndexArguments, data_args: DataArguments) -> None:
    feats, labels, names, ids, meta = _describe(args, data_args)
    if index_args.feature not in feats:
        raise UsageError(f"--feature {index_args.feature}: this tokenizer gives {', '.join(feats)}")
    meta |= {"feature": index_args.feature, "ids": ids, "labels": labels.tolist()}
    vectors = feats[index_args.feature]
    built = FeatureIndex(vectors.shape[1], index_args.metric, index_args.exact, meta).add(vectors)
    built.save(args.output_dir)
    kind = "exact" if index_args.exact else "HNSW"
    print(f"{len(built)} images -> {args.output_dir}: {kind} index of {index_args.feature} ({vectors.shape[1]} values, {index_args.metric})")


def contact_sheet(queries: torch.Tensor, neighbours: torch.Tensor, titles: list[list[str]], path: str) -> None:
    """A row per query: the query, then its neighbours with their titles (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.images import to_pil

    rows, k = neighbours.shape[:2]
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.1 * (k + 1), 1.25 * rows), squeeze=False)
    for r in range(rows):
        for c, img in enumerate([queries[r], *neighbours[r]]):
            ax = axes[r, c]
            ax.imshow(to_pil(img[None])[0], cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=255)
            ax.set_title(titles[r][c], fontsize=6)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search(args: SearchArguments, data_args: DataArguments) -> None:
    searcher = ImageSearch.from_folder(args.index, args.tokenizer)
    searcher.check_k(args.k, "-k")
    tokenizer = searcher.extractor.tokenizer
    found = read_images(args.input, model_transform(data_args, tokenizer.config.in_channels, "the index's tokenizer"))
    distances, rows = searcher(found.images, args.k)
    ids = searcher.ids
    table = [(q, rank + 1, ids[i], searcher.label(i), float(d)) for q, (ds, rs) in zip(found.files, zip(distances, rows)) for rank, (d, i) in enumerate(zip(ds, rs))]  # fmt: skip
    for q, rank, i, name, d in table[: 10 * args.k]:
        print(f"{q}\t{rank}\t{i}\t{name}\t{d:.4f}")
    if len(table) > 10 * args.k:
        print(f"... {len(found.files)} queries in all")
    if args.output_dir is None:
        return
    tmp = staging_dir(args.output_dir)
    with open(os.path.join(tmp, "neighbours.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "rank", "image_id", "label", "distance"])
        writer.writerows(table)
    shown = min(len(found.files), args.sheet_rows)
    neighbours = searcher.source_images([ids[i] for i in rows[:shown].ravel()])
    titles = [[found.files[r][-14:]] + [f"{searcher.label(i)[:10]} {d:.2f}" for d, i in zip(distances[r], rows[r])] for r in range(shown)]
    contact_sheet(found.images[:shown], neighbours.view(shown, args.k, *neighbours.shape[1:]), titles, os.path.join(tmp, "contact_sheet.png"))
    publish_dir(tmp, args.output_dir)
    print(f"{len(found.files)} queries -> {args.output_dir}/neighbours.csv and contact_sheet.png")


COMMANDS = {"extract": (SourceArguments, DataArguments), "index": (SourceArguments, IndexArguments, DataArguments),
            "search": (SearchArguments, DataArguments)}  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: python -m features {extract,index,search} [--help] ...\n\n"
              + "\n".join(f"  python -m features {c} --help" for c in COMMANDS))  # fmt: skip
        return
    if argv[0] not in COMMANDS:
        raise UsageError(f"{argv[0]!r}: the first argument is the command: extract, index or search")
    command = argv[0]
    parsed = parse_args(COMMANDS[command], argv[1:], prog=f"python -m features {command}")
    torch.set_grad_enabled(False)
    {"extract": extract, "index": index, "search": search}[command](*parsed)


if __name__ == "__main__":
    run_main(main)
