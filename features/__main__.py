"""Features of images from a tokenizer; an index of them; image search (docs/features.md).

    python -m features extract --tokenizer runs/demo/tokenizer --split all --output-dir runs/features
    python -m features index --tokenizer runs/demo/tokenizer --split train --feature encoder --output-dir runs/index
    python -m features search --index runs/index --input query.png -k 10 --output-dir runs/search
    python -m features cluster --features runs/features --feature encoder --method n2d --output-dir runs/clusters

extract writes a `datasets` dataset (image_id, label and one column per feature; features.json names
each feature, its shape and the bag of codes' IDF); index keeps one feature of every image in a faiss
index with what a search needs (the tokenizer, the images' source); search extracts the same feature of
each query image, prints its nearest images with their distances and writes neighbours.csv and
contact_sheet.png (a row per query: the query, then its neighbours); cluster groups the images of an
extract folder by k-means or N2D's recipe (features.protocols) and writes clusters.csv and summary.json,
with accuracy, NMI and ARI against the labels where there are labels.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from common.cli import UsageError, announce_memory, option, parse_args, run_main
from common.data import DataArguments, DatasetWriter, image_batches, load_image_data, model_transform, read_batches, read_images
from common.files import publish_dir, staged, staging_dir
from tokenizer import VQVAE

from .extract import DESCRIPTIONS, CodeBag, FeatureExtractor, fingerprint
from .index import METRICS, FeatureIndex, ImageSearch
from .protocols import CLUSTERING, cluster_scores, clusters


@dataclass
class SourceArguments:
    tokenizer: str = option(None, "Tokenizer folder or Hub id.")
    input: str | None = option(None, "An image or a folder of images (<class>/ subfolders give labels); unset: --dataset.")
    split: str = option("train", "With --dataset: the split to read, or 'all' (train then test).", choices=["train", "test", "all"])
    pyramid: bool = option(False, "Bag of codes per quadrant too (a 1x1 + 2x2 spatial pyramid).")
    batch_size: int = option(1000, "Images encoded at once.", domain="positive")
    output_dir: str = option(None, "Appears when complete (written batch by batch in a staging folder beside it).")

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


def _source(args: SourceArguments, data_args: DataArguments, tokenizer: VQVAE):
    """(batches of (images, labels (-1: none)), ids, class names, source): the images to describe, read
    one batch at a time, and where they are."""
    transform = model_transform(data_args, tokenizer.config.in_channels, "the tokenizer")
    if args.input is not None:
        found = read_images(args.input, transform)
        names = sorted({n for n in found.labels if n is not None})
        source = {"folder": os.path.abspath(args.input if os.path.isdir(args.input) else os.path.dirname(args.input) or ".")}
        return zip(found.batches(args.batch_size), found.class_ids(names).split(args.batch_size)), found.files, names, source
    data = load_image_data(data_args)
    splits = ["train", "test"] if args.split == "all" else [args.split]
    batches = (b for split in splits for b in image_batches(getattr(data, split), transform, args.batch_size))
    ids = [f"{split}/{i}" for split in splits for i in range(len(getattr(data, split)))]
    return batches, ids, data.class_names, {"dataset": dataclasses.asdict(data_args)}


def _columns(shapes: dict[str, tuple[int, ...]]) -> datasets.Features:
    return datasets.Features({"image_id": datasets.Value("string"), "label": datasets.Value("int64")}
                             | {n: datasets.Sequence(datasets.Value("float32"), length=s[0]) for n, s in shapes.items()})  # fmt: skip


def _describe(args: SourceArguments, data_args: DataArguments, folder: str, keep: list[str] | None = None) -> dict:
    """Features of every image (``keep``: only these) written batch by batch to the dataset ``folder``, the
    bag of codes as raw ``counts`` (its IDF needs every image first: :func:`_weighted` finishes it);
    returns the metadata that extract and index share."""
    tokenizer = VQVAE.from_pretrained(args.tokenizer)
    if torch.cuda.is_available():
        tokenizer.cuda()
    extractor, bag, writer, labels = FeatureExtractor(tokenizer, args.pyramid), CodeBag(), None, []
    for name in keep or []:
        if name not in extractor.names():
            raise UsageError(f"--feature {name}: this tokenizer gives {', '.join(extractor.names())}")
    batches, ids, names, source = _source(args, data_args, tokenizer)
    with tqdm(total=len(ids), desc="features", unit="img") as bar:
        for images, y in batches:
            raw = extractor.extract(images, args.batch_size)
            bag.update(raw["counts"])
            if writer is None:
                size, shapes = tuple(images.shape[-2:]), extractor.shapes(*images.shape[-2:])
                kept = {n: s for n, s in shapes.items() if keep is None or n in keep}
                writer = DatasetWriter(folder, _columns({n: s for n, s in kept.items() if n != "codes"} | {"counts": shapes["codes"]}))
            row = writer.rows
            writer.write({"image_id": ids[row : row + len(images)], "label": y.numpy()} | {n: raw[n] for n in kept if n != "codes"}
                         | {"counts": raw["counts"]})  # fmt: skip
            labels.extend(y.tolist())
            bar.update(len(images))
    writer.close()
    return {"tokenizer": args.tokenizer, "tokenizer_fingerprint": fingerprint(tokenizer), "image_size": list(size),
            "channels": tokenizer.config.in_channels, "pyramid": args.pyramid, "class_names": names, "source": source,
            "idf": bag.idf.tolist(), "ids": ids, "labels": labels,
            "features": {n: {"shape": list(s), "description": DESCRIPTIONS[n]} for n, s in kept.items()}}  # fmt: skip


def _weighted(folder: str, bag: CodeBag):
    """The tables of a :func:`_describe` folder, one batch at a time, with ``codes`` (the weighted bag) in
    place of the raw ``counts``."""
    for table in read_batches(folder):
        counts = table.column("counts").combine_chunks()
        codes = bag.transform(counts.flatten().to_numpy().reshape(len(counts), -1))
        yield table.drop_columns("counts"), codes


def extract(args: SourceArguments, data_args: DataArguments) -> None:
    with staged(args.output_dir) as tmp:
        raw = os.path.join(tmp, "counts")
        meta = _describe(args, data_args, raw)
        shapes = {n: tuple(v["shape"]) for n, v in meta["features"].items()}
        with DatasetWriter(tmp, _columns(shapes)) as writer:
            for table, codes in _weighted(raw, CodeBag(meta["idf"])):
                writer.write({c: table.column(c) for c in table.column_names} | {"codes": codes})
        shutil.rmtree(raw)
        with open(os.path.join(tmp, "features.json"), "w") as f:
            json.dump({k: v for k, v in meta.items() if k not in ("ids", "labels")}, f)
    print(f"{len(meta['ids'])} images -> {args.output_dir}: " + ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items()))


def index(args: SourceArguments, index_args: IndexArguments, data_args: DataArguments) -> None:
    with staged(args.output_dir) as tmp:
        raw = os.path.join(tmp, "features")
        meta = _describe(args, data_args, raw, keep=[index_args.feature])
        dim = meta["features"][index_args.feature]["shape"][0]
        built = FeatureIndex(dim, index_args.metric, index_args.exact, meta | {"feature": index_args.feature})
        announce_memory(f"an index of {len(meta['ids'])} vectors of {dim} values", built.estimate_bytes(len(meta["ids"])))
        for table, codes in _weighted(raw, CodeBag(meta["idf"])):
            column = table.column(index_args.feature).combine_chunks() if index_args.feature != "codes" else None
            built.add(codes if column is None else column.flatten().to_numpy().reshape(len(column), -1))
        shutil.rmtree(raw)
        built.write(tmp)
    kind = "exact" if index_args.exact else "HNSW"
    print(f"{len(built)} images -> {args.output_dir}: {kind} index of {index_args.feature} ({dim} values, {index_args.metric})")


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


@dataclass
class ClusterArguments:
    features: str = option(None, "A folder from python -m features extract.")
    feature: str = option("encoder", "The feature to cluster.", choices=list(DESCRIPTIONS))
    method: str = option("n2d", "n2d (PCA-50, UMAP to k dimensions, Gaussian mixture; needs umap-learn) or kmeans.", choices=list(CLUSTERING))  # fmt: skip
    k: int | None = option(None, "Clusters; default the number of classes.", domain="positive")
    seed: int = option(0, "Seed of PCA, UMAP and the mixture (or of k-means).")
    output_dir: str = option(None, "Where clusters.csv and summary.json go.")

    def validate(self) -> None:
        if self.features is None or self.output_dir is None:
            raise UsageError("cluster needs --features (a python -m features extract folder) and --output-dir")
        if not os.path.isfile(os.path.join(self.features, "features.json")):
            raise UsageError(f"--features {self.features!r}: not a python -m features extract folder (no features.json)")


def cluster(args: ClusterArguments) -> None:
    with open(os.path.join(args.features, "features.json")) as f:
        meta = json.load(f)
    if args.feature not in meta["features"]:
        raise UsageError(f"--feature {args.feature}: {args.features} holds {', '.join(meta['features'])}")
    ds = datasets.load_from_disk(args.features)
    k = args.k or len(meta["class_names"]) or 10
    announce_memory(f"{args.feature} of {len(ds)} images", 4 * len(ds) * meta["features"][args.feature]["shape"][0])
    x = ds.with_format("numpy")[args.feature]
    labels = np.asarray(ds["label"])
    t = time.perf_counter()
    pred = clusters(x, k, args.seed, args.method)
    summary = {"features": args.features, "feature": args.feature, "method": args.method, "k": k, "seed": args.seed,
               "images": len(ds), "seconds": time.perf_counter() - t}  # fmt: skip
    known = labels >= 0
    if known.any():
        summary |= {"labelled": int(known.sum())} | cluster_scores(labels[known], pred[known])
    with staged(args.output_dir) as tmp:
        with open(os.path.join(tmp, "clusters.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "label", "cluster"])
            writer.writerows(zip(ds["image_id"], (meta["class_names"][y] if y >= 0 else "" for y in labels), pred.tolist()))
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    scores = f": accuracy {summary['accuracy']:.4f}, NMI {summary['nmi']:.4f}, ARI {summary['ari']:.4f}" if known.any() else ""
    print(f"{len(ds)} images in {k} clusters by {args.method} of {args.feature} -> {args.output_dir}/clusters.csv{scores}")


COMMANDS = {"extract": (SourceArguments, DataArguments), "index": (SourceArguments, IndexArguments, DataArguments),
            "search": (SearchArguments, DataArguments), "cluster": (ClusterArguments,)}  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: python -m features {extract,index,search} [--help] ...\n\n"
              + "\n".join(f"  python -m features {c} --help" for c in COMMANDS))  # fmt: skip
        return
    if argv[0] not in COMMANDS:
        raise UsageError(f"{argv[0]!r}: the first argument is the command: extract, index, search or cluster")
    command = argv[0]
    parsed = parse_args(COMMANDS[command], argv[1:], prog=f"python -m features {command}")
    torch.set_grad_enabled(False)
    {"extract": extract, "index": index, "search": search, "cluster": cluster}[command](*parsed)


if __name__ == "__main__":
    run_main(main)
