"""Multi-level codes: residual quantization, decoding at fewer levels, the code container, old folders."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenizer import VQVAE, get_config
from tokenizer.codes import CodeLayout
from tokenizer.quantizer import MultiScaleQuantizer, ResidualQuantizer, kept_levels


def _brute_force_levels(q: ResidualQuantizer, z_rows: torch.Tensor) -> list[torch.Tensor]:
    """Each level's nearest code on that level's residual, by cdist in float64."""
    residual, out = z_rows.double(), []
    for i in range(q.num_levels):
        book = q.level(i).codebook.double()
        idx = torch.cdist(residual, book).argmin(1)
        out.append(idx)
        residual = residual - book[idx]
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_each_level_is_the_nearest_code_of_its_residual_and_the_levels_sum_to_the_latent(shared):
    torch.manual_seed(0)
    q = ResidualQuantizer(64, 8, levels=3, shared_codebook=shared, kmeans_iters=2).train()
    for _ in range(3):  # codebooks initialised from data and moved by EMA
        q(torch.randn(4, 8, 5, 5))
    assert len(q.codebooks) == (1 if shared else 3)
    q.eval()
    z = torch.randn(4, 8, 5, 5)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = _brute_force_levels(q, rows)
    codes = q.nearest_grid(z)  # (B, 3 * 25), level after level
    assert codes.shape == (4, 75)
    levels = CodeLayout(((5, 5),) * 3).split(codes)
    for i in range(3):
        assert torch.equal(levels[i].flatten(), expected[i]), f"level {i}"
    out = q(z)
    assert torch.equal(out.indices, codes)
    latent = sum(q.level(i).codebook[expected[i]] for i in range(3)).view(4, 5, 5, 8).permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized, latent, atol=1e-6)
    assert torch.allclose(q.lookup_levels(levels), latent, atol=1e-6)


def test_quantizer_dropout_keeps_a_prefix_of_levels_per_image():
    torch.manual_seed(0)
    q = ResidualQuantizer(32, 4, levels=4, dropout=1.0, kmeans_iters=0).train()
    z = torch.randn(16, 4, 3, 3)
    q(z)  # initialise every level
    kept = kept_levels(q, 16, z.device)  # the draw of the next step
    assert kept.min() >= 1 and kept.max() <= 4 and len(set(kept.tolist())) > 1
    books = [q.level(i).codebook.clone() for i in range(4)]  # the codebooks the next step assigns with
    out = q(z)
    levels = CodeLayout(((3, 3),) * 4).split(out.indices)
    for b in range(16):
        d = int(kept[b])
        expected = sum(books[i][levels[i][b]] for i in range(d)).permute(2, 0, 1)
        assert torch.allclose(out.quantized[b], expected, atol=1e-5), f"image {b} keeps {d} levels"


def test_each_scale_is_the_nearest_code_of_its_downsampled_residual():
    """VAR's scales by hand: the residual area-downsampled to s x s, its nearest codes (cdist, float64),
    their upsampled and refined contribution subtracted; the codes and the latent of every prefix agree."""
    torch.manual_seed(0)
    q = MultiScaleQuantizer(64, 8, scales=[1, 2, 3, 5], dropout=0.5, kmeans_iters=2).train()
    for _ in range(3):
        q(torch.randn(6, 8, 5, 5))
    q.eval()
    z = torch.randn(6, 8, 5, 5)
    book = q.codebook.codebook.double()
    rest, expected, contributions = z.clone(), [], []
    for i, s in enumerate([1, 2, 3, 5]):
        r = torch.nn.functional.interpolate(rest, size=(s, s), mode="area") if s != 5 else rest
        idx = torch.cdist(r.permute(0, 2, 3, 1).reshape(-1, 8).double(), book).argmin(1)
        codes = book[idx].float().view(6, s, s, 8).permute(0, 3, 1, 2)
        up = torch.nn.functional.interpolate(codes, size=(5, 5), mode="bicubic") if s != 5 else codes
        contribution = q.phi[i](up)
        rest = rest - contribution
        expected.append(idx.view(6, s * s))
        contributions.append(contribution)
    with torch.no_grad():
        codes = q.nearest_grid(z)
        assert torch.equal(codes, torch.cat(expected, 1)) and codes.shape == (6, 1 + 4 + 9 + 25)
        layout = CodeLayout(((1, 1), (2, 2), (3, 3), (5, 5)))
        for d in range(1, 5):
            assert torch.allclose(q.lookup_levels(layout.split(codes, d)), sum(contributions[:d]), atol=1e-5)
        assert torch.allclose(q(z).quantized, sum(contributions), atol=1e-5)
    with pytest.raises(ValueError, match="scales 1,2,3,5 end at 5x5 but the code grid of these images is 7x7"):
        q.nearest_grid(torch.randn(1, 8, 7, 7))


def test_tokenizer_decodes_any_prefix_of_its_levels(fashion_batch):
    torch.manual_seed(0)
    model = VQVAE(get_config("tiny", quantizer="residual", levels=3, quantizer_dropout=0.5)).train()
    x = fashion_batch[0][:8]
    for _ in range(2):
        model(x)
    model.eval()
    codes = model.encode(x)
    layout = model.code_layout(28, 28)
    assert codes.shape == (8, layout.length()) == (8, 147) and layout.describe() == "3 levels of 7x7"
    for d in (1, 2, 3):
        grids = layout.split(codes, d)
        latent = sum(model.quantizer.level(i).lookup(grids[i]) for i in range(d))
        expected = model.decoder(latent).clamp(-1, 1)
        assert torch.allclose(model.decode(codes, levels=d), expected, atol=1e-6)
        assert torch.allclose(model.decode(codes[:, : layout.length(d)], levels=d), expected, atol=1e-6)
        assert torch.equal(model.encode(x, d), codes[:, : layout.length(d)])  # the first d levels, the rest never computed
    assert torch.allclose(model.decode(codes), model(x).reconstruction.clamp(-1, 1), atol=1e-5)
    for call in (lambda: model.decode(codes, levels=4), lambda: model.encode(x, 4)):
        with pytest.raises(ValueError, match="levels=4: this tokenizer's codes have 3 levels; expected 1 to 3"):
            call()


def test_multiscale_tokenizer_encodes_any_prefix_of_its_scales(fashion_batch):
    torch.manual_seed(0)
    model = VQVAE(get_config("tiny", quantizer="multiscale", scales=[1, 3, 7])).eval()
    x = fashion_batch[0][:4]
    codes = model.encode(x)
    assert codes.shape == (4, 1 + 9 + 49)
    for d, n in ((1, 1), (2, 10), (3, 59)):
        assert torch.equal(model.encode(x, d), codes[:, :n])


def test_bad_level_options_are_one_line():
    for overrides, message in ((dict(quantizer="residual", levels=0), "--levels 0"),
                               (dict(shared_codebook=True), "--shared-codebook needs levels of codes: pass --quantizer residual"),
                               (dict(levels=3), "--levels 3 needs levels of codes: pass --quantizer residual"),
                               (dict(scales=[1, 7]), "--scales needs levels of codes: pass --quantizer multiscale"),
                               (dict(quantizer="multiscale"), "--quantizer multiscale needs --scales"),
                               (dict(quantizer="multiscale", scales=[1, 4, 2]), "--scales 1,4,2: expected positive sizes in increasing order"),
                               (dict(quantizer="residual", levels=2, codebook_dim=8), "--codebook-dim")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            VQVAE(get_config("tiny", **overrides))


def test_multi_level_tokenizer_round_trips_strictly(tmp_path, fashion_batch):
    model = VQVAE(get_config("tiny", quantizer="residual", levels=2, shared_codebook=True)).train()
    model(fashion_batch[0][:8])
    model.eval().save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert (config["quantizer"], config["levels"], config["shared_codebook"]) == ("residual", 2, True)
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    x = fashion_batch[0][:8]
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_a_flat_folder_from_before_levels_loads_and_encodes_identically(tmp_path, fashion_batch):
    """A folder written before the level options existed: its config has none of them, its weights the
    flat quantizer's names."""
    model = VQVAE(get_config("tiny")).train()
    model(fashion_batch[0][:8])
    model.eval().save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    for key in ("quantizer", "levels", "shared_codebook", "quantizer_dropout"):
        del config[key]
    (tmp_path / "tok" / "config.json").write_text(json.dumps(config))
    assert {k for k in load_file(tmp_path / "tok" / "model.safetensors") if k.startswith("quantizer.")} == {
        "quantizer.codebook", "quantizer.ema_count", "quantizer.ema_sum", "quantizer.initialized", "quantizer.steps"}
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    x = fashion_batch[0][:8]
    codes = loaded.encode(x)
    assert codes.shape == (8, 7, 7) and torch.equal(codes, model.encode(x))
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert torch.equal(loaded.decode(codes.flatten(1)), model.decode(codes)), "(B, h*w) rows are the same codes"


LEVEL_ARGS = ["--preset", "tiny", "--quantizer", "residual", "--levels", "2", "--quantizer-dropout", "0.5",
              "--max-train-samples", "512", "--max-eval-samples", "128", "--train-batch-size", "32",
              "--checkpointing-steps", "6", "--eval-steps", "12", "--logging-steps", "4", "--learning-rate", "2e-3",
              "--lr-warmup-steps", "2"]  # fmt: skip


def test_residual_tokenizer_trains_resumes_exactly_and_its_codes_keep_their_levels(tmp_path):
    """train.tokenizer with residual levels: killed after a checkpoint and resumed, it ends with the weights
    of an uninterrupted run (codebooks, EMA statistics and the dropout draws included); its evaluation
    reports every prefix of the levels and every level's usage; train.encode stores the levels."""
    from conftest import python_m, resumed_and_uninterrupted

    full, split = resumed_and_uninterrupted("train.tokenizer", LEVEL_ARGS, tmp_path, steps=12, stop=6)
    assert full.keys() == split.keys() and "quantizer.codebooks.1.codebook" in full
    for k in full:
        assert torch.allclose(full[k], split[k], atol=1e-6), k
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert {"psnr", "psnr_levels_1", "codebook_usage_level_1", "codebook_usage_level_2"} <= set(metrics)
    assert metrics["codebook_usage"] == min(metrics["codebook_usage_level_1"], metrics["codebook_usage_level_2"])
    assert "2 residual levels of codes" in (tmp_path / "full" / "README.md").read_text()
    python_m("train.encode", "--tokenizer", str(tmp_path / "full"), "--max-train-samples", "64", "--max-eval-samples", "32",
             "--output-dir", str(tmp_path / "codes"))  # fmt: skip
    from train.encode import load_codes

    codes, meta = load_codes(str(tmp_path / "codes"))
    assert meta["levels"] == [[7, 7], [7, 7]] and meta["grid"] == [7, 7]
    assert len(codes["test"][0]["codes"]) == 98

    # Decoder-only fine-tuning with the adaptive adversarial loss (taming's second stage), every prefix of the
    # levels by the tokenizer's dropout: resumed like any run, and only the decoder moves, so the codes stay.
    tuned = ["--finetune-decoder", str(tmp_path / "full"), "--disc-weight", "0.5", "--adaptive-disc-weight", *LEVEL_ARGS[8:]]
    a, b = resumed_and_uninterrupted("train.tokenizer", tuned, tmp_path / "tuned", steps=12, stop=6)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert {k.split(".")[0] for k in full if not torch.equal(full[k], a[k])} == {"decoder"}, "the encoder and codebooks stay"
    assert "Its decoder fine-tuned from" in (tmp_path / "tuned" / "full" / "README.md").read_text()
    python_m("train.tokenizer", *tuned, "--finetune-levels", "1", "--max-train-steps", "2", "--output-dir", str(tmp_path / "level1"))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    original, level1 = VQVAE.from_pretrained(tmp_path / "full"), VQVAE.from_pretrained(tmp_path / "level1")
    assert torch.equal(original.encode(x), level1.encode(x)) and not torch.equal(original.decode(original.encode(x)), level1.decode(level1.encode(x)))  # fmt: skip


def test_gumbel_codes_are_the_argmax_of_the_logits_at_evaluation_and_samples_in_training():
    import math

    from tokenizer.quantizer import GumbelQuantizer

    torch.manual_seed(0)
    q = GumbelQuantizer(16, 4, kl_weight=0.5, tau_start=1.0, tau_end=1 / 16, anneal_steps=4)
    z = torch.randn(3, 4, 5, 5)
    logits = q.to_logits(z)
    q.eval()
    out = q(z)
    assert torch.equal(out.indices, logits.argmax(1)) and torch.equal(q.nearest_grid(z), out.indices)
    assert torch.allclose(out.quantized, q.embedding.weight[out.indices].permute(0, 3, 1, 2), atol=1e-6)
    probs = logits.softmax(1)
    kl = (probs * (probs.log() + math.log(16))).sum(1).mean()
    assert torch.allclose(out.loss, 0.5 * kl, atol=1e-6), "KL to the uniform distribution over codes"
    q.train()
    temperatures = []
    for _ in range(6):
        temperatures.append(q.temperature)
        out = q(z.requires_grad_())
        assert torch.allclose(out.quantized.detach(), q.embedding.weight[out.indices].permute(0, 3, 1, 2), atol=1e-6), "hard codes"
    assert temperatures[0] == 1.0 and abs(temperatures[4] - 1 / 16) < 1e-9 and temperatures[5] == temperatures[4]
    out.quantized.sum().backward()
    assert z.grad is not None and q.to_logits.weight.grad.abs().sum() > 0, "soft in the backward pass"


def test_a_flat_prior_models_the_flattened_levels_or_their_first_levels(tmp_path, fashion_batch):
    """The baseline prior over multi-level codes: train.prior over every level flattened (or, with --levels
    d, the first d), its config records the levels it models, the pipeline and python -m sample decode its
    sequences from those levels, the anomaly scores read them, and a tokenizer of another layout is refused."""
    from conftest import python_m

    from anomaly import AnomalyScorer
    from prior import bits, load_prior, prior_loss
    from sample import ClassConditionalPipeline

    python_m("train.tokenizer", *LEVEL_ARGS, "--max-train-steps", "12", "--output-dir", str(tmp_path / "tok"))
    python_m("train.encode", "--tokenizer", str(tmp_path / "tok"), "--max-train-samples", "256", "--max-eval-samples", "64",
             "--output-dir", str(tmp_path / "codes"))  # fmt: skip
    prior_args = ["--codes", str(tmp_path / "codes"), "--preset", "tiny", "--max-train-steps", "4", "--train-batch-size", "16",
                  "--eval-steps", "4", "--checkpointing-steps", "100", "--lr-warmup-steps", "1"]  # fmt: skip
    tok = VQVAE.from_pretrained(str(tmp_path / "tok"))
    for levels, length in ((None, 98), (1, 49)):
        out = tmp_path / f"prior-{levels}"
        python_m("train.prior", *prior_args, *(["--levels", str(levels)] if levels else []), "--output-dir", str(out))
        prior, info = load_prior(str(out))
        assert info.seq_len == length and prior.config.n_positions == length + 1
        assert info.code_layout.grids == ((7, 7),) * (levels or 2)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_token"] * length)
        pipe = ClassConditionalPipeline.from_pretrained(str(out))
        images = pipe(["Bag", "Sneaker"], seed=0, top_k=0)
        assert images.shape == (2, 1, 28, 28)
        # the same sequences decoded by hand from the levels the prior models
        from prior import generate_codes
        from sample.pipeline import generation_kwargs

        g = torch.Generator().manual_seed(0)
        codes = generate_codes(pipe.prior, info.layout, length, torch.tensor(pipe.class_ids(["Bag", "Sneaker"])), generator=g,
                               **generation_kwargs(pipe.sampling_settings(top_k=0)))  # fmt: skip
        assert codes.shape == (2, length) and torch.equal(images, tok.decode(codes, levels=levels or 2))
        x = fashion_batch[0][:8]
        scores = AnomalyScorer(tok, prior, info, sigma2=0.01).score(x)
        ours = tok.encode(x, levels)  # the levels the prior models, and only those
        assert ours.shape == (8, length)
        with torch.inference_mode():
            nll = bits(prior_loss(prior, ours, torch.full((8,), -1), info.layout, reduction="none")) * length
            mse = ((tok.decode(ours, levels=levels or 2) - x) ** 2).flatten(1).mean(1)
        assert np.allclose(scores["nll"], nll.numpy(), rtol=1e-5) and np.allclose(scores["reconstruction"], mse.numpy(), rtol=1e-5)
    python_m("sample", "--prior", str(tmp_path / "prior-None"), "--per-class", "1", "--output-dir", str(tmp_path / "samples"))
    assert len(list((tmp_path / "samples").rglob("*.png"))) >= 10
    flat = VQVAE(get_config("tiny"))
    with pytest.raises(ValueError, match="the tokenizer makes a 7x7 grid but the prior models 2 levels of 7x7"):
        ClassConditionalPipeline(prior, flat, load_prior(str(tmp_path / "prior-None"))[1])
