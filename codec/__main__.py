"""Compress images with a tokenizer and its prior; decompress them to the tokenizer's reconstructions.

    python -m codec compress --prior runs/prior --input photo.png --output photo.vqg
    python -m codec compress --prior runs/prior --input images/ --output images.vqga     # one archive
    python -m codec compress --prior runs/prior --input images/ --output coded/           # a file per image
    python -m codec compress --prior runs/prior --dataset fashion_mnist --split test --output test.vqga
    python -m codec decompress --prior runs/prior --input test.vqga --output decoded/

An input folder keeps its layout; images under <class>/ folders named like the prior's classes are coded
with that class, others with the null class (--class names one for all). Without --prior (--tokenizer
only) codes are stored at ceil(log2 K) bits each. Of multi-level codes, --levels d codes the first d
levels (the rate: every prefix decodes, coarser); decompress reads the levels from the file.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from common.cli import UsageError, option, parse_args, run_main
from common.data import DataArguments, image_batches, load_image_data, model_transform, read_images
from common.files import atomic_file, atomic_write_bytes, staged
from common.images import to_pil

from .codec import ArchiveWriter, Codec

ARCHIVE_SUFFIX, FILE_SUFFIX = ".vqga", ".vqg"


@dataclass
class ModelArguments:
    prior: str | None = option(None, "Prior folder or Hub id (and the tokenizer it names).")
    tokenizer: str | None = option(None, "Tokenizer folder or Hub id: overrides the prior's, or codes without a prior.")
    levels: int | None = option(None, "compress: of multi-level codes, code the first d levels (the rate); default all the prior models. decompress reads it from the file.", domain="positive")  # fmt: skip

    def validate(self) -> None:
        if self.prior is None and self.tokenizer is None:
            raise UsageError("pass --prior (entropy coding with its distributions) or --tokenizer (fixed-width codes)")


@dataclass
class CompressArguments:
    output: str = option(None, "NAME.vqg (one image), NAME.vqga (one archive) or a folder (a .vqg per image).")
    input: str | None = option(None, "An image or a folder of images; unset: a split of --dataset.")
    split: str = option("test", "With --dataset: the split to compress.", choices=["train", "test"])
    class_name: str | None = option(None, "Code every input image with this class (default: its <class>/ folder, else the null class).")  # fmt: skip
    group: int = option(256, "Images coded as one batch in an archive (the decoder's batch).", domain="positive")
    batch_size: int = option(256, "Images encoded by the tokenizer at once.", domain="positive")

    def validate(self) -> None:
        if self.output is None:
            raise UsageError("--output is required")
        if self.input is not None and not os.path.exists(self.input):
            raise UsageError(f"--input {self.input!r}: no such file or folder")


@dataclass
class DecompressArguments:
    input: str = option(None, "A .vqg file, a .vqga archive or a folder of .vqg files.")
    output: str = option(None, "An image (for one .vqg file) or a folder.")

    def validate(self) -> None:
        if self.input is None:
            raise UsageError("decompress needs --input: a .vqg file, a .vqga archive or a folder of .vqg files")
        if self.output is None:
            raise UsageError("--output is required")
        if not os.path.exists(self.input):
            raise UsageError(f"--input {self.input!r}: no such file or folder")


COMMANDS = {"compress": (CompressArguments, DataArguments), "decompress": (DecompressArguments,)}


def _inputs(args: CompressArguments, data_args: DataArguments, codec: Codec):
    """(batches of (images, labels, names or None), number of images, names given?) from --input or --dataset,
    read one batch at a time."""
    transform = model_transform(data_args, codec.tokenizer.config.in_channels, "the tokenizer")
    names_known = codec.info.class_names if codec.info else []
    if args.class_name is not None and args.class_name not in names_known:
        raise UsageError(f"--class-name {args.class_name!r}: expected one of the prior's classes {names_known}")
    if args.input is None:  # a dataset split
        data = load_image_data(data_args)
        ds = data.test if args.split == "test" else data.train
        same = data.class_names == names_known
        batches = ((x, y.tolist() if same else [-1] * len(x), None) for x, y in image_batches(ds, transform, args.batch_size))
        return batches, len(ds), False
    found = read_images(args.input, transform)
    ids = [names_known.index(args.class_name)] * len(found) if args.class_name else found.class_ids(names_known).tolist()
    n = args.batch_size
    batches = ((x, ids[i * n : (i + 1) * n], found.files[i * n : (i + 1) * n]) for i, x in enumerate(found.batches(n)))
    return batches, len(found), True


def compress(args: CompressArguments, data_args: DataArguments, codec: Codec) -> None:
    batches, count, named = _inputs(args, data_args, codec)
    if args.output.endswith(FILE_SUFFIX) and count != 1:
        raise UsageError(f"--output {args.output}: one {FILE_SUFFIX} file holds one image, the input has {count}; "
                         f"name a folder or an {ARCHIVE_SUFFIX} archive")  # fmt: skip
    first = next(batches)
    grid, pixels = codec.grid(tuple(first[0].shape[-2:])), first[0][0].numel()
    coded = ((codec.encode_images(x), labels, names) for x, labels, names in itertools.chain([first], batches))
    size = 0
    with tqdm(total=count, desc="compress", unit="img") as bar:
        if args.output.endswith(FILE_SUFFIX):  # one image -> one file
            codes, labels, _ = next(coded)
            data = codec.compress_codes(codes[0], labels[0], grid)
            atomic_write_bytes(args.output, data)
            size = len(data)
        elif args.output.endswith(ARCHIVE_SUFFIX):
            with atomic_file(args.output) as f, ArchiveWriter(codec, f, count, grid, named, args.group, bar) as writer:
                for codes, labels, names in coded:
                    writer.add(codes, labels, names)
                size = f.tell()
        else:
            with staged(args.output) as tmp:
                for codes, labels, names in coded:
                    for i, (c, label) in enumerate(zip(codes, labels)):
                        name = names[i] if names else f"{bar.n:06d}.png"
                        data = codec.compress_codes(c, label, grid)
                        path = os.path.join(tmp, os.path.splitext(name)[0] + FILE_SUFFIX)
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with open(path, "wb") as f:
                            f.write(data)
                        size += len(data)
                        bar.update()
    print(f"{count} images -> {args.output}: {size / count:.1f} bytes per image, {8 * size / (pixels * count):.3f} bits per pixel, "
          f"{pixels * count / size:.1f}x smaller than raw 8-bit pixels")  # fmt: skip


def _write_images(folder: str, names: list[str], images: torch.Tensor) -> None:
    for name, image in zip(names, to_pil(images)):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)


def decompress(args: DecompressArguments, codec: Codec, batch_size: int = 256) -> None:
    if os.path.isdir(args.input):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.input) for f in fs if f.endswith(FILE_SUFFIX))
        if not files:
            raise UsageError(f"--input {args.input}: no {FILE_SUFFIX} files in this folder")
        with staged(args.output) as tmp:
            for start in tqdm(range(0, len(files), batch_size), desc="decompress", unit="batch"):
                decoded = [codec.decompress_codes(open(f, "rb").read(), what=f) for f in files[start : start + batch_size]]
                for grid in dict.fromkeys(d[2] for d in decoded):  # one decoder call per image size
                    at = [i for i, d in enumerate(decoded) if d[2] == grid]
                    names = [os.path.relpath(files[start + i], args.input)[: -len(FILE_SUFFIX)] + ".png" for i in at]
                    _write_images(tmp, names, codec.decode_codes(np.stack([decoded[i][0] for i in at]), grid))
        print(f"decoded {len(files)} images -> {args.output}")
        return
    with open(args.input, "rb") as f:
        if f.read(3) != b"VQA":  # one file -> one image
            f.seek(0)
            codes, _, grid = codec.decompress_codes(f.read(), what=args.input)
            png = io.BytesIO()
            to_pil(codec.decode_codes(codes[None], grid))[0].save(png, format="PNG")
            atomic_write_bytes(args.output, png.getvalue())
            print(f"decoded {args.input} -> {args.output}")
            return
        f.seek(0)
        with tqdm(desc="decompress", unit="img") as bar, staged(args.output) as tmp:
            grid, count, _, groups = codec.read_archive(f, what=args.input, progress=bar)
            bar.total, done = count, 0
            for codes, _, names in groups:
                names = [os.path.splitext(n)[0] + ".png" for n in names] if names else [f"{i:06d}.png" for i in range(done, done + len(codes))]
                _write_images(tmp, names, codec.decode_codes(codes, grid))
                done += len(codes)
    print(f"decoded {count} images -> {args.output}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: python -m codec {compress,decompress} [--help] ...\n\n"
              + "\n".join(f"  python -m codec {c} --help" for c in COMMANDS))  # fmt: skip
        return
    if argv[0] not in COMMANDS:
        raise UsageError(f"{argv[0]!r}: the first argument is the command: compress or decompress")
    command, types = argv[0], COMMANDS[argv[0]]
    models, args, *data_args = parse_args((ModelArguments, *types), argv[1:], prog=f"python -m codec {command}")
    codec = Codec.from_pretrained(models.prior, models.tokenizer, models.levels)
    torch.set_grad_enabled(False)
    if command == "compress":
        compress(args, data_args[0], codec)
    else:
        decompress(args, codec)


if __name__ == "__main__":
    run_main(main)
