"""The tokenizer training entry point on real Fashion-MNIST with the tiny preset."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, python_m
from tokenizer import VQVAE

ARGS = ["--preset", "tiny", "--max-train-samples", "640", "--max-eval-samples", "128", "--train-batch-size", "32",
        "--max-train-steps", "40", "--checkpointing-steps", "10", "--checkpoints-total-limit", "2",
        "--eval-steps", "20", "--logging-steps", "5", "--learning-rate", "1e-3", "--lr-warmup-steps", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "run"
    proc = accelerate_launch("train.tokenizer", *ARGS, "--output-dir", str(out))
    return out, proc


def test_run_writes_rotated_checkpoints_images_and_a_loadable_model(reference_run):
    out, proc = reference_run
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-30", "checkpoint-40"]  # limit 2 of 4
    state = json.loads((out / "checkpoints" / "checkpoint-40" / "trainer_state.json").read_text())
    assert state["step"] == 40
    assert sorted(os.listdir(out / "images")) == ["tokenizer-0000020.png", "tokenizer-0000040.png"]
    model = VQVAE.from_pretrained(out)
    assert model.config.num_codes == 64
    card = (out / "README.md").read_text()
    assert "fashion_mnist" in card and "| psnr |" in card and "| codebook_usage |" in card
    assert "tokenizer saved to" in proc.stdout


def test_grid_shows_originals_above_reconstructions(reference_run):
    from PIL import Image

    out, _ = reference_run
    grid = Image.open(out / "images" / "tokenizer-0000040.png")
    assert grid.size == (16 * 30, 2 * 30)  # 16 test images, 28 px + 2 px gutter, two rows


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_killed_run_resumed_from_latest_matches_uninterrupted(reference_run, tmp_path):
    out, _ = reference_run
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.tokenizer", *ARGS, "--output-dir", str(killed)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-10").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run was killed before it finished"
    python_m("train.tokenizer", *ARGS, "--output-dir", str(killed), "--resume-from-checkpoint", "latest")
    ref, resumed = _weights(out), _weights(killed)
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.allclose(ref[k], resumed[k], atol=1e-6), k


def test_report_to_wandb_offline_writes_a_run(tmp_path):
    out = tmp_path / "wb"
    python_m("train.tokenizer", "--preset", "tiny", "--max-train-samples", "128", "--max-eval-samples", "32",
             "--train-batch-size", "16", "--max-train-steps", "4", "--logging-steps", "2", "--eval-steps", "4",
             "--report-to", "wandb", "--output-dir", str(out), WANDB_MODE="offline")  # fmt: skip
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / runs[0]))


def test_report_to_tensorboard_writes_events(tmp_path):
    out = tmp_path / "tb"
    python_m("train.tokenizer", "--preset", "tiny", "--max-train-samples", "128", "--max-eval-samples", "32",
             "--train-batch-size", "16", "--max-train-steps", "4", "--logging-steps", "2", "--eval-steps", "4",
             "--report-to", "tensorboard", "--output-dir", str(out))  # fmt: skip
    events = [f for _, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events.out.tfevents")]
    assert events


def test_bf16_mixed_precision_trains_and_keeps_a_float32_codebook(tmp_path):
    out = tmp_path / "bf16"
    python_m("train.tokenizer", "--preset", "tiny", "--max-train-samples", "256", "--max-eval-samples", "64",
             "--train-batch-size", "32", "--max-train-steps", "6", "--eval-steps", "6",
             "--mixed-precision", "bf16", "--output-dir", str(out))  # fmt: skip
    weights = _weights(out)
    assert weights["quantizer.codebook"].dtype == torch.float32 and torch.isfinite(weights["quantizer.codebook"]).all()
    assert json.loads((out / "metrics.json").read_text())["psnr"] > 0


def test_finer_code_grid_runs_through_the_chain(tmp_path):
    """--num-downsamples 1: 14x14 codes of 28 px images, encoded, modelled by a prior and sampled back."""
    from sample import ClassConditionalPipeline

    tok, codes, prior = (tmp_path / k for k in ("tok", "codes", "prior"))
    limits = ["--max-train-samples", "256", "--max-eval-samples", "64"]
    python_m("train.tokenizer", "--preset", "tiny", "--num-downsamples", "1", *limits, "--train-batch-size", "32",
             "--max-train-steps", "4", "--eval-steps", "4", "--output-dir", str(tok))  # fmt: skip
    model = VQVAE.from_pretrained(str(tok))
    assert model.config.num_downsamples == 1 and model.encode(torch.zeros(2, 1, 28, 28)).shape == (2, 14, 14)
    python_m("train.encode", "--tokenizer", str(tok), *limits, "--output-dir", str(codes))
    assert json.loads((codes / "vqgpt_codes.json").read_text())["grid"] == [14, 14]
    python_m("train.prior", "--codes", str(codes), "--preset", "tiny", "--train-batch-size", "16", "--max-train-steps", "3",
             "--eval-steps", "3", "--samples-per-class", "1", "--output-dir", str(prior))  # fmt: skip
    images = ClassConditionalPipeline.from_pretrained(str(prior))([0, 3], seed=0)
    assert images.shape == (2, 1, 28, 28)


def test_mixed_precision_auto_follows_the_hardware():
    """auto: bf16 only where it makes the stage faster (AMX for the tokenizer on a CPU); an explicit choice stays."""
    from train.loop import resolve_precision

    stages = ("tokenizer", "prior", "classifier")
    assert [resolve_precision("auto", s, flags={"avx2", "fma"})[0] for s in stages] == ["no"] * 3
    amx = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert [resolve_precision("auto", s, flags=amx)[0] for s in stages] == ["bf16", "no", "no"]
    assert "AMX" in resolve_precision("auto", "tokenizer", flags=amx)[1]
    assert resolve_precision("bf16", "prior") == ("bf16", "asked for") and resolve_precision("no", "tokenizer", flags=amx)[0] == "no"
    assert resolve_precision("auto", "prior", gpu_bf16=True)[0] == "bf16" and resolve_precision("auto", "prior", gpu_bf16=False)[0] == "no"


def test_evaluation_scores_reconstructions_in_every_space(chain, tmp_path):
    """--classifier and --eval-spaces: the reconstructions of the test split in each space, with the detail
    ratio and class accuracy, in metrics.json (a second copy of the classifier: the same figures)."""
    clf = str(chain["classifier"])
    python_m("train.tokenizer", *ARGS[:8], "--max-train-steps", "4", "--eval-steps", "4", "--checkpointing-steps", "100",
             "--classifier", clf, "--eval-spaces", clf, "--output-dir", str(tmp_path / "run"))  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"recon_fd", "recon_kid_vgg", "recon_detail", "recon_class_accuracy", "recon_worst_fd_ratio"} <= set(metrics), metrics
    assert metrics["recon_fd_ratio_vgg-2"] == pytest.approx(metrics["recon_fd_ratio_vgg"]) and 0 < metrics["recon_detail"] < 2
