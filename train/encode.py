"""Tokenize an image dataset once: images -> code grids, saved as a ``datasets`` DatasetDict.

    python -m train.encode --tokenizer runs/tok --dataset fashion_mnist --output-dir runs/codes
    accelerate launch -m train.encode ...   # each process encodes its shard; one dataset is written

Columns: ``codes`` (h*w ids in raster order; int16 when K <= 32768, else int32) and ``label``.
``vqgpt_codes.json`` beside the data records the tokenizer, K, the grid and the class names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import ClassLabel, Features, Sequence, Value
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm

from tokenizer import VQVAE
from tokenizer.codes import CodeLayout
from common.data import (TrainingDataArguments, DataError, ImageTransform, atomic_save_to_disk, image_loader,
                        load_image_data, model_input)  # fmt: skip
from common.cli import option, parse_args, run_main

META_FILE = "vqgpt_codes.json"


@dataclass
class EncodeArguments:
    tokenizer: str = option(None, "Tokenizer folder (train.tokenizer output) or Hub id.")
    output_dir: str = option("runs/codes", "Where the DatasetDict is written.")
    batch_size: int = option(1024, "Images per forward pass.", domain="positive")
    overwrite: bool = option(False, "Re-encode even if output_dir holds codes.")


def tokenizer_reference(ref: str) -> str:
    """A local folder becomes an absolute path (it must survive a change of directory); a Hub id stays."""
    return os.path.abspath(ref) if os.path.isdir(ref) else ref


def load_codes(path: str) -> tuple[datasets.DatasetDict, dict]:
    """A folder written by :func:`encode_dataset` -> (DatasetDict, metadata)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path} has no {META_FILE}; expected a folder written by train.encode")
    with open(meta_path) as f:
        return datasets.load_from_disk(path), json.load(f)


def encode_split(model: VQVAE, ds: datasets.Dataset | datasets.IterableDataset, transform: ImageTransform,
                 batch_size: int, accelerator: Accelerator, desc: str, num_workers: int = 1) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """This process's share of ``ds`` -> (codes (n, h*w), labels (n,)), gathered on every process.

    A map-style split is cut into contiguous index ranges; a stream into disjoint shards
    (``split_dataset_by_node``), read once, in order.
    """
    if isinstance(ds, datasets.IterableDataset):
        shard = split_dataset_by_node(ds, rank=accelerator.process_index, world_size=accelerator.num_processes)
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=transform)
    else:
        with accelerator.split_between_processes(list(range(len(ds)))) as mine:
            # One worker decodes the next batch of PNGs while the model encodes this one.
            loader = image_loader(ds.select(mine), transform, batch_size, shuffle=False, num_workers=num_workers)
    codes, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True):
        idx = model.encode(batch["pixel_values"].to(accelerator.device))  # (B, h, w) or (B, T), inference mode
        codes.append(idx.flatten(1).cpu())  # (B, T): tokenizer.codes
        labels.append(batch["labels"])
    local = (torch.cat(codes).numpy(), torch.cat(labels).numpy()) if codes else (np.zeros((0, 0)), np.zeros(0))
    parts = gather_object([local]) if accelerator.num_processes > 1 else [local]
    parts = [p for p in parts if len(p[1])]
    if not parts:
        raise DataError(f"{desc}: no images to encode")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def encode_dataset(tokenizer_ref: str, data_args: TrainingDataArguments, output_dir: str, batch_size: int,
                   accelerator: Accelerator) -> dict:  # fmt: skip
    """Encode every split of ``data_args.dataset`` with the tokenizer; write ``output_dir``; return metadata."""
    model = VQVAE.from_pretrained(tokenizer_ref).to(accelerator.device).eval()
    with accelerator.main_process_first():
        data = load_image_data(data_args)
    cfg = model.config
    if data.channels != cfg.in_channels:  # the colour rule of every command (common.data.model_transform)
        kind = "grayscale" if data.channels == 1 else "colour"
        want = "grayscale (1 channel)" if cfg.in_channels == 1 else "colour (3 channels)"
        raise DataError(f"dataset {data_args.dataset}'s images are {kind} but the tokenizer takes {want}; "
                        f"pass --image-channels {cfg.in_channels} to convert every image")  # fmt: skip
    f = model.downsample_factor
    transform, (h, w), _ = model_input(data, data_args, cfg.in_channels, f)
    layout = model.code_layout(h, w)  # tokenizer.codes: every level, flattened level after level
    dtype = "int16" if cfg.num_codes <= 32768 else "int32"
    features = Features({
        "codes": Sequence(Value(dtype), length=layout.length()),
        "label": ClassLabel(names=data.class_names) if data.class_names else Value("int64"),
    })  # fmt: skip
    splits = {}
    for name, ds in (("train", data.train), ("test", data.test)):
        codes, labels = encode_split(model, ds, transform, batch_size, accelerator, f"encode {name}", data_args.num_workers or 1)  # fmt: skip
        splits[name] = datasets.Dataset.from_dict({"codes": codes.astype(dtype), "label": labels}, features=features)
    meta = {
        "tokenizer": tokenizer_reference(tokenizer_ref),
        "num_codes": cfg.num_codes,
        "grid": [h // f, w // f],
        "levels": layout.to_json(),
        "class_names": data.class_names,
        "dataset": data_args.dataset,
        "image_size": [h, w],
        "channels": cfg.in_channels,
    }
    if accelerator.is_main_process:
        atomic_save_to_disk(datasets.DatasetDict(splits), output_dir, {META_FILE: json.dumps(meta, indent=2)})
    accelerator.wait_for_everyone()
    return meta


def main(argv=None):
    args, data_args = parse_args((EncodeArguments, TrainingDataArguments), argv)
    if not args.tokenizer:
        raise ValueError("--tokenizer is required: a train.tokenizer output folder or a Hub id")
    accelerator = Accelerator()
    if os.path.exists(os.path.join(args.output_dir, META_FILE)) and not args.overwrite:
        _, meta = load_codes(args.output_dir)
        if (meta["tokenizer"], meta["dataset"]) != (tokenizer_reference(args.tokenizer), data_args.dataset):
            raise ValueError(f"{args.output_dir} holds codes of {meta['dataset']} by {meta['tokenizer']}; pass --overwrite to replace them")  # fmt: skip
        accelerator.print(f"{args.output_dir} already holds these codes; reusing them (pass --overwrite to re-encode)")
        return
    meta = encode_dataset(args.tokenizer, data_args, args.output_dir, args.batch_size, accelerator)
    accelerator.print(f"codes written to {args.output_dir}: {CodeLayout.from_json(meta['levels']).describe()}, K={meta['num_codes']}")


if __name__ == "__main__":
    run_main(main)
