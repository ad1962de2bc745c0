"""--streaming: a local dataset read as a datasets.IterableDataset, split per process, resumed exactly."""

import json

import datasets
import pytest
import torch

from common.data import ImageTransform, TrainingDataArguments, load_image_data, stream_loader
from conftest import accelerate_launch, resumed_and_uninterrupted


@pytest.fixture(scope="module")
def train_only(tmp_path_factory, fashion):
    """300 real Fashion-MNIST images saved with save_to_disk, with no test split (held out by count)."""
    root = tmp_path_factory.mktemp("stream") / "saved"
    datasets.DatasetDict({"train": fashion.train.select(range(300))}).save_to_disk(str(root))
    return root


def test_stream_holds_out_an_evaluation_set_by_count(train_only):
    data = load_image_data(TrainingDataArguments(dataset=str(train_only), streaming=True, max_eval_samples=40))
    assert isinstance(data.train, datasets.IterableDataset) and isinstance(data.test, datasets.Dataset)
    assert len(data.test) == 40 and data.channels == 1 and data.size == (28, 28)
    held_out = {v["bytes"] for v in data.test["image"]}
    trained = [ex["image"]["bytes"] for ex in data.train]
    assert len(trained) == 260 and not held_out & set(trained)


def test_stream_position_resumes_exactly_across_epochs(train_only):
    data = load_image_data(TrainingDataArguments(dataset=str(train_only), streaming=True, max_eval_samples=40))
    loader = stream_loader(data.train, ImageTransform(1), 32, seed=0, buffer_size=50, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    saved = loader.dataset.state_dict()
    expected = [next(it)["pixel_values"] for _ in range(12)]  # 260 images = 8 batches: crosses an epoch
    again = stream_loader(data.train, ImageTransform(1), 32, seed=0, buffer_size=50, rank=0, world_size=1)
    again.dataset.load_state_dict(saved)
    got = [b["pixel_values"] for b, _ in zip(again, range(12))]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not torch.equal(expected[0], expected[8]), "a new epoch is shuffled anew"


def test_two_processes_read_disjoint_shards(train_only, tmp_path):
    accelerate_launch("tests/scripts/stream_ranks.py", str(train_only), str(tmp_path), num_processes=2)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["held_out"] == r1["held_out"], "every process holds out the same images"
    assert not set(r0["seen"]) & set(r1["seen"]), "the processes' shards overlap"
    assert len(r0["seen"]) + len(r1["seen"]) == 280 and abs(len(r0["seen"]) - len(r1["seen"])) < 40
    assert not (set(r0["seen"]) | set(r1["seen"])) & set(r0["held_out"])


def test_streamed_tokenizer_run_resumed_from_latest_matches_uninterrupted(train_only, tmp_path):
    args = ["--dataset", str(train_only), "--streaming", "--max-eval-samples", "40", "--shuffle-buffer", "64",
            "--preset", "tiny", "--train-batch-size", "32", "--checkpointing-steps", "6", "--eval-steps", "100",
            "--lr-warmup-steps", "2", "--logging-steps", "5"]  # fmt: skip
    full, split = resumed_and_uninterrupted("train.tokenizer", args, tmp_path, steps=14, stop=6)
    for k in full:
        assert torch.equal(full[k], split[k]), k
    # Two processes on uneven shards: each stream is endless, so neither waits for the other at an epoch's end.
    accelerate_launch("train.tokenizer", *args, "--max-train-steps", "12", "--output-dir", str(tmp_path / "two"),
                      num_processes=2)  # fmt: skip
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-12" / "stream_state_1.pt").exists()
