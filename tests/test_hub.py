"""save_pretrained/from_pretrained round trips strictly; push_to_hub with only HfApi's network calls faked."""

import json
import os
import shutil
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from tokenizer import VQVAE, get_config


@pytest.fixture
def trained_tiny(fashion_batch):
    torch.manual_seed(0)
    model = VQVAE(get_config("tiny")).train()
    x, _ = fashion_batch
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3):
        model(x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_round_trip_gives_identical_outputs(tmp_path, trained_tiny, fashion_batch):
    x, _ = fashion_batch
    trained_tiny.save_pretrained(tmp_path)
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config == trained_tiny.config
    assert torch.equal(loaded.encode(x), trained_tiny.encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), trained_tiny.decode(trained_tiny.encode(x)))
    for k, v in trained_tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_key_fails_loudly(tmp_path, trained_tiny):
    trained_tiny.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["quantizer.codebook"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="quantizer.codebook"):
        VQVAE.from_pretrained(tmp_path)


def test_extra_key_fails_loudly(tmp_path, trained_tiny):
    trained_tiny.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["surprise"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="surprise"):
        VQVAE.from_pretrained(tmp_path)


class FakeHub:
    """Stands in for the Hub's HTTP API: create_repo and create_commit write to a local folder."""

    def __init__(self, root):
        self.root = root
        self.commits = []

    def patches(self):
        hub = self

        def create_repo(api, repo_id, **kw):
            os.makedirs(hub.root / repo_id, exist_ok=True)
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, **kw):
            hub.commits.append([op.path_in_repo for op in operations])
            for op in operations:
                dest = hub.root / repo_id / op.path_in_repo
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = op.path_or_fileobj
                if isinstance(src, (str, os.PathLike)):
                    shutil.copy(src, dest)
                else:
                    dest.write_bytes(src if isinstance(src, bytes) else src.read())
            return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/fake")

        return mock.patch.multiple(HfApi, create_repo=create_repo, create_commit=create_commit)


def test_push_cli_uploads_config_weights_and_card(tmp_path, trained_tiny, fashion_batch):
    from common.hub import write_model_card
    from tokenizer.push import main as push_main

    run_dir = tmp_path / "run"
    trained_tiny.save_pretrained(run_dir)
    write_model_card(str(run_dir), title="t", summary="s", metrics={"psnr": 20.5}, dataset="fashion_mnist",
                     details={"preset": "tiny"}, tags=[], usage="...")  # fmt: skip
    (run_dir / "checkpoints").mkdir()  # run leftovers must not be uploaded
    (run_dir / "checkpoints" / "optimizer.bin").write_bytes(b"x")
    hub = FakeHub(tmp_path / "hub")
    with hub.patches():
        push_main([str(run_dir), "someone/vqgpt-tiny"])
    repo = tmp_path / "hub" / "someone" / "vqgpt-tiny"
    assert sorted(hub.commits[0]) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((repo / "config.json").read_text())["num_codes"] == trained_tiny.config.num_codes
    assert "psnr" in (repo / "README.md").read_text() and "library_name: vqgpt" in (repo / "README.md").read_text()
    loaded = VQVAE.from_pretrained(repo)  # strict
    x, _ = fashion_batch
    assert torch.equal(loaded.encode(x), trained_tiny.encode(x))


def test_training_push_to_hub(tmp_path):
    """A multi-level tokenizer (residual scales) goes up with its levels in the config and the card."""
    from train.tokenizer import main as train_main

    hub = FakeHub(tmp_path / "hub")
    with hub.patches():
        train_main(["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--max-train-steps", "4",
                    "--train-batch-size", "16", "--max-train-samples", "256", "--max-eval-samples", "64",
                    "--quantizer", "multiscale", "--scales", "1,2,4,7", "--quantizer-dropout", "0.5",
                    "--push-to-hub", "--hub-model-id", "someone/tok"])  # fmt: skip
    repo = tmp_path / "hub" / "someone" / "tok"
    assert sorted(os.listdir(repo)) == ["README.md", "config.json", "model.safetensors"]
    card = (repo / "README.md").read_text()
    assert "fashion_mnist" in card and "codebook_usage" in card and "psnr" in card
    assert "residual scales 1,2,4,7 of codes" in card and "psnr_levels_3" in card
    loaded = VQVAE.from_pretrained(repo)
    assert loaded.num_levels == 4 and loaded.code_layout(28, 28).length() == 70


def test_a_depth_prior_goes_up_with_its_card_and_loads_from_the_hub_folder(tmp_path):
    """A prior over levels of codes (here the depth prior) is pushed by the training loop like a flat one, and the
    pushed folder loads alone through AutoModelForCausalLM."""
    from prior import load_prior
    from train.encode import main as encode_main
    from train.prior import main as prior_main

    VQVAE(get_config("tiny", quantizer="residual", levels=2)).save_pretrained(tmp_path / "tok")
    encode_main(["--tokenizer", str(tmp_path / "tok"), "--max-train-samples", "64", "--max-eval-samples", "32",
                 "--output-dir", str(tmp_path / "codes")])  # fmt: skip
    hub = FakeHub(tmp_path / "hub")
    with hub.patches():
        prior_main(["--codes", str(tmp_path / "codes"), "--arch", "depth", "--preset", "tiny", "--max-train-steps", "2",
                    "--train-batch-size", "16", "--output-dir", str(tmp_path / "run"), "--push-to-hub", "--hub-model-id", "someone/prior"])  # fmt: skip
    repo = tmp_path / "hub" / "someone" / "prior"
    assert sorted(os.listdir(repo)) == ["README.md", "config.json", "model.safetensors"]
    assert "depth-transformer prior" in (repo / "README.md").read_text()
    model, info = load_prior(str(repo))
    assert type(model).__name__ == "DepthPrior" and info.code_layout.describe() == "2 levels of 7x7"
