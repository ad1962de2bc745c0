"""Probe: can a small model of the deep levels, every position at once, lift the samples of a prior over
the first level of residual codes?

The demo's prior samples the first of its tokenizer's 8 residual levels and the images are that level's
decoding; its priors over more levels lose at a CPU's minutes (docs/recipe.md#priors-over-levels-of-codes).
This probe leaves the prior as it is and trains beside it a convolutional net (residual 3x3 blocks over the
code grid) that predicts every position's code of level l from the quantized latent of the levels before it
and the class, all positions at once. Sampling: the prior's first level at its own settings, then each deeper
level from the net at ``--temperatures`` (0: greedy), then the decoder over ``--levels``; the samples are
scored by the project's evaluation beside the prior's own first-level samples on the same seeds.

    python -m bench.deep_levels --prior runs/demo-levels/prior --classifier runs/demo/classifier
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import machine
from common.cli import keep_freed_memory
from common.data import DataArguments, load_tensors
from evaluation import Classifier, ClassifierSpace, Evaluator
from prior import generate_codes
from sample import ClassConditionalPipeline
from sample.pipeline import generation_kwargs


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                 nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))  # fmt: skip

    def forward(self, h):
        return h + self.net(h)


class DeepLevels(nn.Module):
    """Logits (B, K, h, w) of level ``level`` (B,) from the latent (B, D, h, w) of the levels before it."""

    def __init__(self, code_dim: int, num_codes: int, levels: int, classes: int, width: int, blocks: int):
        super().__init__()
        self.inp, self.level, self.cls = nn.Conv2d(code_dim, width, 1), nn.Embedding(levels, width), nn.Embedding(classes, width)
        self.body, self.out = nn.Sequential(*[Block(width) for _ in range(blocks)]), nn.Conv2d(width, num_codes, 1)

    def forward(self, latent, level, label):
        return self.out(self.body(self.inp(latent) + (self.level(level) + self.cls(label))[:, :, None, None]))


def prefix_latents(tok, grids: list[torch.Tensor]) -> torch.Tensor:
    """(B, L, D, h, w): the latent of the first l levels for l = 1..L (the cumulative sums of their codes;
    ``tok.quantizer.lookup_levels`` of each prefix, all at once for training)."""
    return torch.stack([tok.quantizer.level(i).lookup(g) for i, g in enumerate(grids)], 1).cumsum(1)


def main():
    keep_freed_memory()
    p = argparse.ArgumentParser()
    p.add_argument("--prior", required=True, help="a flat prior over the first level of a residual tokenizer")
    p.add_argument("--classifier", required=True)
    p.add_argument("--levels", default="2,4,8", help="comma list: decode the first d levels (the deep ones from the net)")
    p.add_argument("--temperatures", default="0,0.5,1", help="comma list: the net's sampling temperature (0: greedy)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--per-class", type=int, default=80)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    torch.manual_seed(0)
    pipe = ClassConditionalPipeline.from_pretrained(args.prior)
    tok, info = pipe.tokenizer.eval(), pipe.info
    L = tok.num_levels
    classifier = Classifier.from_pretrained(args.classifier).eval()
    evaluator = Evaluator.from_dataset(ClassifierSpace(classifier), DataArguments(dataset="fashion_mnist"), classifier=classifier)
    layout = tok.code_layout(*evaluator.data.size)

    start = time.perf_counter()
    x, y = load_tensors(evaluator.data.train, evaluator.data.channels)
    xt, yt = load_tensors(evaluator.data.test, evaluator.data.channels)
    codes = torch.cat([tok.encode(x[i : i + 2000]) for i in range(0, len(x), 2000)]).clone()  # not inference tensors
    test_codes = torch.cat([tok.encode(xt[i : i + 2000]) for i in range(0, len(xt), 2000)]).clone()
    print(f"encoded {len(x)} + {len(xt)} images in {time.perf_counter() - start:.0f} s", flush=True)

    code_dim = prefix_latents(tok, layout.split(codes[:1])).shape[2]
    net = DeepLevels(code_dim, tok.config.num_codes, L, len(evaluator.data.class_names), args.width, args.blocks)
    opt = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.learning_rate, total_steps=args.steps, pct_start=0.1)

    def loss_of(c, labels, level):  # level (B,) in 1..L-1: predict level `level` (0-based) from the levels before
        grids = layout.split(c)
        with torch.no_grad():
            latents = prefix_latents(tok, grids)
        inp = latents[torch.arange(len(c)), level - 1]
        target = torch.stack(grids, 1)[torch.arange(len(c)), level]
        return F.cross_entropy(net(inp, level, labels), target, reduction="none").mean((1, 2))

    start = time.perf_counter()
    for step in range(args.steps):
        i = torch.randint(len(codes), (args.batch_size,))
        level = torch.randint(1, L, (args.batch_size,))
        loss = loss_of(codes[i], y[i], level).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: {loss.item() / 0.6931:.3f} bits a code", flush=True)
    minutes = (time.perf_counter() - start) / 60
    net.eval()
    with torch.no_grad():
        per_level = [torch.cat([loss_of(test_codes[i : i + 1000], yt[i : i + 1000], torch.full((len(yt[i : i + 1000]),), lv))
                                for i in range(0, len(yt), 1000)]).mean().item() / 0.6931 for lv in range(1, L)]  # fmt: skip
    print(f"net: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {args.steps} steps in {minutes:.1f} min; "
          f"test bits a code, levels 2..{L}: " + " ".join(f"{b:.2f}" for b in per_level) +
          f" ({sum(per_level) * layout.grids[0][0] * layout.grids[0][1]:.0f} bits an image)", flush=True)  # fmt: skip

    labels = torch.arange(len(evaluator.data.class_names)).repeat_interleave(args.per_class)
    settings = generation_kwargs(pipe.sampling_settings())
    results: dict[str, list] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        g = torch.Generator().manual_seed(seed)
        first = generate_codes(pipe.prior, info.layout, info.seq_len, labels, generator=g, **settings)
        rows = {"first level (the prior alone)": tok.decode(first, levels=1)}
        for t in [float(s) for s in args.temperatures.split(",")]:
            grids, gen = layout.split(first, 1), torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                for lv in range(1, max(int(d) for d in args.levels.split(","))):
                    latent = tok.quantizer.lookup_levels(grids)  # the levels so far
                    logits = net(latent, torch.full((len(labels),), lv), labels)
                    if t == 0:
                        grids.append(logits.argmax(1))
                    else:
                        probs = F.softmax(logits / t, 1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
                        grids.append(torch.multinomial(probs, 1, generator=gen).view(logits.shape[0], *logits.shape[2:]))
                    if str(lv + 1) in args.levels.split(","):
                        rows[f"{lv + 1} levels, net at T={t:g}"] = tok.decode(torch.cat([g_.flatten(1) for g_ in grids], 1), levels=lv + 1)
        for name, images in rows.items():
            r = evaluator.score(images.float(), labels)
            results.setdefault(name, []).append(r)
            print(f"seed {seed} {name}: FD {r.fd:.3f} ({r.fd_ratio:.2f}x floor), precision {r.precision:.3f}, "
                  f"recall {r.recall:.3f}, accuracy {r.accuracy:.3f}", flush=True)  # fmt: skip
    print("over the seeds:")
    for name, rs in results.items():
        fds = [r.fd for r in rs]
        spread = f" +- {statistics.stdev(fds):.3f}" if len(fds) > 1 else ""
        print(f"  {name}: FD {statistics.mean(fds):.3f}{spread} ({statistics.mean(r.fd_ratio for r in rs):.2f}x), "
              f"precision {statistics.mean(r.precision for r in rs):.3f}, recall {statistics.mean(r.recall for r in rs):.3f}, "
              f"accuracy {statistics.mean(r.accuracy for r in rs):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
