"""Features from a tokenizer (features/): what is extracted, the bag of codes, the protocols' measures, the
index against brute force, and the command lines on the test chain's tokenizer."""

import csv
import json

import datasets
import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfTransformer
import torch
from PIL import Image

from conftest import python_m
from features import (CodeBag, FeatureExtractor, FeatureIndex, balanced_draw, cluster_accuracy, clustering, code_counts, features,
                      few_labels, linear_probe, precision_at_k)  # fmt: skip
from tokenizer import VQVAE, get_config


@pytest.mark.parametrize("levels", [1, 2])
def test_features_are_the_tokenizers_outputs(fashion_batch, levels):
    torch.manual_seed(0)
    kind = {"quantizer": "residual", "levels": 2} if levels == 2 else {}
    tok = VQVAE(get_config("tiny", **kind)).eval()
    x = fashion_batch[0][:13]
    extractor = FeatureExtractor(tok, pyramid=True)
    got = extractor.extract(x, batch_size=5)  # batches that do not divide the images
    with torch.inference_mode():
        z, codes = tok.encoder(x), tok.encode(x)
        expected = {"encoder": z.flatten(1), "encoder_pooled": z.mean((2, 3)), "quantized": tok.latent(codes).flatten(1)}
        if levels == 2:
            first = tok.quantizer.level(0).lookup(codes[:, :49].view(-1, 7, 7))
            expected["quantized_1"] = first.flatten(1)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value.numpy(), atol=1e-5, err_msg=name)
    k = tok.config.num_codes
    shapes = extractor.shapes(28, 28)
    assert shapes["encoder"] == (16 * 49,) and shapes["encoder_pooled"] == (16,) and shapes["codes"] == (levels * 5 * k,)
    assert ("quantized_1" in shapes) == (levels == 2) and set(shapes) == set(got) - {"counts"} | {"codes"}
    assert got["counts"].shape == (13, levels * 5 * k)


def test_bag_of_codes_counts_every_position_of_every_region():
    g = torch.Generator().manual_seed(0)
    grids = [torch.randint(0, 12, (6, 7, 7), generator=g), torch.randint(0, 12, (6, 7, 7), generator=g)]
    counts = code_counts(grids, 12, pyramid=True).view(6, 2, 5, 12)
    # each level's whole grid sums to its 49 positions; quadrants split 7 as 4 + 3: 16, 12, 12, 9
    assert counts.sum(-1).tolist() == [[[49, 16, 12, 12, 9]] * 2] * 6
    for level, grid in enumerate(grids):
        for i in range(6):
            assert counts[i, level, 0].tolist() == np.bincount(grid[i].ravel(), minlength=12).tolist()
            assert counts[i, level, 4].tolist() == np.bincount(grid[i, 4:, 4:].ravel(), minlength=12).tolist()
    plain = code_counts(grids, 12)
    assert torch.equal(plain.view(6, 2, 12), counts[:, :, 0])


def test_tfidf_weights_and_unit_rows():
    counts = np.array([[3, 0, 1, 0], [0, 2, 2, 0], [1, 1, 0, 2]], dtype=np.float32)
    bag = CodeBag().fit(counts)
    df = (counts > 0).sum(0)
    assert np.allclose(bag.idf, np.log((1 + 3) / (1 + df)) + 1)
    assert np.allclose(bag.idf, TfidfTransformer().fit(counts).idf_)  # scikit-learn's IDF
    assert np.allclose(CodeBag().update(counts[:2]).update(counts[2:]).idf, bag.idf)  # batch by batch: the same
    rows = bag.transform(counts)
    expected = counts * bag.idf
    assert np.allclose(rows, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    assert np.allclose(CodeBag(bag.idf.tolist()).transform(counts), rows)  # the IDF kept with an index gives the same rows
    with pytest.raises(ValueError, match="width 3"):
        bag.transform(counts[:, :3])
    named = features({"encoder": np.zeros((3, 2)), "counts": counts}, bag)
    assert set(named) == {"encoder", "codes"}


def test_cluster_accuracy_hand_case_and_protocol():
    labels = np.array([0, 0, 1, 1, 2, 2])
    clusters = np.array([1, 1, 0, 2, 2, 2])  # best matching: 1->0, 0->1, 2->2: 5 of 6 right
    assert cluster_accuracy(labels, clusters) == pytest.approx(5 / 6)
    assert cluster_accuracy(labels, np.array([2, 2, 0, 0, 1, 1])) == 1.0  # any renaming of the clusters
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 20
    x = np.concatenate([rng.normal(c, 1, (50, 3)) for c in centres])
    y = np.repeat(np.arange(3), 50)
    got = clustering(x, y, k=3, n_init=2, seeds=range(2))
    assert got["accuracy"] == {"mean": 1.0, "std": 0.0, "runs": 2} and got["nmi"]["mean"] == pytest.approx(1.0)
    assert got["ari"]["mean"] == pytest.approx(1.0)


def test_n2d_finds_clusters_that_kmeans_cannot():
    """N2D's recipe (PCA-50, UMAP, Gaussian mixture) on two interleaved rings in 60 dimensions: k-means cuts
    the rings across, the neighbour graph follows them."""
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 600)
    radius = np.repeat([1.0, 3.0], 300)
    plane = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1) + rng.normal(0, 0.08, (600, 2))
    x = np.concatenate([plane, rng.normal(0, 0.01, (600, 58))], 1) @ np.linalg.qr(rng.normal(size=(60, 60)))[0]
    y = np.repeat([0, 1], 300)
    n2d = clustering(x, y, k=2, seeds=range(1), method="n2d")
    kmeans = clustering(x, y, k=2, n_init=4, seeds=range(1))
    assert n2d["accuracy"]["mean"] > 0.95 and kmeans["accuracy"]["mean"] < 0.75, (n2d, kmeans)
    with pytest.raises(ValueError, match="clustering method 'dbscan'"):
        clustering(x, y, k=2, method="dbscan")


def test_probe_and_few_label_protocols():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(4), 100))
    x = rng.normal(0, 1, (400, 6)) + np.eye(4, 6)[y] * 4
    rows = balanced_draw(y, 10, seed=3)
    assert len(rows) == 40 and np.bincount(y[rows]).tolist() == [10] * 4 and len(set(rows)) == 40
    assert not np.array_equal(rows, balanced_draw(y, 10, seed=4))
    probe = linear_probe(x[:300], y[:300], x[300:], y[300:], cs=(1e-3, 1.0), held_out=100)
    assert probe["c"] in (1e-3, 1.0) and probe["held_out_accuracy"][probe["c"]] == max(probe["held_out_accuracy"].values())
    assert probe["accuracy"] > 0.9
    few = few_labels(x, y, x, y, per_class=5, seeds=range(3))
    assert set(few) == {"logistic", "knn1", "knn10"} and all(v["runs"] == 3 and v["mean"] > 0.8 for v in few.values())
    assert precision_at_k(np.array([[0, 0, 1], [2, 2, 2]]), np.array([0, 2])) == pytest.approx(5 / 6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_index_returns_the_brute_force_neighbours(tmp_path, metric):
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    if metric == "cosine":
        b, q = base / np.linalg.norm(base, axis=1, keepdims=True), queries / np.linalg.norm(queries, axis=1, keepdims=True)
    else:
        b, q = base, queries
    true = np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1))
    order = np.argsort(true, axis=1)[:, :5]
    exact = FeatureIndex(16, metric, exact=True, meta={"ids": list(range(500))}).add(base)
    d, rows = exact.search(queries, 5)
    assert np.array_equal(rows, order) and np.allclose(d, np.take_along_axis(true, order, 1), atol=1e-4)
    exact.save(str(tmp_path / "exact"))
    loaded = FeatureIndex.load(str(tmp_path / "exact"))
    assert loaded.meta == {"ids": list(range(500))} and np.array_equal(loaded.search(queries, 5)[1], rows)
    approx = FeatureIndex(16, metric).add(base)  # the HNSW graph: on a set this small it finds the same neighbours
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx.search(queries, 5)[1], order)])
    assert recall >= 0.99, recall
    for k in (0, 501):
        with pytest.raises(ValueError, match=f"-k {k}: expected between 1 and the 500"):
            exact.search(queries, k)


def test_command_lines(chain, fashion, tmp_path):
    tok = str(chain["tokenizer"])
    python_m("features", "extract", "--tokenizer", tok, "--max-train-samples", "64", "--pyramid", "--output-dir", str(tmp_path / "feats"))  # fmt: skip
    ds = datasets.load_from_disk(str(tmp_path / "feats"))
    meta = json.loads((tmp_path / "feats" / "features.json").read_text())
    assert len(ds) == 64 and ds["image_id"][:2] == ["train/0", "train/1"] and ds["label"][:3] == fashion.train["label"][:3]
    assert meta["features"]["codes"]["shape"] == [5 * 64] and meta["features"]["encoder"]["shape"] == [16 * 49]
    from common.data import load_tensors

    images, _ = load_tensors(fashion.train.select(range(64)), 1)
    expected = FeatureExtractor(VQVAE.from_pretrained(tok), pyramid=True).extract(images)
    stored = ds.with_format("numpy")
    np.testing.assert_allclose(stored["encoder"], expected["encoder"], atol=1e-5)
    assert np.allclose(np.linalg.norm(stored["codes"], axis=1), 1, atol=1e-5)
    bag = CodeBag().fit(expected["counts"])  # the IDF of every image, though written batch by batch
    np.testing.assert_allclose(meta["idf"], bag.idf, rtol=1e-6)
    np.testing.assert_allclose(stored["codes"], bag.transform(expected["counts"]), atol=1e-6)

    # Clusters of the extracted features: the csv's labels and clusters give the summary's scores.
    for method in ("kmeans",):  # n2d: test_n2d_finds_clusters_that_kmeans_cannot (the command calls the same function)
        out = python_m("features", "cluster", "--features", str(tmp_path / "feats"), "--feature", "encoder", "--method", method, "--k", "4",
                       "--output-dir", str(tmp_path / f"clusters-{method}")).stdout  # fmt: skip
        summary = json.loads((tmp_path / f"clusters-{method}" / "summary.json").read_text())
        table = list(csv.DictReader(open(tmp_path / f"clusters-{method}" / "clusters.csv")))
        names = [fashion.class_names[y] for y in ds["label"]]
        assert [r["label"] for r in table] == names and len({r["cluster"] for r in table}) == 4
        assert summary["accuracy"] == pytest.approx(cluster_accuracy(np.array(ds["label"]), np.array([int(r["cluster"]) for r in table])))
        assert f"accuracy {summary['accuracy']:.4f}" in out

    # An index of a folder (<class>/ subfolders), and a query that is one of its images.
    folder = tmp_path / "shop"
    for i in range(30):
        row = fashion.test[i]
        name = fashion.class_names[row["label"]].replace("/", "-")  # "T-shirt/top" as a folder name
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.open(__import__("io").BytesIO(row["image"]["bytes"])).save(folder / name / f"{i:02d}.png")
    out = python_m("features", "index", "--tokenizer", tok, "--input", str(folder), "--exact", "--output-dir", str(tmp_path / "index")).stdout
    assert "30 images" in out and "exact index of encoder" in out
    query = next(folder.glob("Trouser/*.png"))
    out = python_m("features", "search", "--index", str(tmp_path / "index"), "--input", str(query), "-k", "4",
                   "--output-dir", str(tmp_path / "search")).stdout  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "search" / "neighbours.csv")))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["image_id"] == f"Trouser/{query.name}" and float(rows[0]["distance"]) < 1e-3 and rows[0]["label"] == "Trouser"
    assert all(float(a["distance"]) <= float(b["distance"]) for a, b in zip(rows, rows[1:]))
    sheet = Image.open(tmp_path / "search" / "contact_sheet.png")
    assert sheet.width > 4 * sheet.height  # one row: the query and four neighbours
    assert f"Trouser/{query.name}" in out

    # An index of a dataset split: the contact sheet reads the neighbours back from the dataset.
    python_m("features", "index", "--tokenizer", tok, "--max-train-samples", "100", "--feature", "codes", "--pyramid",
             "--output-dir", str(tmp_path / "index-ds"))  # fmt: skip
    python_m("features", "search", "--index", str(tmp_path / "index-ds"), "--input", str(folder), "-k", "3",
             "--sheet-rows", "2", "--output-dir", str(tmp_path / "search-ds"))  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "search-ds" / "neighbours.csv")))
    assert len(rows) == 90 and all(r["image_id"].startswith("train/") and int(r["image_id"][6:]) < 100 for r in rows)
    assert Image.open(tmp_path / "search-ds" / "contact_sheet.png").height > 1.5 * sheet.height  # two queries shown of 30
