"""Sample-quality metrics, the evaluation's networks (reference classifier, ResNet, contrastive encoder), and
python -m evaluation on real folders and priors, in every feature space."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scipy import ndimage

from common.data import FASHION_MNIST_CLASSES, DataArguments, ImageTransform, image_loader
from conftest import CLASSIFIER_ARGS, accelerate_launch, last_error_line, python_m
from evaluation import Classifier, ClassifierSpace, Evaluator, Gaussian, frechet_distance, kernel_distance, laplacian_variance, load_spaces, precision_recall

# The evaluation's other two networks, as tiny as the chain's reference classifier (CLASSIFIER_ARGS).
JUDGES = {"resnet": ["--arch", "resnet", "--shift", "2", "--flip"], "contrastive": ["--arch", "resnet", "--objective", "contrastive"]}


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    for name, extra in JUDGES.items():
        python_m("train.classifier", *CLASSIFIER_ARGS, *extra, "--output-dir", str(root / name))
    return {name: root / name for name in JUDGES}


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


def test_kid_is_unbiased_and_its_spread_covers_two_real_halves(chain, fashion):
    images = next(iter(image_loader(fashion.test.select(range(1000)), ImageTransform(channels=1), 1000, shuffle=False)))["pixel_values"]  # fmt: skip
    feats, _ = ClassifierSpace(Classifier.from_pretrained(chain["classifier"])).embed(images)
    kid, sd = kernel_distance(feats[:500], feats[500:])
    assert sd > 0 and abs(kid) < 2 * sd, (kid, sd)
    shifted, shifted_sd = kernel_distance(feats[:500], feats[500:] + feats.std(0))
    assert shifted > kid + 10 * shifted_sd
    x = torch.randn(40, 8)
    assert kernel_distance(x, x.clone(), subsets=5)[0] < 0.05 * kernel_distance(x, x + 1, subsets=5)[0]


def test_the_detail_statistic_is_scipys_laplacian_variance():
    x = torch.rand(3, 2, 20, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = [ndimage.laplace(((x[i, c].double().numpy() + 1) / 2)).var() for i in range(3) for c in range(2)]
    got = laplacian_variance(x)  # every channel of an image together
    lap = torch.from_numpy(np.stack([ndimage.laplace(((x[i, c].double().numpy() + 1) / 2)) for i in range(3) for c in range(2)])).view(3, -1)  # fmt: skip
    assert torch.allclose(got.double(), lap.var(1, correction=0), rtol=1e-5)
    assert torch.allclose(laplacian_variance(x[:, :1]).double(), torch.tensor(expected[0::2]), rtol=1e-5)


def test_the_other_networks_train_by_the_classifier_command(judges):
    resnet, contrastive = Classifier.from_pretrained(judges["resnet"]), Classifier.from_pretrained(judges["contrastive"])
    assert resnet.config.kind == "resnet" and resnet.predicts_classes
    assert contrastive.config.kind == "contrastive-resnet" and not contrastive.predicts_classes
    assert json.loads((judges["resnet"] / "metrics.json").read_text())["accuracy"] > 0.6
    positives = json.loads((judges["contrastive"] / "metrics.json").read_text())["positive_top1"]
    assert positives > 0.1, "the other view of an image among 127 candidates (chance: 0.008)"
    assert "SimCLR" in (judges["contrastive"] / "README.md").read_text()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma)))


def test_in_every_space_real_images_sit_at_the_floor_and_blur_and_noise_score_worse(chain, judges, fashion):
    spaces, clf = load_spaces(str(chain["classifier"]), [str(judges["resnet"]), str(judges["contrastive"])])
    assert [s.name for s in spaces] == ["vgg", "resnet", "contrastive-resnet"]
    evaluator = Evaluator.from_dataset(spaces, DataArguments(dataset="fashion_mnist"), classifier=clf, max_reference=2000)
    n = len(fashion.train)
    real = next(iter(image_loader(fashion.train.select(range(n - 500, n)), ImageTransform(channels=1), 500, shuffle=False)))["pixel_values"]  # fmt: skip
    noise = 0.2 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    reports = {"real": evaluator.score(real), "blurred": evaluator.score(_blur(real, 1.0)), "noisy": evaluator.score((real + noise).clamp(-1, 1))}  # fmt: skip
    for space in ("vgg", "resnet", "contrastive-resnet"):
        r, b, z = (reports[k].space(space) for k in ("real", "blurred", "noisy"))
        assert 0.4 < r.fd_ratio < 2 and abs(r.kid - r.kid_floor) < 3 * (r.kid_std + r.kid_floor_std), (space, r)
        for bad in (b, z):
            assert bad.fd_ratio > 1.5 * r.fd_ratio and bad.kid - bad.kid_std > r.kid + r.kid_std, (space, bad, r)
    assert 0.9 < reports["real"].detail < 1.1 and 0.9 < reports["real"].detail_floor < 1.1
    assert reports["blurred"].detail < 0.6 and reports["noisy"].detail > 1.5
    table = reports["blurred"].table()
    assert "| contrastive-resnet |" in table and "| detail (Laplacian variance / real) | " in table


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


def test_real_test_images_score_the_classifiers_accuracy_and_sit_on_the_reference(chain, judges, fashion, tmp_path):
    _real_test_folder(tmp_path / "real", fashion)
    out = tmp_path / "report.json"
    proc = python_m("evaluation", "--samples", str(tmp_path / "real"), "--classifier", str(chain["classifier"]),
                    "--spaces", str(judges["resnet"]), str(judges["contrastive"]), "--max-reference", "500", "--output-json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert [s["space"] for s in report["spaces"]] == ["vgg", "resnet", "contrastive-resnet"]
    for s in report["spaces"]:
        assert s["fd"] == pytest.approx(0.0, abs=1e-3) and s["fd_floor"] > 0 and s["precision"] == s["recall"] == 1.0, s
    assert report["detail"] == pytest.approx(1.0, abs=1e-6)
    accuracy = json.loads((chain["classifier"] / "metrics.json").read_text())["accuracy"]
    assert report["accuracy"] == pytest.approx(accuracy, abs=1e-9) and report["accuracy_floor"] == pytest.approx(accuracy, abs=1e-9)  # fmt: skip
    assert report["fd"] == pytest.approx(0.0, abs=1e-3), "the very images of the reference"
    assert report["precision"] == report["recall"] == 1.0
    assert report["fd_floor"] > 10 * report["fd"] and report["num_samples"] == 500
    assert "| space | FD | floor | FD / floor | KID x 1e3 |" in proc.stdout and "| contrastive-resnet | " in proc.stdout
    bad = python_m("evaluation", "--samples", str(tmp_path / "real"), "--classifier", str(judges["contrastive"]), check=False)
    assert bad.returncode == 1 and "does not predict classes" in last_error_line(bad) and "Traceback" not in bad.stderr


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
                    "--spaces", "inception", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "torch-fidelity" in last_error_line(proc)
