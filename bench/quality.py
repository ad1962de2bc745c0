"""Quality of the demo's configuration trained on this machine, through the real command lines.

The demo chain (tokenizer, codes, prior, reference classifier, 80 samples per class at the default
sampling settings, evaluation), then: the tokenizer's test PSNR and usage, the prior's bits per token,
the samples' FD, precision, recall and class accuracy beside their real-data floors and beside the
tokenizer's own reconstruction FD, and the sampling table of docs/recipe.md on this prior.

    python -m bench.quality [--out runs/bench] [--tokenizer-steps 1000] [--prior-steps 600] [--no-grid]   (the demo's 7x7 chain)
"""

import argparse
import math

import torch
from transformers import AutoConfig

from bench.common import machine, report
from bench.recipe import SAMPLING, recon_report
from common.data import DataArguments
from demo import DemoArguments, run_chain
from evaluation import Classifier, ClassifierSpace, Evaluator
from prior import PriorInfo
from sample import ClassConditionalPipeline
from sample.pipeline import generation_kwargs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--tokenizer-steps", type=int, default=DemoArguments.tokenizer_steps)
    p.add_argument("--prior-steps", type=int, default=None, help="default: the demo's")
    p.add_argument("--no-grid", action="store_true", help="skip the sampling table")
    args = p.parse_args()
    print(f"machine: {machine()}")
    r = run_chain(DemoArguments(out=args.out, fresh=True, tokenizer_steps=args.tokenizer_steps, prior_steps=args.prior_steps))
    tm, pm, cm, sm = (r["metrics"][k] for k in ("tokenizer", "prior", "classifier", "samples"))
    minutes, prior_steps = r["minutes"], r["prior_steps"]
    info = PriorInfo.from_config(AutoConfig.from_pretrained(r["prior"]))  # K and the grid: the uniform baseline
    k, tokens = info.num_codes, info.seq_len
    print(f"tokenizer: {args.tokenizer_steps} steps in {minutes['tokenizer']:.1f} min, test PSNR {tm['psnr']:.2f} dB, "
          f"usage {tm['codebook_usage']:.1%}, perplexity {tm['perplexity']:.0f}; grid {r['tokenizer']}/images")  # fmt: skip
    print(f"prior: {prior_steps} steps in {minutes['prior']:.1f} min, {pm['bits_per_token']:.3f} bits/token, "
          f"{pm['bits_per_image']:.0f} bits/image (uniform {math.log2(k):.0f} / {tokens * math.log2(k):.0f}); samples {r['grid']}")  # fmt: skip
    report("tokenizer test PSNR (fashion-mnist preset)", tm["psnr"], "dB", target=">= 24 dB in <= 15 min",
           ok=tm["psnr"] >= 24 and minutes["tokenizer"] <= 15, steps=args.tokenizer_steps, minutes=round(minutes["tokenizer"], 1))  # fmt: skip
    report("tokenizer test codebook usage", tm["codebook_usage"] * 100, "%", target=">= 95%",
           ok=tm["codebook_usage"] >= 0.95, perplexity=round(tm["perplexity"], 1))  # fmt: skip
    report("prior test bits/token (fashion-mnist preset)", pm["bits_per_token"], "bits", "uniform log2(K)", math.log2(k),
           ratio=pm["bits_per_token"] / math.log2(k), target="below uniform, <= 20 min",
           ok=minutes["prior"] <= 20, steps=prior_steps, minutes=round(minutes["prior"], 1))  # fmt: skip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier = Classifier.from_pretrained(f"{args.out}/classifier").to(device).eval()
    evaluator = Evaluator.from_dataset(ClassifierSpace(classifier), DataArguments(dataset="fashion_mnist"), classifier=classifier)
    recon = recon_report(r["tokenizer"], evaluator, device, per_class=80)
    report("samples: FD (default sampling, 800 samples)", sm["fd"], "", "real-data floor", sm["fd_floor"], ratio=sm["fd"] / sm["fd_floor"],
           target="<= 2x floor", ok=sm["fd"] <= 2 * sm["fd_floor"])  # fmt: skip
    report("samples: FD vs the tokenizer's reconstruction FD", sm["fd"], "", "reconstructions of 800 test images", recon.fd,
           ratio=sm["fd"] / recon.fd, target="<= 1.5x", ok=sm["fd"] <= 1.5 * recon.fd)  # fmt: skip
    report("samples: class accuracy", sm["accuracy"], "", "classifier on real test images", cm["accuracy"],
           ratio=sm["accuracy"] / cm["accuracy"], target=">= 1x", ok=sm["accuracy"] >= cm["accuracy"])  # fmt: skip
    report("samples: precision", sm["precision"], "", "real-data floor", sm["precision_floor"], target="(reported)")
    report("samples: recall", sm["recall"], "", "real-data floor", sm["recall_floor"], target="(reported)")
    report("demo minutes (all stages)", sum(minutes.values()), "min", target="(reported)")
    if args.no_grid:
        return
    pipe = ClassConditionalPipeline.from_pretrained(r["prior"], device=device)
    labels = torch.arange(10).repeat_interleave(80)
    print("\n| guidance | temperature | top-k | top-p | FD | FD / floor | precision | recall | class accuracy |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for s in SAMPLING["grid"]:
        x = evaluator.score(pipe(labels.tolist(), seed=0, batch_size=1000, **s).cpu(), labels)
        g = generation_kwargs(pipe.sampling_settings(**s))  # top_k 0 / top_p 1 (off) -> None
        print(f"| {g['guidance_scale']} | {g['temperature']} | {g['top_k'] or '-'} | {g['top_p'] or '-'} | {x.fd:.3f} | "
              f"{x.fd_ratio:.1f}x | {x.precision:.3f} | {x.recall:.3f} | {x.accuracy:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
