"""Every entry point, every kind of bad input: one line on stderr naming the option or the file, the right
exit status, no traceback, and nothing written. New entry points add their rows to ROWS.

Exit status 2: the command line itself is wrong (unknown option, value outside its domain); 1: the
command line is well formed but names something unusable (a missing or wrong folder, a bad dataset).
The rows run through tests/scripts/cli_rows.py: each as ``python -m`` runs it, in a forked process.
Progress bars (tqdm's, e.g. datasets building the cache of an image folder) are progress, not messages:
they are set aside before counting the lines.
"""

import hashlib
import json
import os
import re
import sys

import datasets
import pytest
from PIL import Image

from conftest import ROOT, python_m, run

PROGRESS = re.compile(r"^[^:]*: +(\d+%\||\d+ \w+ \[)")  # "Generating train split: 12 examples [..." or "name:  40%|..."
X = "{out}/x"  # an output path inside a folder of earlier results, which must stay untouched

# (entry point, arguments, exit status, words the one line must contain)
ROWS = [
    # train.tokenizer: options outside their domain, unusable data, wrong model folders
    ("train.tokenizer", ["--max-train-steps", "0"], 2, ["--max-train-steps", "0", "positive"]),
    ("train.tokenizer", ["--preset", "huge"], 2, ["--preset", "huge", "fashion-mnist"]),
    ("train.tokenizer", ["--num-downsamples", "0"], 2, ["--num-downsamples", "0", "positive"]),
    ("train.tokenizer", ["--learning-rate", "-1"], 2, ["--learning-rate", "-1"]),
    ("train.tokenizer", ["--disc-weight", "-0.5"], 2, ["--disc-weight", "-0.5"]),
    ("train.tokenizer", ["--pixel-loss", "l3"], 2, ["--pixel-loss", "l3"]),
    ("train.tokenizer", ["--bogus-option", "3"], 2, ["unrecognized", "--bogus-option"]),
    ("train.tokenizer", ["--dataset", "/no/such/data"], 1, ["/no/such/data"]),
    ("train.tokenizer", ["--dataset", "{mixed}"], 1, ["grayscale", "--image-channels"]),
    ("train.tokenizer", ["--dataset", "{sizes}"], 1, ["32x32", "--resolution"]),
    ("train.tokenizer", ["--dataset", "{strings}"], 1, ["image column 'image'", "not images"]),
    ("train.tokenizer", ["--dataset", "{floats}"], 1, ["label column 'label'", "float", "not integers"]),
    ("train.tokenizer", ["--only-classes", "Unicorn"], 1, ["--only-classes", "Unicorn"]),
    ("train.tokenizer", ["--classifier", "{tok}"], 1, ["holds a tokenizer", "not a classifier"]),
    ("train.tokenizer", ["--resume-from-checkpoint", "/no/ckpt"], 1, ["/no/ckpt", "does not exist"]),
    # train.tokenizer: levels of codes
    ("train.tokenizer", ["--quantizer", "residual", "--levels", "0"], 2, ["--levels", "0", "positive"]),
    ("train.tokenizer", ["--levels", "3"], 2, ["--levels 3", "--quantizer residual"]),
    ("train.tokenizer", ["--shared-codebook"], 2, ["--shared-codebook", "--quantizer residual"]),
    ("train.tokenizer", ["--quantizer", "residual", "--levels", "2", "--quantizer-dropout", "1.5"], 2, ["--quantizer-dropout", "1.5"]),  # fmt: skip
    ("train.tokenizer", ["--quantizer", "residual", "--levels", "2", "--codebook-dim", "8"], 2, ["--codebook-dim", "one level"]),  # fmt: skip
    ("train.tokenizer", ["--quantizer", "fsq"], 2, ["--quantizer", "fsq", "residual", "gumbel"]),
    ("train.tokenizer", ["--gumbel-anneal-steps", "10"], 2, ["--gumbel-anneal-steps", "--quantizer gumbel"]),
    ("train.tokenizer", ["--quantizer", "multiscale", "--scales", "1,4,2"], 2, ["--scales 1,4,2", "increasing"]),
    ("train.tokenizer", ["--quantizer", "multiscale", "--scales", "1,2,4,8"], 1, ["end at 8x8", "7x7", "the last scale must be the grid"]),  # fmt: skip
    # train.encode
    ("train.encode", [], 1, ["--tokenizer is required"]),
    ("train.encode", ["--tokenizer", "{prior}"], 1, ["holds a prior", "not a tokenizer"]),
    ("train.encode", ["--tokenizer", "{bad_tok}"], 1, ["model.safetensors", "truncated or corrupt"]),
    ("train.encode", ["--tokenizer", "{tok}", "--batch-size", "0"], 2, ["--batch-size", "0"]),
    # train.prior
    ("train.prior", ["--codes", "/no/codes"], 1, ["/no/codes"]),
    ("train.prior", ["--codes", "{tok}"], 1, ["vqgpt_codes.json", "train.encode"]),
    ("train.prior", ["--codes", "{codes}", "--p-uncond", "1.5"], 2, ["--p-uncond", "1.5", "[0, 1]"]),
    ("train.prior", ["--codes", "{codes}", "--arch", "bert"], 2, ["--arch", "bert", "llama"]),
    ("train.prior", ["--codes", "{codes}", "--sample-top-p", "0"], 2, ["--sample-top-p", "0"]),
    ("train.prior", ["--codes", "{codes}", "--max-train-steps", "0"], 2, ["--max-train-steps", "0"]),
    ("train.prior", ["--codes", "{codes_levels}", "--levels", "3"], 1, ["--levels 3", "2 levels", "expected 1 to 2"]),
    ("train.prior", ["--codes", "{codes_levels}", "--levels", "0"], 2, ["--levels", "0", "positive"]),
    ("train.prior", ["--codes", "{codes}", "--arch", "depth"], 1, ["a depth prior models 2 or more levels of one grid, not a 7x7 grid", "--arch llama"]),  # fmt: skip
    ("train.prior", ["--codes", "{codes_levels}", "--arch", "depth", "--levels", "1"], 1, ["a depth prior", "not a 7x7 grid"]),
    ("train.prior", ["--codes", "{codes_levels}", "--depth-layers", "2"], 2, ["--depth-layers 2", "--arch depth", "--arch gpt2"]),
    # train.classifier
    ("train.classifier", ["--width", "0"], 2, ["--width", "0"]),
    ("train.classifier", ["--dropout", "1.5"], 2, ["--dropout", "1.5"]),
    # python -m sample: model folders of every wrong kind, sampling options outside their domains
    ("sample", ["--prior", "/no/prior"], 1, ["/no/prior", "no such folder"]),
    ("sample", ["--prior", "{tok}"], 1, ["holds a tokenizer", "not a prior"]),
    ("sample", ["--prior", "{clf}"], 1, ["holds a classifier", "not a prior"]),
    ("sample", ["--prior", "{empty}"], 1, ["holds no model"]),
    ("sample", ["--prior", "{bad_config}"], 1, ["config.json is corrupt"]),
    ("sample", ["--prior", "{bad_prior}"], 1, ["model.safetensors", "truncated or corrupt"]),
    ("sample", ["--prior", "someone/no-such-prior"], 1, ["someone/no-such-prior", "cannot be reached"]),
    ("sample", ["--prior", "{prior}", "--tokenizer", "{prior}"], 1, ["holds a prior", "not a tokenizer"]),
    ("sample", ["--prior", "{prior}", "--guidance-scale", "-1"], 2, ["--guidance-scale", "-1"]),
    ("sample", ["--prior", "{prior}", "--temperature", "-0.5"], 2, ["--temperature", "-0.5"]),
    ("sample", ["--prior", "{prior}", "--top-p", "0"], 2, ["--top-p", "0", "(0, 1]"]),
    ("sample", ["--prior", "{prior}", "--top-k", "-3"], 2, ["--top-k", "-3"]),
    ("sample", ["--prior", "{prior}", "--per-class", "0"], 2, ["--per-class", "0", "positive"]),
    ("sample", ["--prior", "{prior}", "--classes", "Unicorn"], 1, ["Unicorn"]),
    ("sample", ["--prior", "{prior_levels}", "--tokenizer", "{tok}"], 1, ["the tokenizer makes a 7x7 grid", "the prior models 2 levels of 7x7"]),
    ("sample", ["--prior", "{prior_depth}", "--tokenizer", "{tok}"], 1, ["the tokenizer makes a 7x7 grid", "the prior models 2 levels of 7x7"]),
    ("sample", ["--prior", "{prior_depth}", "--deep-temperature", "-1"], 2, ["--deep-temperature", "-1"]),
    # tokenizer.push
    ("tokenizer.push", ["{prior}", "user/repo"], 1, ["holds a prior", "not a tokenizer"]),
    ("tokenizer.push", ["/no/run", "user/repo"], 1, ["/no/run"]),
    ("tokenizer.push", ["{tok}", "user/repo"], 1, ["offline"]),
    # python -m evaluation
    ("evaluation", ["--samples", "/no/samples"], 2, ["--samples", "/no/samples"]),
    ("evaluation", ["--prior", "{prior}", "--classifier", "{tok}"], 1, ["holds a tokenizer", "not a classifier"]),
    ("evaluation", ["--prior", "{prior}", "--per-class", "0"], 2, ["--per-class", "0"]),
    ("evaluation", ["--prior", "{prior}", "--classifier", "{clf}", "--spaces", "{tok}"], 1, ["holds a tokenizer", "not a classifier"]),
    ("evaluation", ["--samples", "{mixed}", "--classifier", "{clf}"], 1, ["classes ['a', 'b']", "the classifier does not know"]),
    # python -m codec
    ("codec", ["frobnicate", "--prior", "{prior}", "--output", X], 2, ["frobnicate", "compress"]),
    ("codec", ["compress", "--prior", "{prior}", "--input", "/no/img.png", "--output", X], 2, ["--input", "/no/img.png"]),
    ("codec", ["compress", "--prior", "{prior}", "--group", "0", "--output", X], 2, ["--group", "0"]),
    ("codec", ["decompress", "--prior", "{prior}", "--input", "{png}", "--output", X], 1, ["not a vqgpt codec file"]),
    ("codec", ["decompress", "--prior", "{prior}", "--input", "{truncated}", "--output", X], 1, ["truncated.vqg", "truncated"]),
    ("codec", ["decompress", "--prior", "{prior}", "--input", "{tok_only}", "--output", X], 1, ["tok_only.vqg", "no prior"]),
    ("codec", ["compress", "--prior", "{prior}", "--input", "{mixed}", "--output", X], 1, ["colour", "the tokenizer takes grayscale", "--image-channels 1"]),  # fmt: skip
    ("codec", ["compress", "--prior", "{prior}", "--input", "{png}", "--image-channels", "3", "--output", X], 2, ["--image-channels 3", "1 channel"]),  # fmt: skip
    ("codec", ["decompress", "--prior", "{prior}", "--input", "{png}", "--streaming"], 2, ["unrecognized", "--streaming"]),
    ("codec", ["compress", "--prior", "{prior_levels}", "--levels", "3", "--input", "{png}", "--output", X], 1, ["--levels 3", "the prior models 2 levels of 7x7", "expected 1 to 2"]),  # fmt: skip
    ("codec", ["compress", "--prior", "{prior_depth}", "--levels", "1", "--input", "{png}", "--output", X], 1, ["--levels 1", "a depth prior codes the 2 levels of a position together"]),  # fmt: skip
    ("codec", ["compress", "--tokenizer", "{tok}", "--levels", "2", "--input", "{png}", "--output", X], 1, ["--levels 2", "the tokenizer makes 1 level", "expected 1 to 1"]),  # fmt: skip
    ("codec", ["compress", "--tokenizer", "{tok_levels}", "--levels", "3", "--input", "{png}", "--output", X], 1, ["--levels 3", "the tokenizer makes 2 levels", "expected 1 to 2"]),  # fmt: skip
    # python -m anomaly
    ("anomaly", ["--prior", "{prior}", "--fpr", "1.5"], 2, ["--fpr", "1.5"]),
    ("anomaly", ["--prior", "{clf}"], 1, ["holds a classifier", "not a prior"]),
    ("anomaly", ["--prior", "{prior}", "--max-eval-samples", "20", "--normal-classes", "Unicorn"], 1, ["--normal-classes", "Unicorn"]),
    ("anomaly", ["--prior", "{prior}", "--max-eval-samples", "20", "--condition", "Unicorn"], 2, ["--condition", "Unicorn"]),
    ("anomaly", ["--prior", "{prior}", "--reference", "train"], 2, ["--reference train", "--normal-classes"]),
    ("anomaly", ["--prior", "{prior}", "--reference", "{out}/nowhere"], 2, ["--reference", "nowhere"]),
    ("anomaly", ["--prior", "{prior}", "--knn-k", "0"], 2, ["--knn-k", "0"]),
    ("anomaly", ["--prior", "{prior}", "--input", "{mixed}"], 1, ["colour", "the tokenizer takes grayscale", "--image-channels 1"]),
    ("anomaly", ["--prior", "{prior}", "--input", "{empty}", "--normal-classes", "0", "--reference", "train"], 2, ["--reference train", "--input"]),  # fmt: skip
    # python -m features
    ("features", ["frobnicate"], 2, ["frobnicate", "extract, index, search or cluster"]),
    ("features", ["extract"], 2, ["--tokenizer is required"]),
    ("features", ["extract", "--tokenizer", "{tok}", "--input", "{empty}"], 1, ["contains no images"]),
    ("features", ["index", "--tokenizer", "{tok}", "--max-train-samples", "16", "--feature", "quantized_1"], 2, ["--feature quantized_1", "this tokenizer gives"]),  # fmt: skip
    ("features", ["search", "--index", "{index}", "--input", "{png}", "-k", "0"], 2, ["-k 0", "positive"]),
    ("features", ["search", "--index", "{index}", "--input", "{png}", "-k", "17"], 2, ["-k 17", "holds 16 images"]),
    ("features", ["search", "--index", "{index}", "--input", "{big}"], 1, ["32x32", "28x28 images", "resize"]),
    ("features", ["search", "--index", "{index}", "--input", "{rgb}"], 1, ["colour", "grayscale", "--image-channels 1"]),
    ("features", ["search", "--index", "{index}", "--tokenizer", "{tok_levels}", "--input", "{png}"], 1, ["other weights", "rebuild the index"]),  # fmt: skip
    ("features", ["search", "--index", "{empty}", "--input", "{png}"], 1, ["not an index folder"]),
    ("features", ["search", "--index", "{index}", "--input", "{empty}"], 1, ["contains no images"]),
    # the demo
    ("demo.py", ["--tokenizer-steps", "0"], 2, ["--tokenizer-steps", "0"]),
    ("demo.py", ["--preset", "huge"], 2, ["--preset", "huge"]),
    ("demo.py", ["--grid", "9"], 2, ["--grid", "9"]),
]
OUTPUT_OPTION = {"train.tokenizer": "--output-dir", "train.encode": "--output-dir", "train.prior": "--output-dir",
                 "train.classifier": "--output-dir", "sample": "--output-dir", "anomaly": "--output-dir",
                 "evaluation": "--output-json", "demo.py": "--out", "features": "--output-dir"}  # fmt: skip


def _digest(folder):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        h.update(root.encode())
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def _bad_inputs(root, chain, fashion):
    """The wrong things users pass: damaged copies of the chain's models, bad datasets, non-codec files."""
    paths = {k: str(v) for k, v in chain.items() if k != "root"}
    paths.update(tok=paths["tokenizer"], clf=paths["classifier"])
    for name, src, damage in (("bad_prior", "prior", "weights"), ("bad_config", "prior", "config"), ("bad_tok", "tokenizer", "weights")):
        dst = root / name
        dst.mkdir()
        for f in ("config.json", "model.safetensors", "generation_config.json"):
            if (chain[src] / f).exists():
                (dst / f).write_bytes((chain[src] / f).read_bytes())
        if damage == "weights":
            (dst / "model.safetensors").write_bytes((dst / "model.safetensors").read_bytes()[:1000])
        else:
            (dst / "config.json").write_text('{"model_type": "gpt2", "vqgpt": {"num_codes": ')
        paths[name] = str(dst)
    (root / "empty").mkdir()
    paths["empty"] = str(root / "empty")
    gray = [Image.open(__import__("io").BytesIO(r["image"]["bytes"])) for r in fashion.test.select(range(12))]
    for name, images in (("mixed", gray[:6] + [g.convert("RGB") for g in gray[6:]]),
                         ("sizes", gray[:6] + [g.resize((32, 32)) for g in gray[6:]])):  # fmt: skip
        for i, img in enumerate(images):
            d = root / name / ("a" if i < 6 else "b")
            d.mkdir(parents=True, exist_ok=True)
            img.save(d / f"{i:02d}.png")
        paths[name] = str(root / name)
    datasets.Dataset.from_dict({"image": [f"img{i}" for i in range(8)], "label": [i % 2 for i in range(8)]}).save_to_disk(str(root / "strings"))  # fmt: skip
    datasets.Dataset.from_dict({"image": gray[:8], "label": [0.5 * i for i in range(8)]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("float32")})
                               ).save_to_disk(str(root / "floats"))  # fmt: skip
    paths.update(strings=str(root / "strings"), floats=str(root / "floats"))
    gray[0].save(root / "photo.png")
    gray[0].resize((32, 32)).save(root / "big.png")
    gray[0].convert("RGB").save(root / "rgb.png")
    paths.update(png=str(root / "photo.png"), big=str(root / "big.png"), rgb=str(root / "rgb.png"))
    python_m("features", "index", "--tokenizer", paths["tok"], "--max-train-samples", "16", "--exact", "--output-dir", str(root / "index"))
    paths["index"] = str(root / "index")
    # A tokenizer with two residual levels (untrained: its codes are codes all the same) and its codes.
    from tokenizer import VQVAE, get_config

    VQVAE(get_config("tiny", quantizer="residual", levels=2)).save_pretrained(root / "tok_levels")
    python_m("train.encode", "--tokenizer", str(root / "tok_levels"), "--max-train-samples", "64", "--max-eval-samples", "32",
             "--output-dir", str(root / "codes_levels"))  # fmt: skip
    paths.update(tok_levels=str(root / "tok_levels"), codes_levels=str(root / "codes_levels"))
    python_m("train.prior", "--codes", str(root / "codes_levels"), "--preset", "tiny", "--max-train-steps", "1", "--train-batch-size", "8",
             "--eval-steps", "100", "--checkpointing-steps", "100", "--output-dir", str(root / "prior_levels"))  # fmt: skip
    paths["prior_levels"] = str(root / "prior_levels")
    python_m("train.prior", "--codes", str(root / "codes_levels"), "--arch", "depth", "--preset", "tiny", "--max-train-steps", "1",
             "--train-batch-size", "8", "--eval-steps", "100", "--checkpointing-steps", "100", "--output-dir", str(root / "prior_depth"))  # fmt: skip
    paths["prior_depth"] = str(root / "prior_depth")
    python_m("codec", "compress", "--prior", paths["prior"], "--input", paths["png"], "--output", str(root / "full.vqg"))
    (root / "truncated.vqg").write_bytes((root / "full.vqg").read_bytes()[:15])
    python_m("codec", "compress", "--tokenizer", paths["tok"], "--input", paths["png"], "--output", str(root / "tok_only.vqg"))
    paths.update(truncated=str(root / "truncated.vqg"), tok_only=str(root / "tok_only.vqg"))
    return paths


@pytest.fixture(scope="module")
def results(chain, fashion, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    paths = _bad_inputs(root, chain, fashion)
    out = root / "earlier"
    out.mkdir()
    (out / "keep.txt").write_text("results of an earlier run")
    paths["out"] = str(out)
    before, listing = _digest(out), sorted(os.listdir(root))
    rows = []
    for entry, args, _, _ in ROWS:
        argv = [entry, *(a.format(**paths) for a in args)]
        if entry in OUTPUT_OPTION and OUTPUT_OPTION[entry] not in argv:
            argv += [OUTPUT_OPTION[entry], str(out) if entry.startswith("train.") else X.format(out=out)]
        rows.append({"argv": argv, "env": {}})
    rows.append({"argv": ["sample", "--prior", "/no/prior", "--output-dir", X.format(out=out)], "env": {"VQGPT_DEBUG": "1"}})
    (root / "rows.json").write_text(json.dumps(rows))
    run([sys.executable, os.path.join(ROOT, "tests", "scripts", "cli_rows.py"), str(root / "rows.json"), str(root / "results.json")],
        timeout=900, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1)  # fmt: skip
    got = json.loads((root / "results.json").read_text())
    return {"rows": got, "unchanged": _digest(out) == before and sorted(os.listdir(root)) == sorted(listing + ["results.json", "rows.json"])}  # fmt: skip


@pytest.mark.parametrize("i", range(len(ROWS)), ids=[f"{r[0]} {' '.join(r[1])}"[:70] for r in ROWS])
def test_bad_invocation_is_one_clear_line(results, i):
    entry, args, status, needles = ROWS[i]
    r = results["rows"][i]
    lines = [line for line in r["stderr"].replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.match(line)]
    assert r["rc"] == status and len(lines) == 1 and "Traceback" not in r["stderr"], (r["rc"], r["stderr"][-3000:])
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_nothing_written_by_bad_invocations(results):
    assert results["unchanged"]


def test_debug_shows_the_traceback(results):
    r = results["rows"][-1]
    assert r["rc"] == 1 and "Traceback (most recent call last)" in r["stderr"] and "/no/prior" in r["stderr"]
