"""Priors over multi-level codes: the depth prior (RQ-Transformer) and the next-scale prior (VAR) against their
own step-by-step sampler, the block-causal mask, the sampling settings per level, and the command lines."""

import json

import numpy as np
import pytest
import torch

from conftest import accelerate_launch, python_m, resumed_and_uninterrupted
from prior import PriorInfo, block_causal_mask, build_prior, code_logits, generate_codes, load_prior, prior_steps

LAYOUTS = {  # the levels of codes each prior is tested on
    "depth": ((3, 3),) * 3,
    "scales": ((1, 1), (2, 2), (3, 3)),
    "llama": ((3, 3),) * 2,  # the flat baseline over flattened levels goes through the same steps
}


def _prior(arch: str, seed: int = 0):
    info = PriorInfo(16, 3, ["a", "b", "c"], (3, 3), None, levels=LAYOUTS[arch])
    torch.manual_seed(seed)
    return build_prior("tiny", info, arch=arch).eval(), info


def _stepped_logits(model, info, codes, cond) -> torch.Tensor:
    """The logits of every code as the sampler meets them: its steps fed the given codes."""
    steps, out = prior_steps(model, info.seq_len), torch.zeros(*codes.shape, info.num_codes)
    logits = steps.start(cond)
    for i, (where, _) in enumerate(steps.order):
        out[:, where] = logits[..., : info.num_codes].float()
        if i + 1 < len(steps.order):
            logits = steps.feed(codes[:, where])
    return out


@pytest.mark.parametrize("arch", list(LAYOUTS))
@torch.no_grad()
def test_teacher_forced_log_probabilities_equal_the_step_by_step_samplers(arch):
    model, info = _prior(arch)
    codes = torch.randint(0, 16, (5, info.seq_len))
    cond = info.layout.condition_tokens(torch.tensor([0, 1, 2, -1, 1]))
    teacher = code_logits(model, codes, cond, info.layout).log_softmax(-1)
    stepped = _stepped_logits(model, info, codes, cond).log_softmax(-1)
    assert teacher.shape == (5, info.seq_len, 16)
    assert torch.allclose(teacher, stepped, atol=1e-5)
    steps = prior_steps(model, info.seq_len)
    emitted = torch.cat([where for where, _ in steps.order])
    assert sorted(emitted.tolist()) == list(range(info.seq_len)), "every code is emitted once"
    assert len(steps.order) == {"depth": 27, "scales": 3, "llama": 18}[arch], "a code, a level of a position, or a scale a step"


@pytest.mark.parametrize("arch", ["depth", "scales"])
@torch.no_grad()
def test_greedy_guided_decode_by_full_forwards_equals_the_cached_sampler(arch):
    """The reference reruns the whole teacher-forced forward at every step on the codes chosen so far (those
    not chosen yet are zeros, which causality must make irrelevant) and mixes the conditional and null rows."""
    model, info = _prior(arch, seed=1)
    labels, s = torch.tensor([0, 2, 1]), 3.0
    cond, null = info.layout.condition_tokens(labels), torch.full((3,), info.layout.null_token)
    ref = torch.zeros(3, info.seq_len, dtype=torch.long)
    for where, _ in prior_steps(model, info.seq_len).order:
        l_cond, l_null = code_logits(model, ref, cond, info.layout), code_logits(model, ref, null, info.layout)
        ref[:, where] = (l_null + s * (l_cond - l_null))[:, where].argmax(-1)
    ours = generate_codes(model, info.layout, info.seq_len, labels, guidance_scale=s, top_k=1)
    assert torch.equal(ours, ref)
    assert len(set(map(tuple, ours.tolist()))) > 1, "the classes steer the codes"


def test_block_causal_mask_matches_a_brute_force_mask_and_no_code_informs_its_own_or_a_coarser_scale():
    grids = LAYOUTS["scales"]
    scale_of = [i for i, (h, w) in enumerate(grids) for _ in range(h * w)]
    brute = torch.tensor([[scale_of[j] <= scale_of[i] for j in range(len(scale_of))] for i in range(len(scale_of))])
    assert torch.equal(block_causal_mask(grids), brute)
    # what the mask means for the logits: the codes of scale k inform only the logits of finer scales
    model, info = _prior("scales")
    cond = info.layout.condition_tokens(torch.tensor([1, 2]))
    codes = torch.randint(0, 16, (2, info.seq_len))
    base = code_logits(model, codes, cond, info.layout)
    start = 0
    for k, (h, w) in enumerate(grids):
        changed = codes.clone()
        changed[:, start:] = (changed[:, start:] + 1) % 16  # scale k and every finer scale
        other = code_logits(model, changed, cond, info.layout)
        assert torch.equal(other[:, : start + h * w], base[:, : start + h * w]), f"scale {k} saw its own or a finer scale's codes"  # fmt: skip
        if start + h * w < info.seq_len:
            assert not torch.allclose(other[:, start + h * w :], base[:, start + h * w :]), "finer scales see the coarser"
        start += h * w


@torch.no_grad()
def test_a_depth_priors_code_informs_only_the_codes_generated_after_it():
    model, info = _prior("depth")
    cond = info.layout.condition_tokens(torch.tensor([0, 1]))
    codes = torch.randint(0, 16, (2, info.seq_len))
    base = code_logits(model, codes, cond, info.layout)
    order = [int(where) for where, _ in prior_steps(model, info.seq_len).order]
    for i in (0, 4, 13, 26):
        changed = codes.clone()
        changed[:, order[i]] = (changed[:, order[i]] + 1) % 16
        other = code_logits(model, changed, cond, info.layout)
        assert torch.allclose(other[:, order[: i + 1]], base[:, order[: i + 1]], atol=1e-6)
        if i + 1 < len(order):
            assert not torch.allclose(other[:, order[i + 1 :]], base[:, order[i + 1 :]])


@pytest.mark.parametrize("arch", ["depth", "scales", "llama"])
@torch.no_grad()
def test_deep_levels_sample_at_their_own_settings(arch):
    """deep_temperature=0: the levels after the first are the argmax of their guided logits, given the codes
    sampled before them, while the first level is sampled."""
    model, info = _prior(arch)
    labels, s = torch.tensor([0, 1, 2, 0, 1, 2]), 2.0
    g = torch.Generator().manual_seed(0)
    codes = generate_codes(model, info.layout, info.seq_len, labels, guidance_scale=s, temperature=2.0, generator=g, deep_temperature=0)  # fmt: skip
    cond, null = info.layout.condition_tokens(labels), torch.full((6,), info.layout.null_token)
    l_cond, l_null = code_logits(model, codes, cond, info.layout), code_logits(model, codes, null, info.layout)
    greedy = (l_null + s * (l_cond - l_null)).argmax(-1) == codes
    first = info.code_layout.length(1)
    assert greedy[:, first:].all(), "the deep levels are greedy"
    assert not greedy[:, :first].all(), "the first level is sampled at temperature 2"


def test_level_priors_refuse_layouts_they_cannot_model():
    info = PriorInfo(16, 3, ["a", "b", "c"], (3, 3), None, levels=None)
    with pytest.raises(ValueError, match="a depth prior models 2 or more levels of one grid, not a 3x3 grid"):
        build_prior("tiny", info, arch="depth")
    info.levels = LAYOUTS["scales"]
    with pytest.raises(ValueError, match="not scales 1x1, 2x2, 3x3"):
        build_prior("tiny", info, arch="depth")


# ---------------------------------------------------------------- the command lines

TOKENIZERS = {  # a tiny tokenizer of each multi-level kind, and the prior that models it
    "depth": ["--quantizer", "residual", "--levels", "2", "--quantizer-dropout", "0.5"],
    "scales": ["--quantizer", "multiscale", "--scales", "1,2,4,7", "--quantizer-dropout", "0.5"],
}


@pytest.fixture(scope="module")
def level_codes(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("level-codes"), {}
    for arch, args in TOKENIZERS.items():
        python_m("train.tokenizer", "--preset", "tiny", *args, "--max-train-samples", "512", "--max-eval-samples", "64",
                 "--train-batch-size", "32", "--max-train-steps", "12", "--eval-steps", "12", "--checkpointing-steps", "100",
                 "--learning-rate", "2e-3", "--lr-warmup-steps", "2", "--output-dir", str(root / f"tok-{arch}"))  # fmt: skip
        python_m("train.encode", "--tokenizer", str(root / f"tok-{arch}"), "--max-train-samples", "512", "--max-eval-samples", "64",
                 "--output-dir", str(root / f"codes-{arch}"))  # fmt: skip
        out[arch], out[f"tok-{arch}"] = root / f"codes-{arch}", root / f"tok-{arch}"
    return out


def _prior_args(codes, arch: str) -> list[str]:
    return ["--codes", str(codes), "--arch", arch, "--preset", "tiny", "--train-batch-size", "32", "--max-eval-samples", "64",
            "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "3", "--checkpointing-steps", "6",
            "--eval-steps", "100", "--dropout", "0.1", "--sample-deep-temperature", "0.5"]  # fmt: skip


@pytest.mark.parametrize("arch", ["depth", "scales"])
def test_level_prior_trains_resumes_exactly_saves_loads_and_samples(level_codes, chain, tmp_path, fashion_batch, arch):
    from anomaly import AnomalyScorer
    from sample import ClassConditionalPipeline
    from sample.pipeline import generation_kwargs
    from tokenizer import VQVAE

    full, split = resumed_and_uninterrupted("train.prior", _prior_args(level_codes[arch], arch), tmp_path, steps=12, stop=6)
    assert full.keys() == split.keys()
    for k in full:
        assert torch.allclose(full[k], split[k], atol=1e-6), k
    model, info = load_prior(str(tmp_path / "full"))
    assert model.config.model_type == f"vqgpt-{arch}" and info.code_layout.num_levels == (2 if arch == "depth" else 4)
    assert info.sampling["deep_temperature"] == 0.5, "the settings per level are recorded"
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_token"] * info.seq_len)
    card = (tmp_path / "full" / "README.md").read_text()
    assert {"depth": "depth-transformer prior", "scales": "next-scale prior"}[arch] in card and "deep_temperature 0.5" in card

    pipe = ClassConditionalPipeline.from_pretrained(str(tmp_path / "full"))
    images = pipe(["Bag", "Sneaker"], seed=0)
    assert images.shape == (2, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    codes = generate_codes(pipe.prior, info.layout, info.seq_len, torch.tensor([8, 7]), generator=g, **generation_kwargs(pipe.sampling_settings()))  # fmt: skip
    assert torch.equal(images, VQVAE.from_pretrained(info.tokenizer).decode(codes, levels=info.code_layout.num_levels))
    scores = AnomalyScorer(pipe.tokenizer, model, info, sigma2=0.01).score(fashion_batch[0][:8])
    assert scores["nll"].shape == (8,) and (scores["nll"] > 0).all()
    python_m("sample", "--prior", str(tmp_path / "full"), "--classes", "Bag,0", "--per-class", "2", "--deep-temperature", "0",
             "--output-dir", str(tmp_path / "samples"))  # fmt: skip
    assert len(list((tmp_path / "samples").rglob("*.png"))) == 5  # 2 + 2, and grid.png
    proc = python_m("evaluation", "--prior", str(tmp_path / "full"), "--per-class", "4", "--classifier", str(chain["classifier"]),
                    "--max-reference", "200", "--output-json", str(tmp_path / "eval.json"))  # fmt: skip
    assert "deep_temperature 0.5" in proc.stdout and json.loads((tmp_path / "eval.json").read_text())["num_samples"] == 40


@pytest.mark.parametrize("arch", ["depth", "scales"])
def test_level_prior_two_processes_end_with_identical_weights(level_codes, tmp_path, arch):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    accelerate_launch("tests/scripts/prior_ranks.py", *_prior_args(level_codes[arch], arch), "--max-train-steps", "4",
                      "--output-dir", str(tmp_path / "run"), num_processes=2, RANKS_DIR=ranks)  # fmt: skip
    r0, r1 = torch.load(ranks / "rank0.pt"), torch.load(ranks / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


@pytest.mark.parametrize("arch", ["llama", "depth", "scales", None])
def test_the_codec_round_trips_exactly_at_every_level_it_can_code(level_codes, fashion_batch, arch):
    """With a flat or a next-scale prior (and with the tokenizer alone) every prefix of the levels is a rate;
    a depth prior codes all its levels. Files and archives decode to the codes of those levels and their image."""
    from codec import Codec
    from common.cli import UserError
    from tokenizer import VQVAE

    tok = VQVAE.from_pretrained(str(level_codes["tok-scales" if arch == "scales" else "tok-depth"])).eval()
    meta = json.loads((level_codes["scales" if arch == "scales" else "depth"] / "vqgpt_codes.json").read_text())
    info = PriorInfo.from_dict(meta)
    torch.manual_seed(0)
    prior = build_prior("tiny", info, arch=arch).eval() if arch else None
    images, labels = fashion_batch[0][:6], fashion_batch[1][:6].tolist()
    layout, sizes = info.code_layout, []
    for d in range(1, layout.num_levels + 1):
        if arch == "depth" and d < layout.num_levels:
            with pytest.raises(UserError, match=f"--levels {d}: a depth prior codes the 2 levels of a position together"):
                Codec(tok, prior, info, levels=d)
            continue
        codec = Codec(tok, prior, info if arch else None, levels=d)
        codes = codec.encode_images(images)
        assert codes.shape == (6, layout.length(d))
        assert np.array_equal(codes, layout.flatten(tok.encode(images), d).numpy())
        one = codec.compress(images[0], label=labels[0])
        assert torch.equal(codec.decompress(one), tok.decode(torch.as_tensor(codes[:1]), levels=d)[0])
        archive = codec.compress_archive(codes, labels, info.grid, group=4)
        back, conditions, _, grid = Codec(tok, prior, info if arch else None).decompress_archive(archive)
        assert np.array_equal(back, codes) and conditions == labels and grid == info.grid, "the file says how many levels"
        sizes.append(len(archive))
    assert sizes == sorted(sizes), "more levels, more bytes"
    with pytest.raises(UserError, match=f"--levels {layout.num_levels + 1}: "):
        Codec(tok, prior, info if arch else None, levels=layout.num_levels + 1)
