"""The VQGAN options of train.tokenizer: GAN losses and taming's adaptive weight by hand, the discriminator's
start, its checkpointing and resume, two processes, and the LPIPS option without its weights."""

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, last_error_line, python_m
from tokenizer.losses import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss

ARGS = ["--preset", "tiny", "--max-train-samples", "512", "--max-eval-samples", "64", "--train-batch-size", "16",
        "--disc-weight", "0.5", "--disc-start", "4", "--adaptive-disc-weight", "--pixel-loss", "l1",
        "--checkpointing-steps", "4", "--checkpoints-total-limit", "5", "--eval-steps", "100", "--logging-steps", "2",
        "--lr-warmup-steps", "2", "--learning-rate", "1e-3"]  # fmt: skip


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: real terms relu(1 - r) = (0, 0.5), fake terms relu(1 + f) = (0, 1.5)
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    assert discriminator_loss("non-saturating", real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert generator_loss("hinge", fake).item() == pytest.approx(0.75)
    assert generator_loss("non-saturating", fake).item() == pytest.approx((sp(2.0) + sp(-0.5)) / 2, rel=1e-6)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)  # the "last layer"
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    nll = (w * a).sum()  # gradient a, norm 5
    g = 0.25 * (w * b).sum() ** 2  # gradient 0.5 (w.b) b = (0, 1, 0), norm 1
    assert adaptive_weight(nll, g, w).item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert adaptive_weight(nll, 1e-12 * (w * b).sum(), w, limit=1e4).item() == 1e4, "clamped"


def test_patch_discriminator_gives_a_logit_per_patch():
    d = PatchDiscriminator(1, channels=8, layers=2)
    assert d(torch.zeros(3, 1, 28, 28)).shape == (3, 1, 5, 5)
    assert PatchDiscriminator(3, channels=8, layers=3)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def _disc(folder):
    return load_file(folder / "model_1.safetensors")


def test_discriminator_starts_on_time_and_resumes_exactly(tmp_path):
    python_m("train.tokenizer", *ARGS, "--max-train-steps", "12", "--output-dir", str(tmp_path / "full"))
    ckpt = tmp_path / "full" / "checkpoints"
    d4, d8 = _disc(ckpt / "checkpoint-4"), _disc(ckpt / "checkpoint-8")
    # A run whose discriminator never starts keeps its initial weights: the reference for "untrained".
    python_m("train.tokenizer", *ARGS, "--max-train-steps", "4", "--disc-start", "100", "--output-dir", str(tmp_path / "never"))
    d0 = _disc(tmp_path / "never" / "checkpoints" / "checkpoint-4")
    assert all(torch.equal(d0[k], d4[k]) for k in d4), "the discriminator must not train before --disc-start"
    assert any(not torch.equal(d4[k], d8[k]) for k in d4), "the discriminator trains from --disc-start on"
    # Stopped at step 8 (the discriminator active since step 4), then resumed to 12: the same two networks.
    python_m("train.tokenizer", *ARGS, "--max-train-steps", "8", "--output-dir", str(tmp_path / "split"))
    python_m("train.tokenizer", *ARGS, "--max-train-steps", "12", "--output-dir", str(tmp_path / "split"),
             "--resume-from-checkpoint", "latest")  # fmt: skip
    for name in ("model.safetensors", "model_1.safetensors"):
        full, split = load_file(ckpt / "checkpoint-12" / name), load_file(tmp_path / "split" / "checkpoints" / "checkpoint-12" / name)
        for k in full:
            assert torch.equal(full[k], split[k]), (name, k)


def test_two_processes_end_with_identical_discriminators(tmp_path):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    accelerate_launch("tests/scripts/tokenizer_ranks.py", *ARGS, "--max-train-steps", "8", "--codebook-dim", "4",
                      "--l2-codes", "--output-dir", str(tmp_path / "run"), num_processes=2, RANKS_DIR=ranks)  # fmt: skip
    r0, r1 = torch.load(ranks / "rank0.pt"), torch.load(ranks / "rank1.pt")
    assert any(k.startswith("discriminator.") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_perceptual_loss_without_lpips_or_its_weights_is_one_line(tmp_path):
    proc = python_m("train.tokenizer", *ARGS, "--max-train-steps", "2", "--perceptual-weight", "1",
                    "--output-dir", str(tmp_path / "p"), check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "lpips" in last_error_line(proc).lower()
    assert not (tmp_path / "p" / "model.safetensors").exists()
