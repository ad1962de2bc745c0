"""The sampler: code-only generation, guidance, the KV cache, reproducibility, the command line, errors."""

import dataclasses
import os

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from conftest import last_error_line, python_m
from prior import GUIDANCE_SCHEDULES, PriorInfo, build_prior, generate_codes
from sample import ClassConditionalPipeline
from sample.pipeline import DEFAULT_SAMPLING
from common.data import DataArguments, load_image_data

INFO = PriorInfo(64, 10, [str(i) for i in range(10)], (7, 7), None, (28, 28))
torch.manual_seed(0)
FRESH = build_prior("tiny", INFO).eval()  # untrained: it puts mass on class and null ids too


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.0, 1.0, 1.5, 3.0, -1.0]),
       temperature=st.floats(0.3, 3.0), top_k=st.sampled_from([None, 1, 5, 64, 100]),
       top_p=st.sampled_from([None, 0.5, 0.9, 1.0]), labels=st.lists(st.integers(-1, 9), min_size=1, max_size=4))  # fmt: skip
def test_every_generated_token_is_a_code_id(seed, scale, temperature, top_k, top_p, labels):
    g = torch.Generator().manual_seed(seed)
    codes = generate_codes(FRESH, INFO.layout, 49, torch.tensor(labels), guidance_scale=scale,
                           temperature=temperature, top_k=top_k, top_p=top_p, generator=g)  # fmt: skip
    assert codes.shape == (len(labels), 49)
    assert codes.min() >= 0 and codes.max() < 64


def _greedy_reference(model, first_tokens, steps=49):
    """Greedy decoding by full forwards over the whole prefix: no cache, no guidance."""
    ids = first_tokens[:, None]
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[:, -1, :64].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, 1:]


@pytest.fixture(scope="module")
def pipe(chain):
    return ClassConditionalPipeline.from_pretrained(str(chain["prior"]))


def test_guidance_one_is_conditional_and_zero_is_unconditional(pipe):
    labels = [0, 7, 8, 3]
    cond = torch.tensor([64, 71, 72, 67])
    with torch.no_grad():
        ref_cond = _greedy_reference(pipe.prior, cond)
        ref_null = _greedy_reference(pipe.prior, torch.full((4,), 74))
    greedy = dict(top_k=1, labels=torch.tensor(labels))
    assert torch.equal(generate_codes(pipe.prior, pipe.info.layout, 49, guidance_scale=1.0, **greedy), ref_cond)
    assert torch.equal(generate_codes(pipe.prior, pipe.info.layout, 49, guidance_scale=0.0, **greedy), ref_null)
    # With sampling too: same seed, scale 1 == conditional, scale 0 == the null class.
    s1 = pipe(labels, guidance_scale=1.0, seed=5)
    s0 = pipe(labels, guidance_scale=0.0, seed=5)
    assert torch.equal(s0, pipe(None, num_images=4, guidance_scale=1.0, seed=5))
    assert torch.equal(s1, pipe(labels, guidance_scale=1.0, seed=5)) and not torch.equal(s0, s1)


def test_guided_logits_combine_conditional_and_null_rows(pipe):
    scale = 3.0
    with torch.no_grad():
        l_cond = pipe.prior(input_ids=torch.tensor([[71]])).logits[0, -1, :64]
        l_null = pipe.prior(input_ids=torch.tensor([[74]])).logits[0, -1, :64]
    expected_first = (l_null + scale * (l_cond - l_null)).argmax()
    codes = generate_codes(pipe.prior, pipe.info.layout, 49, torch.tensor([7]), guidance_scale=scale, top_k=1)
    assert codes[0, 0] == expected_first


@pytest.mark.parametrize("schedule", list(GUIDANCE_SCHEDULES))
def test_a_guidance_schedule_sets_the_scale_of_each_code(pipe, schedule):
    """Greedy guided decoding by full forwards, the scale of code t taken from the schedule, is what
    generate_codes emits; "linear" reaches the scale at the last code, "linear-down" starts from it."""
    scale, n, at = 3.0, 49, GUIDANCE_SCHEDULES[schedule]
    assert at(scale, n - 1 if schedule == "linear" else 0, n) == scale and all(1 < at(scale, t, n) <= scale for t in range(n))
    cond, null = torch.tensor([[71], [64]]), torch.full((2, 1), 74)
    with torch.no_grad():
        for t in range(n):
            l_cond, l_null = (pipe.prior(input_ids=ids).logits[:, -1, :64] for ids in (cond, null))
            nxt = (l_null + at(scale, t, n) * (l_cond - l_null)).argmax(-1, keepdim=True)
            cond, null = torch.cat([cond, nxt], 1), torch.cat([null, nxt], 1)
    codes = generate_codes(pipe.prior, pipe.info.layout, n, torch.tensor([7, 0]), guidance_scale=scale, top_k=1, guidance_schedule=schedule)  # fmt: skip
    assert torch.equal(codes, cond[:, 1:])
    if schedule != "constant":
        assert not torch.equal(codes, generate_codes(pipe.prior, pipe.info.layout, n, torch.tensor([7, 0]), guidance_scale=scale, top_k=1))
    with pytest.raises(ValueError, match="guidance_schedule 'cosine'; expected one of"):
        generate_codes(pipe.prior, pipe.info.layout, n, torch.tensor([7]), guidance_schedule="cosine")


def test_greedy_with_and_without_cache_and_fixed_seed(pipe):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    for scale in (1.0, 2.0):
        transformers_logging.warning_once.cache_clear()  # a warning given once in the session is given again
        with CaptureLogger(transformers_logging.get_logger("transformers")) as logged:
            with_cache = generate_codes(pipe.prior, pipe.info.layout, 49, labels, guidance_scale=scale, top_k=1, use_cache=True)
        assert "deprecated" not in logged.out, logged.out  # the cache is passed by the name the installed version takes
        without = generate_codes(pipe.prior, pipe.info.layout, 49, labels, guidance_scale=scale, top_k=1, use_cache=False)
        assert torch.equal(with_cache, without)
    a = pipe(["Sneaker", "Bag"], guidance_scale=2.0, temperature=1.0, top_k=20, seed=123)
    b = pipe(["Sneaker", "Bag"], guidance_scale=2.0, temperature=1.0, top_k=20, seed=123)
    assert a.shape == (2, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert torch.equal(a, pipe([7, 8], guidance_scale=2.0, temperature=1.0, top_k=20, seed=123)), "names == ids"


def test_a_prior_samples_at_its_own_settings_unless_a_call_names_others(pipe):
    """train.prior records its --sample-* settings in the prior's config; a call's unnamed settings are those."""
    assert pipe.sampling_settings() == pipe.info.sampling == DEFAULT_SAMPLING  # the chain's prior: the defaults
    own = dict(guidance_scale=1.5, temperature=0.8, top_k=0, top_p=0.9, guidance_schedule="linear")
    tuned = ClassConditionalPipeline(pipe.prior, pipe.tokenizer, dataclasses.replace(pipe.info, sampling=own))
    assert tuned.sampling_settings(top_k=5) == {**own, "top_k": 5, "deep_temperature": None, "deep_top_k": None}
    labels = [3, 7, 7, 9]
    assert torch.equal(tuned(labels, seed=1), pipe(labels, seed=1, **own))
    assert not torch.equal(tuned(labels, seed=1), pipe(labels, seed=1))
    assert torch.equal(tuned(labels, seed=1, **DEFAULT_SAMPLING), pipe(labels, seed=1)), "a call's settings win"
    saved_before = ClassConditionalPipeline(pipe.prior, pipe.tokenizer, dataclasses.replace(pipe.info, sampling=None))
    assert saved_before.sampling_settings() == DEFAULT_SAMPLING
    with pytest.raises(TypeError, match="unknown sampling settings"):
        pipe.sampling_settings(guidance=2.0)


def test_cli_writes_an_imagefolder_and_a_grid(chain, tmp_path):
    out = tmp_path / "samples"
    proc = python_m("sample", "--prior", str(chain["prior"]), "--classes", "0,3,Sneaker", "--per-class", "4", "--grid-columns", "3",
                    "--guidance-scale", "2", "--guidance-schedule", "linear", "--seed", "0", "--output-dir", str(out))  # fmt: skip
    assert "wrote 12 samples of 3 classes" in proc.stdout
    assert "sampling at guidance_scale 2.0, temperature 1.0, top_k 100, top_p 1.0, guidance_schedule linear" in proc.stdout, "the rest the prior's"
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 12, "grid.png is not a sample"
    assert sorted(ds["label"]) == sorted(["T-shirt/top"] * 4 + ["Dress"] * 4 + ["Sneaker"] * 4)
    assert ds[0]["image"].size == (28, 28)
    assert sorted(os.listdir(out)) == ["Dress", "Sneaker", "T-shirt-top", "grid.png", "metadata.jsonl"]
    # vqgpt's own data module reads the samples back as a labelled dataset too.
    data = load_image_data(DataArguments(dataset=str(out), test_fraction=0.25))
    assert data.class_names == ["Dress", "Sneaker", "T-shirt/top"] and len(data.train) + len(data.test) == 12
    grid = Image.open(out / "grid.png")
    margin = 8 + 7 * len("T-shirt/top")  # the longest class name's margin
    assert (grid.width, grid.height) == (margin + 3 * 30, 3 * 30), "3 rows of the first 3 samples (28 px + gutters)"


def test_bad_classes_and_priors_fail_clearly(chain, pipe, tmp_path):
    with pytest.raises(ValueError) as e:
        pipe(["Sneaker", "Unicorn"])
    assert "unknown class 'Unicorn'" in str(e.value) and "'Ankle boot'" in str(e.value)
    with pytest.raises(ValueError, match=r"class id 10 is out of range; expected 0..9"):
        pipe([10])
    proc = python_m("sample", "--prior", str(chain["prior"]), "--classes", "Unicorn", "--output-dir", str(tmp_path / "s"), check=False)  # fmt: skip
    assert proc.returncode == 1 and "unknown class 'Unicorn'" in last_error_line(proc)
    # A prior without a tokenizer reference.
    orphan = tmp_path / "orphan"
    model = build_prior("tiny", INFO)
    model.save_pretrained(orphan)
    with pytest.raises(ValueError, match="names no tokenizer"):
        ClassConditionalPipeline.from_pretrained(str(orphan))
    proc = python_m("sample", "--prior", str(orphan), "--output-dir", str(tmp_path / "s"), check=False)
    assert proc.returncode == 1 and "names no tokenizer" in last_error_line(proc)
