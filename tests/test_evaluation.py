"""Sample-quality metrics, the reference classifier stage, and python -m evaluation on real folders and priors."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common.data import FASHION_MNIST_CLASSES
from conftest import CLASSIFIER_ARGS, accelerate_launch, last_error_line, python_m
from evaluation import Classifier, Gaussian, frechet_distance, precision_recall


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(600, 16) @ torch.randn(16, 16)
    total_variance = float(torch.cov(x.double().T).trace())
    assert frechet_distance(x, x) <= 1e-9 * total_variance


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    l1, l2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    # Covariances with the same eigenvectors: tr((S1 S2)^(1/2)) = sum(sqrt(l1 * l2)).
    a, b = Gaussian(m1, q @ torch.diag(l1) @ q.T), Gaussian(m2, q @ torch.diag(l2) @ q.T)
    expected = ((m1 - m2) ** 2).sum() + ((l1.sqrt() - l2.sqrt()) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)
    # General covariances: against the eigenvalues of the (non-symmetric) product S1 S2.
    s1, s2 = (lambda r: r @ r.T)(torch.randn(6, 6, generator=g, dtype=torch.float64)), (lambda r: r @ r.T)(torch.randn(6, 6, generator=g, dtype=torch.float64))  # fmt: skip
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = ((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt
    assert frechet_distance(Gaussian(m1, s1), Gaussian(m2, s2)) == pytest.approx(float(expected), rel=1e-8)


def test_precision_and_recall_are_one_for_identical_sets_and_lower_when_shifted_or_collapsed():
    real = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    p, r = precision_recall(real, real + 1.0)
    assert p < 0.7 and r < 0.7
    p, r = precision_recall(real, 0.2 * torch.randn(500, 8, generator=torch.Generator().manual_seed(2)))
    assert p > 0.9 and r < 0.4, "a collapsed set is precise but covers little"


def test_classifier_stage_resumes_to_the_uninterrupted_weights_and_loads(chain, tmp_path):
    metrics = json.loads((chain["classifier"] / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.6, metrics  # tiny width and 120 steps; the real one reaches ~0.92
    clf = Classifier.from_pretrained(chain["classifier"])
    assert clf.config.class_names == FASHION_MNIST_CLASSES and clf.config.dataset == "fashion_mnist"
    assert "| accuracy |" in (chain["classifier"] / "README.md").read_text()
    split = tmp_path / "split"
    (split / "checkpoints").mkdir(parents=True)
    shutil.copytree(chain["classifier"] / "checkpoints" / "checkpoint-60", split / "checkpoints" / "checkpoint-60")
    accelerate_launch("train.classifier", *CLASSIFIER_ARGS, "--output-dir", str(split), "--resume-from-checkpoint", "latest")
    full, resumed = load_file(chain["classifier"] / "model.safetensors"), load_file(split / "model.safetensors")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def _real_test_folder(root, fashion, n=500):
    """The first n real test images in the layout python -m sample writes."""
    rows = []
    for i, row in enumerate(fashion.test.select(range(n))):
        name = FASHION_MNIST_CLASSES[row["label"]]
        rel = f"{name.replace('/', '-')}/{i}.png"
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_bytes(row["image"]["bytes"])
        rows.append({"file_name": rel, "label": name})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_real_test_images_score_the_classifiers_accuracy_and_sit_on_the_reference(chain, fashion, tmp_path):
    _real_test_folder(tmp_path / "real", fashion)
    out = tmp_path / "report.json"
    proc = python_m("evaluation", "--samples", str(tmp_path / "real"), "--classifier", str(chain["classifier"]),
                    "--max-reference", "500", "--output-json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    accuracy = json.loads((chain["classifier"] / "metrics.json").read_text())["accuracy"]
    assert report["accuracy"] == pytest.approx(accuracy, abs=1e-9) and report["accuracy_floor"] == pytest.approx(accuracy, abs=1e-9)  # fmt: skip
    assert report["fd"] == pytest.approx(0.0, abs=1e-3), "the very images of the reference"
    assert report["precision"] == report["recall"] == 1.0
    assert report["fd_floor"] > 10 * report["fd"] and report["num_samples"] == 500
    assert "Fréchet distance" in proc.stdout and "real-data floor" in proc.stdout


def test_evaluation_of_a_sample_folder_and_of_the_prior_directly(chain, tmp_path):
    python_m("sample", "--prior", str(chain["prior"]), "--per-class", "10", "--seed", "3", "--output-dir", str(tmp_path / "s"))
    common = ["--classifier", str(chain["classifier"]), "--max-reference", "500"]
    python_m("evaluation", "--samples", str(tmp_path / "s"), *common, "--output-json", str(tmp_path / "folder.json"))
    proc = python_m("evaluation", "--prior", str(chain["prior"]), "--per-class", "10", "--seed", "3", *common,
                    "--output-json", str(tmp_path / "prior.json"))  # fmt: skip
    assert "sampling at guidance_scale 2.0, temperature 1.0, top_k 100, top_p 1.0" in proc.stdout, "the prior's own"
    folder, direct = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("folder", "prior"))
    assert folder["num_samples"] == direct["num_samples"] == 100
    assert folder["fd_floor"] == direct["fd_floor"], "the same floor for the same number of images"
    # The same samples, once through 8-bit PNGs: the same figures up to that rounding.
    assert folder["fd"] == pytest.approx(direct["fd"], rel=0.02) and folder["accuracy"] == pytest.approx(direct["accuracy"], abs=0.02)  # fmt: skip
    assert folder["fd"] > folder["fd_floor"] > 0


def test_inception_features_without_their_package_fail_in_one_line(chain):
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed; this checks the message for users without it")
    except ImportError:
        pass
    proc = python_m("evaluation", "--samples", str(chain["root"]), "--classifier", str(chain["classifier"]),
                    "--features", "inception", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "torch-fidelity" in last_error_line(proc)
