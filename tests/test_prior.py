"""The token layout, the prior's loss, distributed and resumed training, and the self-describing folder."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import accelerate_launch, last_error_line, python_m, resumed_and_uninterrupted
from common.data import FASHION_MNIST_CLASSES
from prior import PriorInfo, TokenLayout, build_prior, generate_codes, load_prior, prior_loss
from sample import ClassConditionalPipeline
from sample.pipeline import DEFAULT_SAMPLING
from train.encode import load_codes
from tokenizer import VQVAE, get_config

LAYOUT = TokenLayout(num_codes=64, num_classes=10)
INFO = PriorInfo(64, 10, [str(i) for i in range(10)], (7, 7), None, (28, 28))


def test_layout_round_trips_codes_classes_and_null():
    assert (LAYOUT.null_token, LAYOUT.vocab_size) == (74, 75)
    codes = torch.randint(0, 64, (5, 49))
    labels = torch.tensor([0, 9, -1, 3, -1])
    seq = LAYOUT.sequences(codes, labels)
    assert seq.shape == (5, 50) and seq[:, 0].tolist() == [64, 73, 74, 67, 74]
    back_codes, back_labels = LAYOUT.split(seq)
    assert torch.equal(back_codes, codes) and torch.equal(back_labels, labels)


@pytest.mark.parametrize("bad", [10, 11, -2])
def test_out_of_range_class_ids_are_rejected(bad):
    with pytest.raises(ValueError, match=f"class id {bad} is out of range; expected 0..9"):
        LAYOUT.condition_tokens(torch.tensor([0, bad]))


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match=r"codes span \[0, 64\]; expected 0..63"):
        LAYOUT.sequences(torch.tensor([[0, 64]]), torch.tensor([1]))


def test_loss_is_cross_entropy_over_code_positions_only():
    torch.manual_seed(0)
    model = build_prior("tiny", INFO).eval()
    codes, labels = torch.randint(0, 64, (4, 49)), torch.tensor([1, 2, -1, 9])
    loss = prior_loss(model, codes, labels, LAYOUT, p_uncond=0.0)
    seq = torch.cat([torch.tensor([65, 66, 74, 73])[:, None], codes], 1)  # condition ids by hand
    logits = model(input_ids=seq).logits  # (4, 50, V)
    by_hand = 0.0
    for b in range(4):
        for t in range(49):  # position t predicts code t+1; the condition itself is never a target
            log_probs = F.log_softmax(logits[b, t, :64].double(), -1)
            by_hand -= log_probs[codes[b, t]].item()
    assert loss.item() == pytest.approx(by_hand / (4 * 49), rel=1e-5)


def test_p_uncond_one_makes_every_condition_null():
    model = build_prior("tiny", INFO).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][:, 0].clone()), with_kwargs=True)  # fmt: skip
    codes, labels = torch.randint(0, 64, (32, 49)), torch.randint(0, 10, (32,))
    dropped = prior_loss(model, codes, labels, LAYOUT, p_uncond=1.0)
    assert (seen[0] == LAYOUT.null_token).all()
    assert dropped.item() == pytest.approx(prior_loss(model, codes, torch.full((32,), -1), LAYOUT).item(), rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_two_processes_end_with_identical_weights(chain, tmp_path, arch):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    accelerate_launch("tests/scripts/prior_ranks.py", "--codes", str(chain["codes"]), "--preset", "tiny", "--arch", arch,
                      "--train-batch-size", "32", "--max-train-steps", "6", "--eval-steps", "6",
                      "--max-eval-samples", "64", "--output-dir", str(tmp_path / "run"), num_processes=2, RANKS_DIR=ranks)  # fmt: skip
    r0, r1 = torch.load(ranks / "rank0.pt"), torch.load(ranks / "rank1.pt")
    init = build_prior("tiny", INFO, arch=arch).state_dict()
    assert any(not torch.equal(r0[k], init[k]) for k in r0 if k in init), "weights moved"
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_resume_from_latest_reproduces_the_uninterrupted_run(chain, tmp_path):
    args = ["--codes", str(chain["codes"]), "--preset", "tiny", "--train-batch-size", "64", "--max-eval-samples", "64",
            "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "3", "--checkpointing-steps", "10",
            "--eval-steps", "100", "--dropout", "0.1", "--n-layer", "2"]  # fmt: skip
    full, split = resumed_and_uninterrupted("train.prior", args, tmp_path, steps=20, stop=10)
    for k in full:
        assert torch.allclose(full[k], split[k], atol=1e-6), k


def test_saved_prior_loads_alone_and_names_its_tokenizer(chain):
    model, info = load_prior(str(chain["prior"]))
    assert info.tokenizer == str(chain["tokenizer"].resolve())
    assert (info.num_codes, info.num_classes, info.grid, info.image_size) == (64, 10, (7, 7), (28, 28))
    assert info.class_names[7] == "Sneaker"
    assert info.sampling == DEFAULT_SAMPLING, "train.prior records the settings it samples at"
    cfg = model.config
    assert (cfg.vocab_size, cfg.n_positions) == (75, 50)
    assert cfg.bos_token_id == cfg.eos_token_id == cfg.pad_token_id == 74
    card = (chain["prior"] / "README.md").read_text()
    assert "bits_per_token" in card and "uniform baseline" in card
    assert os.path.exists(chain["prior"] / "images" / "prior-0000150.png")


def test_gpt2_prior_uses_one_gelu_kernel_and_loads_priors_saved_with_gelu_new(tmp_path):
    """The presets' "gelu_pytorch_tanh" is GPT-2's "gelu_new" in one kernel: a prior saved before the change
    (its config says gelu_new) loads and gives the same logits with either activation."""
    torch.manual_seed(0)
    model = build_prior("tiny", INFO).eval()
    assert model.config.activation_function == "gelu_pytorch_tanh"
    model.config.activation_function = "gelu_new"
    model.save_pretrained(tmp_path)
    old, _ = load_prior(str(tmp_path))
    assert old.config.activation_function == "gelu_new"
    tokens = torch.randint(0, 64, (4, 50))
    with torch.no_grad():
        torch.testing.assert_close(old(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_tokenizer_with_another_k_is_refused(chain, tmp_path):
    other = VQVAE(get_config("tiny", num_codes=32))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizer has K=32 codes but the prior was trained on K=64"):
        ClassConditionalPipeline.from_pretrained(str(chain["prior"]), tokenizer=str(tmp_path / "other"))
    proc = python_m("sample", "--prior", str(chain["prior"]), "--tokenizer", str(tmp_path / "other"),
                    "--output-dir", str(tmp_path / "s"), check=False)  # fmt: skip
    assert proc.returncode == 1 and "K=32" in last_error_line(proc)


def test_tiny_prior_beats_the_uniform_baseline(chain):
    metrics = json.loads((chain["prior"] / "metrics.json").read_text())
    uniform = math.log2(64)
    assert metrics["bits_per_token"] < 0.85 * uniform, metrics
    assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_token"] * 49)


def test_dataset_and_tokenizer_instead_of_codes_encodes_once(chain, tmp_path):
    out = tmp_path / "run"
    args = ["--tokenizer", str(chain["tokenizer"]), "--dataset", "fashion_mnist", "--max-train-samples", "256",
            "--max-eval-samples", "64", "--preset", "tiny", "--train-batch-size", "32", "--max-train-steps", "3",
            "--eval-steps", "3", "--output-dir", str(out)]  # fmt: skip
    python_m("train.prior", *args)
    codes, meta = load_codes(str(out / "codes"))
    assert (len(codes["train"]), len(codes["test"])) == (256, 64) and meta["tokenizer"] == str(chain["tokenizer"].resolve())
    stamp = os.path.getmtime(out / "codes" / "vqgpt_codes.json")
    python_m("train.prior", *args, "--max-train-steps", "4")
    assert os.path.getmtime(out / "codes" / "vqgpt_codes.json") == stamp, "cached codes are reused"
    assert load_prior(str(out))[1].tokenizer == str(chain["tokenizer"].resolve())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_codes_match_transformers_generate_token_for_token(arch):
    """Our KV-cache loop against transformers' own generate, restricted to code ids."""
    torch.manual_seed(0)
    model = build_prior("tiny", INFO, arch=arch).eval()
    labels = torch.tensor([0, 3, 9, -1])
    ours = generate_codes(model, LAYOUT, 49, labels, top_k=1)
    cond = LAYOUT.condition_tokens(labels)[:, None]
    theirs = model.generate(cond, attention_mask=torch.ones_like(cond), max_new_tokens=49, min_new_tokens=49,
                            do_sample=False, suppress_tokens=list(range(64, LAYOUT.vocab_size)))  # fmt: skip
    assert torch.equal(ours, theirs[:, 1:])


def test_llama_prior_trains_resumes_saves_loads_and_samples(chain, tmp_path):
    args = ["--codes", str(chain["codes"]), "--arch", "llama", "--preset", "tiny", "--train-batch-size", "64",
            "--max-eval-samples", "100", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "3",
            "--checkpointing-steps", "10", "--eval-steps", "100", "--dropout", "0.1",
            "--classifier", str(chain["classifier"]), "--eval-spaces", str(chain["classifier"]), "--eval-samples-per-class", "5",
            "--sample-guidance-scale", "1.5", "--sample-top-k", "0", "--sample-guidance-schedule", "linear"]  # fmt: skip
    full, split = resumed_and_uninterrupted("train.prior", args, tmp_path, steps=20, stop=10)
    assert full.keys() == split.keys() and any("mlp.gate_proj" in k for k in full)  # SwiGLU
    for k in full:
        assert torch.allclose(full[k], split[k], atol=1e-6), k
    model, info = load_prior(str(tmp_path / "full"))
    assert model.config.model_type == "llama" and info.class_names == FASHION_MNIST_CLASSES
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert {"fd", "fd_floor", "precision", "recall", "class_accuracy", "detail", "kid_vgg", "fd_ratio_vgg-2"} <= set(metrics) and metrics["fd"] > 0
    assert metrics["fd_ratio_vgg-2"] == pytest.approx(metrics["fd_ratio_vgg"]), "a second space: the same network, the same figure"
    card = (tmp_path / "full" / "README.md").read_text()
    assert "llama" in card and "| fd |" in card and "| class_accuracy |" in card
    assert "guidance_scale 1.5, temperature 1.0, top_k 0, top_p 1.0, guidance_schedule linear" in card, "the card names what it samples at"
    pipe = ClassConditionalPipeline.from_pretrained(str(tmp_path / "full"))
    assert info.sampling == pipe.sampling_settings() == dict(guidance_scale=1.5, temperature=1.0, top_k=0, top_p=1.0, guidance_schedule="linear",
                                                                     deep_temperature=None, deep_top_k=None)  # fmt: skip
    images = pipe(["Bag", 0], guidance_scale=2.0, seed=0)
    assert images.shape == (2, 1, 28, 28) and torch.equal(images, pipe([8, "T-shirt/top"], guidance_scale=2.0, seed=0))
