"""Every --dataset source yields [-1, 1] tensors with the right shapes, labels and class names."""

import json
import os

import pytest
import torch

from common.data import FASHION_MNIST_CLASSES, DataArguments, DataError, ImageTransform, image_loader, load_image_data, read_images


def _first_batch(data, n=8):
    return next(iter(image_loader(data.train, ImageTransform(data.channels), n, shuffle=False)))


def _write_imagefolder(root, fashion, per_class=3, classes=("Bag", "Sneaker", "Trouser"), split=None):
    """Real Fashion-MNIST PNGs in root[/split]/<class>/<i>.png."""
    ids = [FASHION_MNIST_CLASSES.index(c) for c in classes]
    written = {c: 0 for c in classes}
    for row in fashion.test:
        if row["label"] in ids:
            c = FASHION_MNIST_CLASSES[row["label"]]
            if written[c] < per_class:
                d = root / split / c if split else root / c
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{written[c]}.png").write_bytes(row["image"]["bytes"])
                written[c] += 1
        if all(v == per_class for v in written.values()):
            break


def test_builtin_fashion_mnist(fashion):
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000)
    assert fashion.class_names == FASHION_MNIST_CLASSES
    assert fashion.channels == 1 and fashion.size == (28, 28)
    batch = _first_batch(fashion)
    x = batch["pixel_values"]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is black
    assert batch["labels"].tolist() == fashion.train["label"][:8] == [9, 0, 0, 3, 0, 2, 7, 2]


def test_imagefolder_without_splits_holds_out_a_fixed_fraction(tmp_path, fashion):
    _write_imagefolder(tmp_path, fashion, per_class=10)
    data = load_image_data(DataArguments(dataset=str(tmp_path), test_fraction=0.2))
    assert data.class_names == ["Bag", "Sneaker", "Trouser"]
    assert (len(data.train), len(data.test)) == (24, 6)
    again = load_image_data(DataArguments(dataset=str(tmp_path), test_fraction=0.2))
    assert again.test["label"] == data.test["label"], "held-out split is fixed"
    batch = _first_batch(data)
    assert batch["pixel_values"].shape == (8, 1, 28, 28)
    assert set(batch["labels"].tolist()) <= {0, 1, 2}


def test_imagefolder_with_train_and_test(tmp_path, fashion):
    _write_imagefolder(tmp_path, fashion, per_class=4, split="train")
    _write_imagefolder(tmp_path, fashion, per_class=2, split="test")
    data = load_image_data(DataArguments(dataset=str(tmp_path)))
    assert (len(data.train), len(data.test)) == (12, 6)
    assert data.class_names == ["Bag", "Sneaker", "Trouser"]


def test_save_to_disk_folder(tmp_path, fashion):
    import datasets

    small = datasets.DatasetDict({"train": fashion.train.select(range(40)), "test": fashion.test.select(range(10))})
    small = small.rename_column("image", "img").rename_column("label", "labels")  # found by name
    small.save_to_disk(str(tmp_path / "saved"))
    data = load_image_data(DataArguments(dataset=str(tmp_path / "saved")))
    assert (len(data.train), len(data.test)) == (40, 10)
    assert data.class_names == FASHION_MNIST_CLASSES
    batch = _first_batch(data)
    assert batch["labels"].tolist() == fashion.train["label"][:8]
    assert batch["pixel_values"].shape == (8, 1, 28, 28)


def test_resize_and_pad_options(fashion):
    data = load_image_data(DataArguments(max_train_samples=16))
    big = next(iter(image_loader(data.train, ImageTransform(1, resolution=32), 4, shuffle=False)))
    assert big["pixel_values"].shape == (4, 1, 32, 32)
    padded = next(iter(image_loader(data.train, ImageTransform(1, multiple=8), 4, shuffle=False)))
    assert padded["pixel_values"].shape == (4, 1, 32, 32)
    assert (padded["pixel_values"][:, :, 28:, :] == -1).all()


def test_folder_without_images_fails_clearly(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="contains no images"):
        load_image_data(DataArguments(dataset=str(tmp_path / "empty")))


def test_unknown_image_column_fails_clearly(fashion):
    with pytest.raises(DataError, match="image column 'pixels' not in dataset columns"):
        load_image_data(DataArguments(image_column="pixels"))


def test_rgb_folder_trains_an_rgb_tokenizer_at_another_size(tmp_path, fashion):
    """Colour images: 3 channels end to end, resized to 32 px -> 8x8 codes with f = 4."""
    from PIL import Image as PILImage

    from conftest import python_m
    from tokenizer import VQVAE

    root = tmp_path / "rgb"
    for i, row in enumerate(fashion.test.select(range(48))):
        gray = PILImage.open(__import__("io").BytesIO(row["image"]["bytes"]))
        rgb = PILImage.merge("RGB", (gray, gray.point(lambda v: v // 2), gray.point(lambda v: 255 - v)))
        d = root / FASHION_MNIST_CLASSES[row["label"]]
        d.mkdir(parents=True, exist_ok=True)
        rgb.save(d / f"{i}.png")
    data = load_image_data(DataArguments(dataset=str(root)))
    assert data.channels == 3
    batch = next(iter(image_loader(data.train, ImageTransform(3, resolution=32), 4, shuffle=False)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    out = tmp_path / "run"
    python_m("train.tokenizer", "--preset", "tiny", "--dataset", str(root), "--resolution", "32",
             "--train-batch-size", "8", "--max-train-steps", "3", "--eval-steps", "3", "--output-dir", str(out))  # fmt: skip
    model = VQVAE.from_pretrained(out)
    assert model.config.in_channels == 3
    assert model.encode(batch["pixel_values"]).shape == (4, 8, 8)
    assert model.decode(model.encode(batch["pixel_values"])).shape == (4, 3, 32, 32)


def test_emoji_set_is_a_labelled_rgb_imagefolder(tmp_path):
    """bench/emoji.py renders real colour glyphs (no notdef boxes) that load as 3-channel images with their
    Unicode group as class; the skin-tone variants of one emoji never straddle train and test."""
    from bench.emoji import build

    root = tmp_path / "emoji"
    summary = build(str(root), size=32, limit=10)
    data = load_image_data(DataArguments(dataset=str(root)))
    assert data.channels == 3 and data.size == (32, 32)
    assert data.class_names == sorted(summary["train"]) and len(data.class_names) == 9
    assert (len(data.train), len(data.test)) == (sum(summary["train"].values()), sum(summary["test"].values()))
    assert summary["skipped_missing_glyphs"] == 0 and set(summary["test"]) == set(summary["train"])
    x = _first_batch(data, 64)["pixel_values"]
    assert x.shape == (64, 3, 32, 32)
    assert (x.flatten(1).std(1) > 0.1).all()  # a glyph on every image, none blank
    colour = (x.max(1).values - x.min(1).values).amax((1, 2))  # most in colour (the family silhouettes are grey)
    assert (colour > 0.5).float().mean() > 0.75

    def bases(split):  # file name -> code points without the skin-tone modifiers U+1F3FB..U+1F3FF
        return {"-".join(c for c in p.stem.split("-") if c not in {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
                for p in (root / split).glob("*/*.png")}  # fmt: skip

    train_bases, test_bases = bases("train"), bases("test")
    assert test_bases and not train_bases & test_bases
    assert any(len(p.stem.split("-")) > 1 for p in (root / "train" / "people-and-body").glob("*.png"))  # variants kept


def test_folder_whose_labels_datasets_drops_is_named(tmp_path, fashion, capsys):
    """A class folder one level deeper than the others ("T-shirt/top" written as a path) makes datasets'
    imagefolder drop every label without a word; the loader says so, naming an image at each depth."""
    root = tmp_path / "mixed"
    _write_imagefolder(root, fashion, per_class=4)
    nested = root / "T-shirt" / "top"
    nested.mkdir(parents=True)
    (root / "Bag" / "0.png").rename(nested / "0.png")
    data = load_image_data(DataArguments(dataset=str(root)))
    assert data.class_names == []
    err = capsys.readouterr().err
    assert "loaded without labels" in err and str(nested / "0.png") in err

    _write_imagefolder(tmp_path / "even", fashion, per_class=4, split="train")
    assert load_image_data(DataArguments(dataset=str(tmp_path / "even"))).class_names == ["Bag", "Sneaker", "Trouser"]
    assert "without labels" not in capsys.readouterr().err


def test_read_images_takes_labels_from_folders_or_metadata_in_path_order(tmp_path, fashion):
    """The one reader of evaluation, codec and anomaly: <class>/ folders, python -m sample's metadata.jsonl
    (a label that is no folder name, a grid.png it does not list), one file."""
    _write_imagefolder(tmp_path / "folders", fashion, per_class=3)
    found = read_images(str(tmp_path / "folders"), channels=1)
    assert found.files == sorted(found.files) and len(found.files) == 9 and found.images.shape == (9, 1, 28, 28)
    assert found.labels == [f.split(os.sep)[0] for f in found.files]
    assert found.class_ids(["Sneaker", "Bag"]).tolist() == [{"Sneaker": 0, "Bag": 1}.get(n, -1) for n in found.labels]
    one = read_images(str(tmp_path / "folders" / found.files[4]), channels=1)
    assert one.labels == [None] and one.files == [os.path.basename(found.files[4])]
    assert torch.equal(one.images[0], found.images[4]) and one.images.min() >= -1 and one.images.max() <= 1

    root = tmp_path / "samples"  # the layout python -m sample writes
    rows = []
    for i, row in enumerate(fashion.test.select(range(6))):
        name = FASHION_MNIST_CLASSES[row["label"]]
        rel = f"{name.replace('/', '-')}/{i}.png"
        (root / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(row["image"]["bytes"])
        rows.append({"file_name": rel, "label": name})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "grid.png").write_bytes(fashion.test[0]["image"]["bytes"])
    found = read_images(str(root), channels=1)
    assert found.files == sorted(r["file_name"] for r in rows)
    assert found.labels == [{r["file_name"]: r["label"] for r in rows}[f] for f in found.files]
    expected, _ = next(iter(image_loader(fashion.test.select(range(6)), ImageTransform(1), 6, shuffle=False))).values()
    by_index = {int(os.path.splitext(os.path.basename(f))[0]): i for i, f in enumerate(found.files)}
    assert torch.equal(found.images[[by_index[i] for i in range(6)]], expected)

    with pytest.raises(DataError, match="nowhere: no such"):
        read_images(str(tmp_path / "nowhere"), channels=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no images"):
        read_images(str(tmp_path / "empty"), channels=1)


def test_dataset_writer_round_trips_through_load_from_disk(tmp_path):
    """Rows written batch by batch, over several Arrow files, read back by datasets as save_to_disk's would
    be (a Dataset, and splits with their index as a DatasetDict); no rows still make a dataset."""
    import datasets
    import numpy as np

    from common.data import DatasetWriter, read_batches, write_splits_index

    features = datasets.Features({"id": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"]),
                                  "x": datasets.Sequence(datasets.Value("float32"), length=3)})  # fmt: skip
    rng = np.random.default_rng(0)
    batches = [({"id": [f"r{i}" for i in range(s, s + 40)], "label": rng.integers(0, 2, 40), "x": rng.normal(size=(40, 3)).astype(np.float32)})
               for s in range(0, 200, 40)]  # fmt: skip
    for split in ("train", "test"):
        with DatasetWriter(str(tmp_path / "dd" / split), features, split=split, shard_bytes=2000) as writer:
            for b in batches:
                writer.write(b)
    write_splits_index(str(tmp_path / "dd"), ["train", "test"])
    dd = datasets.load_from_disk(str(tmp_path / "dd"))
    assert list(dd) == ["train", "test"] and len(os.listdir(tmp_path / "dd" / "train")) > 4  # several files
    ds = dd["train"].with_format("numpy")
    assert ds.features == features and ds.split == "train" and len(ds) == 200
    assert list(dd["train"]["id"]) == [f"r{i}" for i in range(200)] and dd["train"].features["label"].names == ["a", "b"]
    np.testing.assert_array_equal(ds[:]["x"], np.concatenate([b["x"] for b in batches]))
    np.testing.assert_array_equal(ds[:]["label"], np.concatenate([b["label"] for b in batches]))
    again = [t for t in read_batches(str(tmp_path / "dd" / "train"), batch_rows=64)]
    assert sum(t.num_rows for t in again) == 200 and again[0].column("id").to_pylist()[:2] == ["r0", "r1"]
    with DatasetWriter(str(tmp_path / "empty"), features):
        pass
    empty = datasets.load_from_disk(str(tmp_path / "empty"))
    assert len(empty) == 0 and empty.features == features
