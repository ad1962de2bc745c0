"""Bad input: one clear line on stderr, a non-zero exit, and nothing good damaged."""

import hashlib
import os
import shutil

import pytest
import torch

from conftest import last_error_line, python_m
from tokenizer import VQVAE, get_config
from common.data import FASHION_MNIST_CLASSES

TINY = ["--preset", "tiny", "--max-train-samples", "256", "--max-eval-samples", "64", "--train-batch-size", "16",
        "--logging-steps", "2"]  # fmt: skip


def _fails(proc, *needles):
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = last_error_line(proc)
    assert line.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in line, line
    return line


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_wrong_channel_count_is_one_clear_line():
    model = VQVAE(get_config("tiny")).eval()
    with pytest.raises(ValueError) as e:
        model.encode(torch.zeros(2, 3, 28, 28))
    assert str(e.value) == "images have shape (2, 3, 28, 28); expected (B, 1, H, W) with 1 channel(s)"


def test_size_not_divisible_by_f_api_and_cli(tmp_path):
    model = VQVAE(get_config("tiny")).eval()
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by the downsampling factor f=4"):
        model(torch.zeros(1, 1, 30, 30))
    proc = python_m("train.tokenizer", *TINY, "--resolution", "30", "--output-dir", str(tmp_path / "r"), check=False)
    _fails(proc, "30x30", "f=4")


def test_corrupt_image_file_names_the_file(tmp_path, fashion):
    root = tmp_path / "folder"
    for i, row in enumerate(fashion.test.select(range(40))):
        d = root / FASHION_MNIST_CLASSES[row["label"]]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(row["image"]["bytes"])
    bad = root / "Bag" / "zz-broken.png"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    proc = python_m("train.tokenizer", "--preset", "tiny", "--dataset", str(root), "--train-batch-size", "8",
                    "--test-fraction", "0.5", "--max-train-steps", "20", "--output-dir", str(tmp_path / "r"), check=False)  # fmt: skip
    _fails(proc, "cannot read image", "zz-broken.png")


def test_missing_and_corrupt_checkpoints(tmp_path):
    out = tmp_path / "r"
    proc = python_m("train.tokenizer", *TINY, "--output-dir", str(out), "--resume-from-checkpoint", str(tmp_path / "nope"), check=False)  # fmt: skip
    _fails(proc, "checkpoint", "nope", "does not exist")
    python_m("train.tokenizer", *TINY, "--max-train-steps", "4", "--checkpointing-steps", "2", "--output-dir", str(out))
    ckpt = out / "checkpoints" / "checkpoint-4"
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    proc = python_m("train.tokenizer", *TINY, "--max-train-steps", "6", "--output-dir", str(out),
                    "--resume-from-checkpoint", str(broken), check=False)  # fmt: skip
    _fails(proc, "broken", "corrupt")


def test_nan_loss_stops_without_damaging_earlier_results(tmp_path):
    out = tmp_path / "r"
    python_m("train.tokenizer", *TINY, "--max-train-steps", "4", "--checkpointing-steps", "2", "--output-dir", str(out))
    before = _digest(out / "checkpoints"), (out / "model.safetensors").read_bytes()
    proc = python_m("train.tokenizer", *TINY, "--max-train-steps", "20", "--checkpointing-steps", "100",
                    "--learning-rate", "1e30", "--lr-warmup-steps", "0", "--max-grad-norm", "0",
                    "--output-dir", str(out), check=False)  # fmt: skip
    _fails(proc, "loss is not finite at step")
    assert (_digest(out / "checkpoints"), (out / "model.safetensors").read_bytes()) == before
    VQVAE.from_pretrained(out)
