"""Recipes chosen by measurement: tokenizer losses and codebooks (docs/tokenizer.md) and the stage-two
recipe, prior and sampling settings (docs/recipe.md).

Every row trains (or reuses) its models through the stage entry points, then scores, with the reference
classifier against the Fashion-MNIST test split: the tokenizer's reconstructions of 80 test images per
class, and 80 samples per class at each sampling setting (Fréchet distance, precision, recall, class
accuracy, each beside its real-data floor). Rows go to OUT/rows.jsonl as they finish.

    python -m bench.recipe --classifier runs/classifier --tokenizers all --priors all      # the sweep
    python -m bench.recipe --classifier runs/classifier --prior runs/demo/prior --sampling grid
    python -m bench.recipe --classifier runs/classifier --priors demo,lr1e-3-800 --sampling default --seeds 0,1,2,3,4
    python -m bench.recipe --classifier runs/classifier --tokenizers mse --priors demo --smoke   # checks the script
    python -m bench.recipe --dataset data/emoji --classifier runs/clf-emoji --out runs/recipe-emoji \
        --tokenizers mse,adv,adv-adaptive,lowdim-l2,rotation --priors none   # the RGB rows (bench/emoji.py)

Reconstructions are scored on the first ``--per-class`` test images of every class (all of them for a
class that has fewer), against a floor of as many training images of each class.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import time

import torch

from bench.common import machine
from common.cli import keep_freed_memory
from common.data import DataArguments, column, load_tensors
from common.images import psnr
from evaluation import Evaluator, load_spaces
from sample import ClassConditionalPipeline
from tokenizer import VQVAE

# The preset of 14x14 codes from K=1024 (fashion-mnist with --num-downsamples 1 --num-codes 1024); a later
# --preset or --learning-rate on a stage's command line wins over the common one.
GRID14 = ["--preset", "fashion-mnist-14"]
# name -> options of train.tokenizer beyond the common ones (fashion-mnist preset, batch 128, lr 1e-3 cosine).
TOKENIZERS = {
    "mse": [],
    "mse-2000": ["--max-train-steps", "2000"],
    "adv": ["--disc-weight", "0.1", "--disc-start", "300"],
    "adv-adaptive": ["--disc-weight", "0.5", "--disc-start", "300", "--adaptive-disc-weight"],
    "l1-adv-adaptive": ["--pixel-loss", "l1", "--disc-weight", "0.5", "--disc-start", "300", "--adaptive-disc-weight"],
    "lowdim-l2": ["--codebook-dim", "8", "--l2-codes"],
    "rotation": ["--rotation-trick"],
    "k1024": ["--num-codes", "1024"],
    "k256": ["--num-codes", "256"],
    "grid14": ["--num-downsamples", "1"],  # 14x14 codes of a 28 px image: 4x the tokens of the presets' 7x7
    "grid14-k1024": GRID14,
    # Toward issue 12's 1.2x on the 14x14 grid, at the same time: the discriminator once reconstructions are sharp,
    # more codes, a higher learning rate.
    "grid14-k1024-adv": [*GRID14, "--disc-weight", "0.5", "--disc-start", "300", "--adaptive-disc-weight"],
    "grid14-k2048": [*GRID14, "--num-codes", "2048"],
    "grid14-k1024-lr2e-3": [*GRID14, "--learning-rate", "2e-3"],
    "grid14-k1024-lr3e-3": [*GRID14, "--learning-rate", "3e-3"],
    "grid14-k1024-lr3e-3-seed1": [*GRID14, "--learning-rate", "3e-3", "--seed", "1"],
    "grid14-k1024-lr4e-3": [*GRID14, "--learning-rate", "4e-3"],
    "grid14-k1024-lr4e-3-900": [*GRID14, "--learning-rate", "4e-3", "--max-train-steps", "900"],
    # The demo tokenizer's time: its 1000 steps at the 14x14 step's cost (1.06x the 7x7 step, bench.tokenizer_step).
    "grid14-k1024-lr4e-3-940": [*GRID14, "--learning-rate", "4e-3", "--max-train-steps", "940"],
    "lr2e-3": ["--learning-rate", "2e-3"],  # the presets' 7x7 grid at the rate that helped the 14x14 one
    # The stretch target of issue 8 (the demo in half the time): the 7x7 tokenizer in half its steps.
    "lr2e-3-500": ["--learning-rate", "2e-3", "--max-train-steps", "500"],
    "lr4e-3-500": ["--learning-rate", "4e-3", "--max-train-steps", "500"],
    # Levels of codes on the presets' 7x7 grid (docs/tokenizer.md#levels-of-codes): residual levels, a codebook
    # each or one shared, with quantizer dropout so that every prefix decodes.
    "residual-2": ["--quantizer", "residual", "--levels", "2", "--quantizer-dropout", "0.5"],
    "residual-4": ["--quantizer", "residual", "--levels", "4", "--quantizer-dropout", "0.5"],
    "residual-2-shared": ["--quantizer", "residual", "--levels", "2", "--quantizer-dropout", "0.5", "--shared-codebook"],
    "residual-4-shared": ["--quantizer", "residual", "--levels", "4", "--quantizer-dropout", "0.5", "--shared-codebook"],
    "residual-4-lr2e-3": ["--quantizer", "residual", "--levels", "4", "--quantizer-dropout", "0.5", "--learning-rate", "2e-3"],
    "residual-4-nodrop": ["--quantizer", "residual", "--levels", "4"],
    "residual-4-lr4e-3": ["--quantizer", "residual", "--levels", "4", "--quantizer-dropout", "0.5", "--learning-rate", "4e-3"],
    "residual-8-lr4e-3": ["--quantizer", "residual", "--levels", "8", "--quantizer-dropout", "0.5", "--learning-rate", "4e-3"],
    # VAR's residual scales, ending at the 7x7 grid and at the 14x14 one; Gumbel-softmax codes.
    "multiscale-7": ["--quantizer", "multiscale", "--scales", "1,2,4,7", "--quantizer-dropout", "0.5"],
    "multiscale-7-nodrop": ["--quantizer", "multiscale", "--scales", "1,2,4,7"],
    "multiscale-7-lr4e-3": ["--quantizer", "multiscale", "--scales", "1,2,4,7", "--quantizer-dropout", "0.5", "--learning-rate", "4e-3"],
    "multiscale-14": [*GRID14, "--learning-rate", "4e-3", "--quantizer", "multiscale", "--scales", "1,2,4,7,14", "--quantizer-dropout", "0.5"],
    "gumbel": ["--quantizer", "gumbel"],
}
# name -> (tokenizer row, options of train.prior beyond the common ones: fashion-mnist preset, batch 128).
PRIORS = {
    "demo": ("mse", ["--max-train-steps", "800"]),
    "steps1600": ("mse", ["--max-train-steps", "1600"]),
    "steps3200": ("mse", ["--max-train-steps", "3200"]),
    "lr1e-3": ("mse", ["--max-train-steps", "1600", "--learning-rate", "1e-3"]),
    "lr3e-4": ("mse", ["--max-train-steps", "1600", "--learning-rate", "3e-4"]),
    "batch256": ("mse", ["--max-train-steps", "800", "--train-batch-size", "256"]),
    "puncond0.2": ("mse", ["--max-train-steps", "1600", "--p-uncond", "0.2"]),
    "llama": ("mse", ["--max-train-steps", "1600", "--arch", "llama"]),
    "wide": ("mse", ["--max-train-steps", "1600", "--n-embd", "256", "--n-head", "8"]),
    "small-fast": ("mse", ["--max-train-steps", "1600", "--n-layer", "3", "--n-embd", "128", "--n-head", "4"]),
    "small-800": ("mse", ["--max-train-steps", "800", "--n-layer", "3", "--n-embd", "128", "--n-head", "4"]),  # the demo's steps
    "dropout0.1": ("mse", ["--max-train-steps", "3200", "--dropout", "0.1"]),
    "k256": ("k256", ["--max-train-steps", "1600"]),
    "k1024": ("k1024", ["--max-train-steps", "1600"]),
    "k1024-800": ("k1024", ["--max-train-steps", "800"]),  # the demo's steps: is K=1024 worth it at the demo's budget?
    "lr1e-3-800": ("mse", ["--max-train-steps", "800", "--learning-rate", "1e-3"]),
    "lr1e-3-600": ("mse", ["--max-train-steps", "600", "--learning-rate", "1e-3"]),  # the same bits in fewer steps?
    # The stretch target: the demo's prior (600 steps at 1e-3) in fewer steps at a higher rate?
    "lr1e-3-400": ("mse", ["--max-train-steps", "400", "--learning-rate", "1e-3"]),
    "lr2e-3-400": ("mse", ["--max-train-steps", "400", "--learning-rate", "2e-3"]),
    "lr2e-3-300": ("mse", ["--max-train-steps", "300", "--learning-rate", "2e-3"]),
    # The rest of issue 8's table at the demo's budget (600 steps at 1e-3, batch 128, cosine, p_uncond 0.1):
    # the classifier-free dropout, the schedule, and the batch at equal images seen (equal CPU time).
    "puncond0.2-600": ("mse", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--p-uncond", "0.2"]),
    "constant-lr-600": ("mse", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--lr-scheduler", "constant_with_warmup"]),
    "batch256-300": ("mse", ["--max-train-steps", "300", "--learning-rate", "1e-3", "--train-batch-size", "256"]),
    "batch64-1200": ("mse", ["--max-train-steps", "1200", "--learning-rate", "1e-3", "--train-batch-size", "64"]),
    "llama-600": ("mse", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--arch", "llama"]),  # RoPE, SwiGLU, RMSNorm at the demo's budget
    "llama-400-lr2e-3": ("mse", ["--max-train-steps", "400", "--learning-rate", "2e-3", "--arch", "llama"]),  # the stretch target: Llama in 2/3 of the steps
    # One training run is one draw too (docs/recipe.md: two demo chains differ by 0.07): both again at another seed.
    "lr1e-3-600-seed1": ("mse", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--seed", "1"]),
    "llama-600-seed1": ("mse", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--arch", "llama", "--seed", "1"]),
    # The first rows for a GPU: the preset's prior over the 196 codes of the 1.16x tokenizer (docs/recipe.md).
    "grid14-lr4e-3-1600": ("grid14-k1024-lr4e-3", ["--max-train-steps", "1600", "--learning-rate", "1e-3"]),  # what a CPU affords
    "grid14-lr4e-3-3200": ("grid14-k1024-lr4e-3", ["--max-train-steps", "3200", "--learning-rate", "1e-3"]),
    "grid14-lr4e-3-6400": ("grid14-k1024-lr4e-3", ["--max-train-steps", "6400", "--learning-rate", "1e-3"]),
    # A wider prior for the 196 codes: 6 layers, width 384 (nanoGPT's small character model; 11M parameters).
    "grid14-wide-3200": ("grid14-k1024-lr4e-3", ["--max-train-steps", "3200", "--learning-rate", "1e-3",
                                                 "--n-layer", "6", "--n-embd", "384", "--n-head", "6"]),
    # Llama beat GPT-2 at the demo's 7x7 budget (docs/recipe.md): the next GPU row, against grid14-lr4e-3-6400.
    "grid14-llama-6400": ("grid14-k1024-lr4e-3", ["--max-train-steps", "6400", "--learning-rate", "1e-3", "--arch", "llama"]),
    # Flat priors over the first levels of 8 residual levels (the baseline of the priors over levels), at the
    # demo prior's CPU minutes: the first level's 49 codes for 600 steps, the first two levels' 98 for 300.
    "rq8-d1-llama-600": ("residual-8-lr4e-3", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--arch", "llama", "--levels", "1"]),
    "rq8-d2-llama-300": ("residual-8-lr4e-3", ["--max-train-steps", "300", "--learning-rate", "1e-3", "--arch", "llama", "--levels", "2"]),
    # A small set (the emoji's 3,317 images) memorised by 600 steps: fewer passes, or GPT-2 with its dropout.
    "rq8-d1-llama-200": ("residual-8-lr4e-3", ["--max-train-steps", "200", "--learning-rate", "1e-3", "--arch", "llama", "--levels", "1"]),
    "rq8-d1-gpt2-600-drop": ("residual-8-lr4e-3", ["--max-train-steps", "600", "--learning-rate", "1e-3", "--arch", "gpt2", "--levels", "1",
                                                   "--dropout", "0.1"]),
    # The priors over levels at the same minutes (4.2-4.4 on the xeon; their steps from the step time measured
    # beside the flat prior's: 414 ms flat over 49 codes, 666 depth over 2 levels, 1110 over 4, 655 next-scale).
    "rq8-d2-depth-380": ("residual-8-lr4e-3", ["--max-train-steps", "380", "--learning-rate", "1e-3", "--arch", "depth", "--levels", "2"]),
    "rq8-d4-depth-225": ("residual-8-lr4e-3", ["--max-train-steps", "225", "--learning-rate", "1e-3", "--arch", "depth", "--levels", "4"]),
    "ms7-scales-380": ("multiscale-7-nodrop", ["--max-train-steps", "380", "--learning-rate", "1e-3", "--arch", "scales"]),
    "grid14-small": ("grid14", ["--max-train-steps", "800", "--n-layer", "3", "--n-embd", "128", "--n-head", "4"]),
}
SAMPLING = {  # name -> pipeline settings scored for every prior (top_k 0 / top_p 1: that filter off)
    "default": [dict()],  # the prior's own settings (train.prior's --sample-*; by default the pipeline's)
    "guidance": [dict(guidance_scale=g) for g in (1.0, 1.5, 2.0, 3.0)],
    "guidance-fine": [dict(guidance_scale=g) for g in (1.25, 1.5, 1.75)],  # around the 14x14 priors' best (docs/recipe.md)
    # The guidance over the codes (prior.GUIDANCE_SCHEDULES): rising to the scale, or falling from it; around
    # the best constant scale of the 14x14 priors (1.25) and, stronger, of the 7x7 demo prior (2).
    "schedule": [dict(guidance_scale=g, guidance_schedule="linear") for g in (2.0, 2.5, 3.0)]
    + [dict(guidance_scale=1.5, guidance_schedule="linear-down")],
    "schedule-strong": [dict(guidance_scale=g, guidance_schedule="linear") for g in (3.0, 4.0, 5.0)]
    + [dict(guidance_scale=2.5, guidance_schedule="linear-down")],
    # Around the 14x14 recipe's linear 2.5: between it and linear 2.0, a wider filter, a warmer temperature
    # (its samples are a little more precise and less diverse than real data).
    "schedule-fine": [dict(guidance_scale=2.25, guidance_schedule="linear"), dict(guidance_scale=2.5, guidance_schedule="linear", top_k=200),
                      dict(guidance_scale=2.5, guidance_schedule="linear", temperature=1.05)],  # fmt: skip
    # The 14x14 recipe (linear 2.5, top-k 200) beside the one it replaced (top-k 100): fresh seeds confirm the choice.
    "recipe-14": [dict(guidance_scale=2.5, guidance_schedule="linear", top_k=200), dict(guidance_scale=2.5, guidance_schedule="linear")],
    "top-k": [dict(guidance_scale=1.1, top_k=k) for k in (30, 50, 100, 300, 0)],  # the filter of the 14x14 priors (K=1024)
    # Priors over levels: the deep levels at the first level's settings, cooler, or greedy.
    "deep": [dict(), dict(deep_temperature=0.5), dict(deep_temperature=0.0)],
    "grid": [dict(guidance_scale=g, temperature=t, top_k=k, top_p=p)
             for g, t, k, p in itertools.product((1.5, 2.0, 3.0), (1.0, 0.9), (0, 100), (1.0, 0.95))],  # fmt: skip
}
SMOKE_LIMITS = ["--max-train-samples", "512", "--max-eval-samples", "128"]
SMOKE = ["--preset", "tiny", "--max-train-steps", "6", *SMOKE_LIMITS]


def _run_stage(module, argv: list[str]) -> float:
    """A stage's ``main`` in this process (no start-up per row); returns minutes. The float32 matmul
    precision that training sets process-wide (TF32 on a GPU) is put back, so that a row samples as a
    fresh process does (docs/recipe.md: the same seed moved the FD by 0.02 on an H100)."""
    t = time.perf_counter()
    precision = torch.get_float32_matmul_precision()
    try:
        module.main(argv)
    finally:
        torch.set_float32_matmul_precision(precision)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return (time.perf_counter() - t) / 60


def train_tokenizer(out: str, name: str, extra: list[str], dataset: str = "fashion_mnist") -> tuple[str, float | None]:
    from train import tokenizer

    tok = os.path.join(out, f"tok-{name}")
    minutes = None
    if not os.path.exists(os.path.join(tok, "metrics.json")):
        minutes = _run_stage(tokenizer, ["--dataset", dataset, "--preset", "fashion-mnist", "--max-train-steps", "1000", "--train-batch-size", "128",
                                         "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--eval-steps", "100000",
                                         "--checkpointing-steps", "100000", "--logging-steps", "100", *TOKENIZERS[name],
                                         *extra, "--output-dir", tok])  # fmt: skip
    return tok, minutes


def train_prior(out: str, name: str, extra: list[str], dataset: str = "fashion_mnist") -> tuple[str, float | None]:
    from train import encode, prior

    tok_name, options = PRIORS[name]
    tok, _ = train_tokenizer(out, tok_name, extra, dataset)
    codes = os.path.join(out, f"codes-{tok_name}")
    if not os.path.exists(os.path.join(codes, "vqgpt_codes.json")):
        encode.main(["--tokenizer", tok, "--dataset", dataset, "--output-dir", codes, *(SMOKE_LIMITS if extra else [])])
    path = os.path.join(out, f"prior-{name}")
    minutes = None
    if not os.path.exists(os.path.join(path, "metrics.json")):
        minutes = _run_stage(prior, ["--codes", codes, "--preset", "fashion-mnist",
                                     "--train-batch-size", "128", "--lr-warmup-steps", "100", "--eval-steps", "100000",
                                     "--checkpointing-steps", "100000", "--logging-steps", "100", *options, *extra,
                                     "--output-dir", path])  # fmt: skip
    return path, minutes


def balanced_test_images(evaluator: Evaluator, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test images of every class (all of a class that has fewer): the real
    counterpart of a sample set."""
    labels = torch.as_tensor(column(evaluator.data.test, "label"))
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(evaluator.data.class_names))])
    return load_tensors(evaluator.data.test.select(pick.tolist()), evaluator.data.channels)


def recon_reports(tokenizer_dir: str, evaluator: Evaluator, device: str, per_class: int) -> list:
    """Reconstructions of as many test images per class as there are samples: what a prior on this
    tokenizer can at best reach (the issue's bound: samples never worse than 1.5x it); one report (with
    its ``psnr``) per prefix of the levels, from the first level to all of them, the images encoded once."""
    tok = VQVAE.from_pretrained(tokenizer_dir).to(device).eval()
    x, y = balanced_test_images(evaluator, per_class)
    codes = tok.encode(x.to(device))
    reports = []
    for d in range(1, tok.num_levels + 1):
        recon = tok.decode(codes, levels=d).cpu()
        r = evaluator.score(recon, y)
        r.psnr = float(psnr(recon, x).mean())
        reports.append(r)
    return reports


def recon_report(tokenizer_dir: str, evaluator: Evaluator, device: str, per_class: int):
    """The reconstructions' report from every level of the tokenizer (see :func:`recon_reports`)."""
    return recon_reports(tokenizer_dir, evaluator, device, per_class)[-1]


def _log(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    p = argparse.ArgumentParser()
    p.add_argument("--classifier", required=True)
    p.add_argument("--spaces", default="", help="comma list of more feature spaces, as python -m evaluation --spaces")
    p.add_argument("--dataset", default="fashion_mnist", help="what the rows train on and are scored against")
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--tokenizers", default="", help=f"'all' or a comma list of {list(TOKENIZERS)}")
    p.add_argument("--priors", default="", help=f"'all' or a comma list of {list(PRIORS)}")
    p.add_argument("--prior", default=None, help="score this trained prior (with --sampling) instead")
    p.add_argument("--recon", default="", help="comma list of trained tokenizer folders: score their reconstructions at every prefix of the levels")
    p.add_argument("--tokenizer", default=None, help="with --prior: decode with this tokenizer instead of the one the prior names (a fine-tuned decoder)")
    p.add_argument("--sampling", default="guidance", choices=list(SAMPLING))
    p.add_argument("--per-class", type=int, default=80)
    p.add_argument("--seeds", default="0", help="comma list: every setting is sampled once per seed (mean and spread printed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny presets and 6 steps: checks the script only")
    p.add_argument("--rows-file", default=None, help="where rows are appended (default OUT/rows.jsonl)")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    extra = SMOKE if args.smoke else []
    os.makedirs(args.out, exist_ok=True)
    spaces, classifier = load_spaces(args.classifier, [s for s in args.spaces.split(",") if s], args.device)
    evaluator = Evaluator.from_dataset(spaces, DataArguments(dataset=args.dataset), classifier=classifier)
    labels = torch.arange(len(evaluator.data.class_names)).repeat_interleave(args.per_class)
    seeds = [int(s) for s in args.seeds.split(",")]
    pick = lambda spec, table: list(table) if spec == "all" else [n for n in spec.split(",") if n and n != "none"]  # noqa: E731
    with open(args.rows_file or os.path.join(args.out, "rows.jsonl"), "a") as log:
        if pick(args.tokenizers, TOKENIZERS):  # the bound of every row: the very test images a perfect tokenizer returns
            r = evaluator.score(*balanced_test_images(evaluator, args.per_class))
            print(f"the test images themselves: {r.summary()}", flush=True)
            _log(log, {"kind": "tokenizer", "row": "originals", "dataset": args.dataset, "device": machine(), **r.to_dict()})
        for name in pick(args.tokenizers, TOKENIZERS):
            tok, minutes = train_tokenizer(args.out, name, extra, args.dataset)
            reports = recon_reports(tok, evaluator, args.device, args.per_class)
            r = reports[-1]
            metrics = json.load(open(os.path.join(tok, "metrics.json")))
            print(f"tokenizer {name}: recon {r.summary()}, PSNR {metrics['psnr']:.2f}, "
                  f"usage {metrics['codebook_usage']:.3f}, {minutes or 0:.1f} min", flush=True)  # fmt: skip
            _log(log, {"kind": "tokenizer", "row": name, "dataset": args.dataset, "options": TOKENIZERS[name], "minutes": minutes,
                       "device": machine(), **{k: v for k, v in metrics.items() if k.startswith(("psnr", "codebook_usage", "perplexity"))},
                       **r.to_dict()})  # fmt: skip
            tok_model = VQVAE.from_pretrained(tok)
            grid = tok_model.code_layout(*evaluator.data.size)
            for d, r in enumerate(reports, 1):  # the rate-distortion table: every prefix of the levels
                bits = grid.length(d) * math.log2(tok_model.config.num_codes)
                print(f"tokenizer {name}, first {d} level(s): {bits:.0f} bits per image, PSNR {r.psnr:.2f}, "
                      f"recon {r.summary()}", flush=True)  # fmt: skip
                _log(log, {"kind": "tokenizer-levels", "row": name, "levels": d, "bits_per_image": bits, "psnr": r.psnr,
                           "dataset": args.dataset, "device": machine(), **r.to_dict()})  # fmt: skip
        for path in [d for d in args.recon.split(",") if d]:
            for d, r in enumerate(recon_reports(path, evaluator, args.device, args.per_class), 1):
                print(f"tokenizer {path}, first {d} level(s): PSNR {r.psnr:.2f}, recon {r.summary()}", flush=True)
                _log(log, {"kind": "tokenizer-levels", "row": path, "levels": d, "psnr": r.psnr, "dataset": args.dataset,
                           "device": machine(), **r.to_dict()})  # fmt: skip
        priors = [("given", args.prior, None)] if args.prior else [(n, *train_prior(args.out, n, extra, args.dataset)) for n in pick(args.priors, PRIORS)]  # fmt: skip
        for name, path, minutes in priors:
            pipe = ClassConditionalPipeline.from_pretrained(path, tokenizer=args.tokenizer if name == "given" else None, device=args.device)
            metrics = json.load(open(os.path.join(path, "metrics.json")))
            for setting in SAMPLING[args.sampling]:
                draws = []
                for seed in seeds:
                    start = time.perf_counter()
                    images = pipe(labels.tolist(), seed=seed, batch_size=1000, **setting).cpu()
                    per_second = len(labels) / (time.perf_counter() - start)
                    r = evaluator.score(images, labels)
                    draws.append(r)
                    print(f"prior {name} {setting} seed {seed}: {r.summary()}, precision {r.precision:.3f}, "
                          f"recall {r.recall:.3f}, {per_second:.1f} images/s", flush=True)  # fmt: skip
                    _log(log, {"kind": "samples", "row": name, "options": PRIORS.get(name, ("", []))[1], "minutes": minutes, "seed": seed,
                               "images_per_second": per_second,
                               "device": machine(), "bits_per_token": metrics["bits_per_token"], **setting, **r.to_dict()})  # fmt: skip
                if len(draws) > 1:  # the spread of the draws: what a difference between two rows must exceed
                    stats = {k: [getattr(r, k) for r in draws] for k in ("fd", "precision", "recall", "accuracy", "detail")}
                    stats.update({f"fd_ratio {s.space}": [r.space(s.space).fd_ratio for r in draws] for s in draws[0].spaces})
                    stats.update({f"kid {s.space}": [r.space(s.space).kid for r in draws] for s in draws[0].spaces})
                    print(f"prior {name} {setting} over {len(draws)} seeds: " + ", ".join(
                        f"{k} {statistics.mean(v):.3f} +- {statistics.stdev(v):.3f}" for k, v in stats.items()), flush=True)  # fmt: skip
            del pipe


if __name__ == "__main__":
    main()
