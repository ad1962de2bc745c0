"""train.encode: a DatasetDict of code grids that decode to exactly the tokenizer's reconstructions."""

import json

import numpy as np
import torch

from conftest import accelerate_launch
from tokenizer import VQVAE
from common.data import FASHION_MNIST_CLASSES, DataArguments, ImageTransform, image_loader, load_image_data
from train.encode import load_codes


def test_written_dataset_shapes_dtype_labels_and_metadata(chain, fashion):
    codes, meta = load_codes(str(chain["codes"]))
    assert set(codes) == {"train", "test"}
    assert (len(codes["train"]), len(codes["test"])) == (4096, 512)
    assert codes["train"].features["codes"].feature.dtype == "int16"
    assert codes["train"].features["codes"].length == 49
    assert codes["train"].features["label"].names == FASHION_MNIST_CLASSES
    assert codes["train"]["label"][:100] == fashion.train["label"][:100]
    assert codes["test"]["label"] == fashion.test["label"][:512]
    assert meta["num_codes"] == 64 and meta["grid"] == [7, 7] and meta["class_names"] == FASHION_MNIST_CLASSES
    assert meta["tokenizer"] == str(chain["tokenizer"].resolve())
    assert json.loads((chain["codes"] / "vqgpt_codes.json").read_text()) == meta


def test_stored_codes_decode_to_the_tokenizers_reconstructions(chain):
    codes, _ = load_codes(str(chain["codes"]))
    model = VQVAE.from_pretrained(chain["tokenizer"])
    data = load_image_data(DataArguments(max_eval_samples=512))
    loader = image_loader(data.test, ImageTransform(1), 500, shuffle=False)
    stored = torch.tensor(np.asarray(codes["test"].with_format("numpy")["codes"]), dtype=torch.long).view(-1, 7, 7)
    start = 0
    for batch in loader:
        x = batch["pixel_values"]
        idx = stored[start : start + len(x)]
        assert torch.equal(idx, model.encode(x))
        assert torch.equal(model.decode(idx), model.decode(model.encode(x)))
        with torch.no_grad():
            assert torch.equal(model.decode(idx), model(x).reconstruction.clamp(-1, 1))
        start += len(x)
    assert start == 512


def test_two_processes_write_the_same_dataset(chain, tmp_path):
    out = tmp_path / "codes2"
    accelerate_launch("train.encode", "--tokenizer", str(chain["tokenizer"]), "--max-train-samples", "4096",
                      "--max-eval-samples", "512", "--batch-size", "500", "--output-dir", str(out), num_processes=2)  # fmt: skip
    one, _ = load_codes(str(chain["codes"]))
    two, _ = load_codes(str(out))
    for split in ("train", "test"):
        assert one[split]["codes"] == two[split]["codes"]
        assert one[split]["label"] == two[split]["label"]
