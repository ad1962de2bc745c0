"""Anomaly scores: AUROC and thresholds against hand-computed cases, and a class held out of training
scoring higher than the training class, through the real command lines."""

import csv
import itertools
import json

import numpy as np
import pytest

import torch

from anomaly import SCORES, AnomalyScorer, auroc, threshold_at_fpr
from common.cli import UserError
from common.data import DataArguments, load_image_data, load_tensors
from conftest import python_m


def _pairwise_auroc(scores, anomalous):
    """The definition: P(anomalous score > normal score) + half of P(equal), over all pairs."""
    pos, neg = scores[anomalous], scores[~anomalous]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_case_and_definition():
    # scikit-learn's roc_auc_score documentation example: 0.75.
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # a tie counts half
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    anomalous = rng.random(200) < 0.3
    assert auroc(scores, anomalous) == pytest.approx(_pairwise_auroc(scores, anomalous))
    with pytest.raises(UserError, match="needs normal and anomalous"):
        auroc(scores, np.zeros(200, dtype=bool))


def test_threshold_at_fpr():
    scores = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 5.5, 9.5, 11], dtype=float)
    anomalous = np.array([0] * 10 + [1] * 3, dtype=bool)
    threshold, tpr, fpr = threshold_at_fpr(scores, anomalous, 0.1)  # one normal image of ten may be flagged
    assert (threshold, tpr, fpr) == (9.0, pytest.approx(2 / 3), pytest.approx(0.1))
    threshold, tpr, fpr = threshold_at_fpr(scores, anomalous, 0.0)
    assert (threshold, tpr, fpr) == (10.0, pytest.approx(1 / 3), 0.0)


def test_held_out_class_scores_higher(tmp_path):
    """A tokenizer and a prior trained on trousers only; sneakers and bags in the test split score higher."""
    tok, codes, prior, out = (tmp_path / k for k in ("tok", "codes", "prior", "scores"))
    only = ["--only-classes", "Trouser", "--max-train-samples", "12000", "--max-eval-samples", "1500"]
    python_m("train.tokenizer", "--preset", "tiny", *only, "--train-batch-size", "64", "--max-train-steps", "120",
             "--learning-rate", "2e-3", "--lr-warmup-steps", "10", "--eval-steps", "120", "--output-dir", str(tok))  # fmt: skip
    python_m("train.encode", "--tokenizer", str(tok), *only, "--output-dir", str(codes))
    python_m("train.prior", "--codes", str(codes), "--preset", "tiny", "--train-batch-size", "64", "--max-train-steps", "120",
             "--learning-rate", "3e-3", "--lr-warmup-steps", "10", "--eval-steps", "120", "--samples-per-class", "1",
             "--output-dir", str(prior))  # fmt: skip
    proc = python_m("anomaly", "--prior", str(prior), "--dataset", "fashion_mnist", "--max-eval-samples", "1500",
                    "--normal-classes", "Trouser", "--reference", "train", "--max-train-samples", "12000",
                    "--output-dir", str(out))  # fmt: skip
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 1500 and (out / "histogram.png").stat().st_size > 0
    for score in SCORES:
        normal = np.mean([float(r[score]) for r in rows if r["label"] == "Trouser"])
        for held_out in ("Sneaker", "Bag"):
            assert np.mean([float(r[score]) for r in rows if r["label"] == held_out]) > normal, (score, held_out)
    summary = json.load(open(out / "summary.json"))
    assert summary["combined"]["auroc"] > 0.8 and summary["knn"]["auroc"] > 0.8, summary
    trousers = sum(r["label"] == "Trouser" for r in rows)
    assert summary["reference_images"] > 1000 and 0 < trousers < 1500  # the training trousers only
    assert "AUROC" in proc.stdout

    # The same scores from folders: <class>/ folders of test images, and a folder of training trousers.
    data = load_image_data(DataArguments(max_train_samples=12000))
    folders, reference = tmp_path / "folders", tmp_path / "reference"
    for root, split, classes in ((folders, data.test, ("Trouser", "Sneaker", "Bag")), (reference, data.train, ("Trouser",))):
        for name in classes:
            (root / name).mkdir(parents=True)
            rows_of = split.filter(lambda label: label == data.class_names.index(name), input_columns="label").select(range(40))
            for i, value in enumerate(rows_of["image"]):
                (root / name / f"{i:02d}.png").write_bytes(value["bytes"])
    python_m("anomaly", "--prior", str(prior), "--input", str(folders), "--normal-classes", "Trouser",
             "--reference", str(reference), "--output-dir", str(tmp_path / "from-folders"))  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "from-folders" / "scores.csv")))
    assert [(r["id"], r["label"]) for r in rows] == [(f"{c}/{i:02d}.png", c) for c in ("Bag", "Sneaker", "Trouser") for i in range(40)]
    summary = json.load(open(tmp_path / "from-folders" / "summary.json"))
    assert summary["normal_classes"] == ["Trouser"] and summary["reference_images"] == 40
    assert summary["combined"]["auroc"] > 0.8 and summary["knn"]["auroc"] > 0.8, summary

    # knn against its definition: distances from encoder latents, brute force, on test images.
    scorer = AnomalyScorer.from_pretrained(str(prior))
    data = load_image_data(DataArguments(max_train_samples=2000, max_eval_samples=40))
    reference, _ = load_tensors(data.train, 1)
    images, _ = load_tensors(data.test, 1)
    got = scorer.fit(reference, k=3).score(images)["knn"]
    with torch.inference_mode():
        z_ref, z = (scorer.tokenizer.encoder(x).flatten(1).double() for x in (reference, images))
    d = ((z[:, None, :] - z_ref[None, :, :]) ** 2).sum(-1).sqrt()
    np.testing.assert_allclose(got, d.sort(1).values[:, :3].mean(1).numpy(), rtol=1e-4)
    itself = scorer.fit(images, k=1).score(images)["knn"]  # an image of the reference: at zero, up to cdist's matmul rounding
    assert itself.max() < 0.01 * got.min(), (itself.max(), got.min())
    with pytest.raises(UserError, match="k=41"):
        scorer.fit(images, k=41)


def test_knn_distance_is_the_brute_force_mean_of_the_k_nearest():
    import torch

    from anomaly import knn_distance

    g = torch.Generator().manual_seed(0)
    reference, queries = torch.randn(300, 20, generator=g), torch.randn(40, 20, generator=g)
    expected = torch.cdist(queries.double(), reference.double()).topk(5, dim=1, largest=False).values.mean(1)
    assert torch.allclose(knn_distance(queries, reference, 5).double(), expected, atol=1e-5)


def test_threshold_matches_the_rule_it_states_with_ties():
    """Flagging score > threshold keeps at most fpr of the normal images; the threshold is the highest
    normal score left unflagged; TPR and FPR are those of that rule (ties at the threshold stay unflagged)."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=400), 1)  # many ties
    anomalous = rng.random(400) < 0.3
    scores[anomalous] += 1
    for target in (0.0, 0.01, 0.05, 0.1, 0.5, 1.0):
        threshold, tpr, fpr = threshold_at_fpr(scores, anomalous, target)
        flagged = scores > threshold
        assert fpr == flagged[~anomalous].mean() <= target and tpr == flagged[anomalous].mean()
        normal = np.sort(scores[~anomalous])
        k = int(np.floor(target * len(normal)))
        assert threshold == (normal[len(normal) - k - 1] if k < len(normal) else -np.inf)
