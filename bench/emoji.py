"""A small labelled RGB set that needs no network: the Noto Color Emoji glyphs, classed by Unicode group.

    python -m bench.emoji --out data/emoji [--size 32]

Renders every fully-qualified emoji of Unicode's ``emoji-test.txt`` with the Noto Color Emoji font (both
from Debian: ``apt-get install fonts-noto-color-emoji unicode-data``; ``make data`` installs them) on
white, and writes an imagefolder ``OUT/{train,test}/<group>/<codepoints>.png`` that every ``--dataset``
option reads. The class is the emoji's Unicode group (9 groups; "Component", the bare skin-tone and hair
swatches, is left out). Every variant of one emoji (its skin tones, for example) lands in the same split:
every tenth emoji of a group goes to ``test``. Glyphs the font lacks are skipped and counted.
It is the RGB set of the tokenizer comparison in docs/tokenizer.md, in place of CIFAR-10, which is on
the Hub and out of reach offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter

from PIL import Image, ImageDraw, ImageFont

from common.files import publish_dir, staging_dir

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
STRIKE = 109  # the font's only bitmap size (136 x 128 px glyphs)
TEST_EVERY = 10
SKIPPED_GROUPS = {"Component"}
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


def read_emoji(path: str = EMOJI_TEST) -> list[tuple[str, str, str]]:
    """(group, name, sequence) of every fully-qualified emoji, in the file's order."""
    out, group = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif (m := _LINE.match(line.strip())) and group not in SKIPPED_GROUPS:
                out.append((group, m.group(2), "".join(chr(int(c, 16)) for c in m.group(1).split())))
    return out


def base_name(name: str) -> str:
    """The emoji's name without its skin tones: "thumbs up: dark skin tone" -> "thumbs up"."""
    head, _, qualifiers = name.partition(": ")
    kept = [q for q in qualifiers.split(", ") if q and not q.endswith("skin tone")]
    return ": ".join([head, ", ".join(kept)]) if kept else head


def slug(group: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", group.lower().replace("&", "and")).strip("-")


class Renderer:
    def __init__(self, size: int, font: str = FONT):
        self.font = ImageFont.truetype(font, STRIKE)
        self.size = size
        self.missing = self.render("\U0010fffd").tobytes()  # a code point no font has: the notdef box

    def render(self, seq: str) -> Image.Image:
        square = Image.new("RGB", (136, 136), "white")
        ImageDraw.Draw(square).text((0, 4), seq, font=self.font, embedded_color=True)
        return square.resize((self.size, self.size), Image.Resampling.LANCZOS)

    def __call__(self, seq: str) -> Image.Image | None:
        """The glyph, or None when the font lacks it (notdef, or a sequence drawn as several glyphs)."""
        if self.font.getlength(seq) > 140:
            return None
        image = self.render(seq)
        return None if image.tobytes() == self.missing else image


def build(out: str, size: int = 32, limit: int | None = None) -> dict:
    """Write the imagefolder (whole or not at all); ``limit``: only the first N emoji of each group."""
    for path, package in ((FONT, "fonts-noto-color-emoji"), (EMOJI_TEST, "unicode-data")):
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found; install it with: apt-get install {package}")
    render = Renderer(size)
    tmp = staging_dir(out)
    bases: dict[str, list[str]] = {}  # group -> base names in order
    counts, skipped = Counter(), 0
    for group, name, seq in read_emoji():
        base = base_name(name)
        names = bases.setdefault(group, [])
        if base not in names:
            if limit is not None and len(names) >= limit:
                continue
            names.append(base)
        image = render(seq)
        if image is None:
            skipped += 1
            continue
        split = "test" if names.index(base) % TEST_EVERY == TEST_EVERY - 1 else "train"
        folder = os.path.join(tmp, split, slug(group))
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, "-".join(f"{ord(c):x}" for c in seq) + ".png"))
        counts[split, slug(group)] += 1
    summary = {
        "source": f"{os.path.basename(FONT)} (Debian fonts-noto-color-emoji), groups of {EMOJI_TEST}",
        "size": size,
        "train": {g: n for (s, g), n in sorted(counts.items()) if s == "train"},
        "test": {g: n for (s, g), n in sorted(counts.items()) if s == "test"},
        "skipped_missing_glyphs": skipped,
    }
    with open(os.path.join(tmp, "emoji.json"), "w") as f:
        json.dump(summary, f, indent=1)
    publish_dir(tmp, out)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/emoji")
    p.add_argument("--size", type=int, default=32, help="side of the square images, in pixels")
    p.add_argument("--limit", type=int, default=None, help="only the first N emoji of each group (tests)")
    args = p.parse_args(argv)
    s = build(args.out, args.size, args.limit)
    print(f"wrote {sum(s['train'].values())} train and {sum(s['test'].values())} test images of {len(s['train'])} "
          f"groups to {args.out} ({s['skipped_missing_glyphs']} emoji without a glyph skipped)")  # fmt: skip


if __name__ == "__main__":
    main()
