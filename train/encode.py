"""Tokenize an image dataset once: images -> code grids, saved as a ``datasets`` DatasetDict.

    python -m train.encode --tokenizer runs/tok --dataset fashion_mnist --output-dir runs/codes
    accelerate launch -m train.encode ...   # each process encodes its shard; one dataset is written

Columns: ``codes`` (h*w ids in raster order; int16 when K <= 32768, else int32) and ``label``.
``vqgpt_codes.json`` beside the data records the tokenizer, K, the grid and the class names.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import ClassLabel, Features, Sequence, Value
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm

from tokenizer import VQVAE
from tokenizer.codes import CodeLayout
from common.data import (TrainingDataArguments, DataError, DatasetWriter, ImageTransform, image_loader, load_image_data, model_input,
                         write_splits_index)  # fmt: skip
from common.files import staged
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
                 batch_size: int, accelerator: Accelerator, desc: str, num_workers: int = 1):  # fmt: skip
    """Yield (codes (B, T), labels (B,)) of ``ds`` in order, batch by batch, on the main process (``None``
    elsewhere): every process encodes a share and the main process receives each batch as it is done.

    A map-style split is dealt batch by batch (process p takes batches p, p + P, ...), so the rounds of
    the gather return the batches in the dataset's order; a stream is cut into disjoint shards
    (``split_dataset_by_node``), read once.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    if isinstance(ds, datasets.IterableDataset):
        shard = split_dataset_by_node(ds, rank=rank, world_size=world)
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=transform)
        rounds = None  # unknown: every round asks whether a process still has a batch
    else:
        starts = range(rank * batch_size, len(ds), world * batch_size)
        mine = [i for start in starts for i in range(start, min(start + batch_size, len(ds)))]
        # One worker decodes the next batch of PNGs while the model encodes this one.
        loader = image_loader(ds.select(mine), transform, batch_size, shuffle=False, num_workers=num_workers if mine else 0)
        rounds = -(-len(ds) // (world * batch_size))
    batches, done = iter(loader), 0
    with tqdm(total=rounds, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
        while rounds is None or done < rounds:
            batch = next(batches, None)
            local = None if batch is None else (model.encode(batch["pixel_values"].to(accelerator.device)).flatten(1).cpu().numpy(),
                                                batch["labels"].numpy())  # (B, T): tokenizer.codes, inference mode  # fmt: skip
            parts = gather_object([local]) if world > 1 else [local]
            if rounds is None and all(p is None for p in parts):
                break
            done += 1
            bar.update()
            if accelerator.is_main_process:
                yield from (p for p in parts if p is not None)


def encode_dataset(tokenizer_ref: str, data_args: TrainingDataArguments, output_dir: str, batch_size: int,
                   accelerator: Accelerator) -> dict:  # fmt: skip
    """Encode every split of ``data_args.dataset`` with the tokenizer into ``output_dir``, batch by batch
    (memory holds a batch, not the codes of the split); return the metadata."""
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
    main = accelerator.is_main_process
    with (staged(output_dir) if main else nullcontext()) as tmp:
        for name, ds in (("train", data.train), ("test", data.test)):
            writer = DatasetWriter(os.path.join(tmp, name), features, split=name) if main else None
            for codes, labels in encode_split(model, ds, transform, batch_size, accelerator, f"encode {name}", data_args.num_workers or 1):  # fmt: skip
                writer.write({"codes": codes.astype(dtype), "label": labels})
            if main:
                if not writer.rows:
                    raise DataError(f"encode {name}: no images to encode")
                writer.close()
        if main:
            write_splits_index(tmp, ["train", "test"])
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
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
