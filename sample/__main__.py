"""Write class-conditional samples as an imagefolder plus a labelled grid.

    python -m sample --prior runs/prior --classes all --per-class 8 --output-dir samples/

writes OUTPUT_DIR/<class_name>/<i>.png with OUTPUT_DIR/metadata.jsonl (so datasets' imagefolder loads it
back with the class names as labels) and OUTPUT_DIR/grid.png with one labelled row per class (its first
--grid-columns samples).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from common.cli import UsageError, option, parse_args
from sample.pipeline import ClassConditionalPipeline, SamplingArguments
from common.images import image_grid
from common.files import publish_dir, staging_dir


def parse_classes(spec: str, pipe: ClassConditionalPipeline) -> list[int]:
    if spec == "all":
        return list(range(len(pipe.class_names))) or [-1]
    return pipe.class_ids([s.strip() for s in spec.split(",") if s.strip()])


def folder_name(pipe: ClassConditionalPipeline, class_id: int) -> str:
    name = pipe.class_names[class_id] if class_id >= 0 else "unconditional"
    return name.replace("/", "-").replace(os.sep, "-")  # "T-shirt/top" -> "T-shirt-top"


def labelled_grid(images: torch.Tensor, names: list[str], per_class: int, columns: int = 16) -> Image.Image:
    """One row per class, its name written in a margin on the left: the first ``columns`` samples of each
    class (``images`` holds ``per_class`` of each, class after class), so the grid stays readable."""
    shown = min(per_class, columns)
    images = images.view(len(names), per_class, *images.shape[1:])[:, :shown].flatten(0, 1)
    grid = image_grid(images, nrow=shown).convert("RGB")
    row_h = grid.height // len(names)
    margin = 8 + 7 * max(len(n) for n in names)
    out = Image.new("RGB", (grid.width + margin, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        draw.text((4, r * row_h + row_h // 2 - 6), name, fill="black")
    return out


@dataclass
class SampleArguments:
    prior: str = option(None, "Prior folder (train.prior output) or Hub id.")
    tokenizer: str | None = option(None, "Override the tokenizer the prior names.")
    classes: str = option("all", "'all' or a comma list of ids and names, e.g. 0,3,Sneaker.")
    per_class: int = option(8, "Images per class.", domain="positive")
    output_dir: str = option("samples", "Written whole at the end: <class>/<i>.png, metadata.jsonl, grid.png.")
    grid_columns: int = option(16, "Samples of each class shown in grid.png (its row); every sample is written as its own file.", domain="positive")  # fmt: skip

    def validate(self) -> None:
        if not self.prior:
            raise UsageError("--prior is required: a train.prior output folder or a Hub id")


def main(argv=None):
    args, sampling = parse_args((SampleArguments, SamplingArguments), argv)
    pipe = ClassConditionalPipeline.from_pretrained(args.prior, tokenizer=args.tokenizer, device=sampling.device)
    classes = list(dict.fromkeys(parse_classes(args.classes, pipe)))  # each class once, in the order given
    labels = [c for c in classes for _ in range(args.per_class)]
    sampling.announce(pipe)
    with tqdm(total=len(labels), desc="sample", unit="img", dynamic_ncols=True) as bar:
        images = pipe(labels, **sampling.pipeline_kwargs(), progress=bar).cpu()
    tmp = staging_dir(args.output_dir)  # published whole at the end: never a half-written sample folder
    pils = pipe.to_pil(images)
    rows = []
    for i, (c, img) in enumerate(zip(labels, pils)):
        rel = f"{folder_name(pipe, c)}/{i % args.per_class}.png"
        os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
        img.save(os.path.join(tmp, rel))
        rows.append({"file_name": rel, "label": pipe.class_names[c] if c >= 0 else "unconditional"})
    # imagefolder reads labels (the real class names) from metadata.jsonl, and skips grid.png, which it lists not.
    with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    names = [folder_name(pipe, c) if c < 0 else pipe.class_names[c] for c in classes]
    labelled_grid(images, names, args.per_class, args.grid_columns).save(os.path.join(tmp, "grid.png"))
    publish_dir(tmp, args.output_dir)
    print(f"wrote {len(labels)} samples of {len(classes)} classes to {args.output_dir}; grid: {os.path.join(args.output_dir, 'grid.png')}")


if __name__ == "__main__":
    from common.cli import run_main

    run_main(main)
