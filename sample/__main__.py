"""Write class-conditional samples as an imagefolder plus a labelled grid.

    python -m sample --prior runs/prior --classes all --per-class 8 --guidance-scale 2 --output-dir samples/

writes OUTPUT_DIR/<class_name>/<i>.png with OUTPUT_DIR/metadata.jsonl (so datasets' imagefolder loads it
back with the class names as labels) and OUTPUT_DIR/grid.png with one labelled row per class.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from sample.pipeline import ClassConditionalPipeline
from tokenizer.images import image_grid
from train.files import publish_dir, staging_dir


def parse_classes(spec: str, pipe: ClassConditionalPipeline) -> list[int]:
    if spec == "all":
        return list(range(len(pipe.class_names))) or [-1]
    return pipe.class_ids([s.strip() for s in spec.split(",") if s.strip()])


def folder_name(pipe: ClassConditionalPipeline, class_id: int) -> str:
    name = pipe.class_names[class_id] if class_id >= 0 else "unconditional"
    return name.replace("/", "-").replace(os.sep, "-")  # "T-shirt/top" -> "T-shirt-top"


def labelled_grid(images: torch.Tensor, names: list[str], per_class: int) -> Image.Image:
    """One row per class, its name written in a margin on the left."""
    grid = image_grid(images, nrow=per_class).convert("RGB")
    row_h = grid.height // len(names)
    margin = 8 + 7 * max(len(n) for n in names)
    out = Image.new("RGB", (grid.width + margin, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        draw.text((4, r * row_h + row_h // 2 - 6), name, fill="black")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sample", description=__doc__.split("\n")[1])
    p.add_argument("--prior", required=True, help="prior folder (train.prior output) or Hub id")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer the prior names")
    p.add_argument("--classes", default="all", help="'all' or a comma list of ids and names, e.g. 0,3,Sneaker")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=2.0, help="1 = plain conditional, 0 = unconditional")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="samples")
    args = p.parse_args(argv)

    pipe = ClassConditionalPipeline.from_pretrained(args.prior, tokenizer=args.tokenizer, device=args.device)
    classes = list(dict.fromkeys(parse_classes(args.classes, pipe)))  # each class once, in the order given
    labels = [c for c in classes for _ in range(args.per_class)]
    with tqdm(total=len(labels), desc="sample", unit="img", dynamic_ncols=True) as bar:
        images = pipe(labels, guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p if args.top_p < 1 else None, seed=args.seed, batch_size=args.batch_size,
                      progress=bar).cpu()  # fmt: skip
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
    labelled_grid(images, names, args.per_class).save(os.path.join(tmp, "grid.png"))
    publish_dir(tmp, args.output_dir)
    print(f"wrote {len(labels)} samples of {len(classes)} classes to {args.output_dir}; grid: {os.path.join(args.output_dir, 'grid.png')}")


if __name__ == "__main__":
    from train.loop import run_main

    run_main(main)
