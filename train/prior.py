"""Stage two: train the GPT-2 prior on code sequences.

    accelerate launch -m train.prior --codes runs/codes --preset fashion-mnist --output-dir runs/prior
    accelerate launch -m train.prior --tokenizer runs/tok --dataset fashion_mnist --output-dir runs/prior
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator

from prior import PriorInfo, bits, build_prior, generate_codes, prior_loss
from tokenizer import VQVAE
from tokenizer.images import image_grid
from train.data import DataArguments
from train.encode import encode_dataset, load_codes
from train.loop import TrainingArguments, make_accelerator, parse_args, run_main, train


@dataclass
class PriorArguments:
    codes: str | None = field(default=None, metadata={"help": "Folder written by train.encode."})
    tokenizer: str | None = field(default=None, metadata={"help": "Without --codes: encode --dataset with this tokenizer first (cached in OUTPUT_DIR/codes)."})  # fmt: skip
    preset: str = field(default="fashion-mnist", metadata={"help": "tiny | fashion-mnist | small | medium"})
    p_uncond: float = field(default=0.1, metadata={"help": "Probability of replacing the class by the null class."})
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    dropout: float | None = None
    sample_guidance_scale: float = field(default=2.0, metadata={"help": "Guidance of the sample grids written at evaluation."})  # fmt: skip
    samples_per_class: int = field(default=4, metadata={"help": "Samples per class in the evaluation grid."})
    encode_batch_size: int = 1024
    tokenizer_hub_id: str | None = field(default=None, metadata={"help": "Record this Hub id as the prior's tokenizer (when the tokenizer was pushed), instead of the local folder the codes name."})  # fmt: skip


def _collate(examples):
    return {
        "codes": torch.from_numpy(np.stack([e["codes"] for e in examples])).long(),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }


class PriorStage:
    name = "prior"

    def __init__(self, info: PriorInfo, args: PriorArguments, tokenizer: VQVAE | None, dataset: str):
        self.info, self.args, self.tokenizer, self.dataset = info, args, tokenizer, dataset

    def training_loss(self, model, batch):
        loss = prior_loss(model, batch["codes"], batch["labels"], self.info.layout, self.args.p_uncond)
        return loss, {"bits_per_token": bits(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        per_seq = []
        for batch in loader:
            nll = prior_loss(model, batch["codes"], batch["labels"], self.info.layout, p_uncond=0.0, reduction="none")
            per_seq.append(accelerator.gather_for_metrics(nll).cpu())
        nats = float(torch.cat(per_seq).mean())
        return {"bits_per_token": bits(nats), "bits_per_image": bits(nats) * self.info.seq_len}

    @torch.no_grad()
    def image(self, model, accelerator):
        if self.tokenizer is None:
            return None
        n = self.args.samples_per_class
        classes = range(self.info.num_classes) if self.info.num_classes else [-1]
        labels = torch.tensor([c for c in classes for _ in range(n)])
        g = torch.Generator(device=accelerator.device).manual_seed(0)
        codes = generate_codes(model, self.info.layout, self.info.seq_len, labels,
                               guidance_scale=self.args.sample_guidance_scale, generator=g)  # fmt: skip
        images = self.tokenizer.to(accelerator.device).decode(codes.view(-1, *self.info.grid))
        return image_grid(images.cpu(), nrow=n)  # one row per class

    def model_card(self, model):
        cfg = model.config
        return dict(
            title=f"vqgpt prior ({self.args.preset})",
            summary=(f"A GPT-2 prior over {self.info.grid[0]}x{self.info.grid[1]} code grids of the tokenizer "
                     f"`{self.info.tokenizer}` (K={self.info.num_codes}), conditioned on {self.info.num_classes} classes "
                     "with classifier-free guidance."),  # fmt: skip
            dataset=self.dataset,
            details={"dataset": self.dataset, "preset": self.args.preset, "tokenizer": self.info.tokenizer,
                     "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "p_uncond": self.args.p_uncond,
                     "uniform baseline (bits/token)": f"{math.log2(self.info.num_codes):.4g}"},  # fmt: skip
            tags=["gpt2", "image-generation", "class-conditional"],
            usage='from sample import ClassConditionalPipeline\npipe = ClassConditionalPipeline.from_pretrained("PATH_OR_REPO_ID")\n'
                  f'images = pipe(["{self.info.class_names[0] if self.info.class_names else 0}"] * 8, guidance_scale=2.0)',
        )  # fmt: skip


def main(argv=None):
    args, data_args, prior_args = parse_args((TrainingArguments, DataArguments, PriorArguments), argv,
                                             lr_scheduler="cosine", learning_rate=6e-4, weight_decay=0.1,
                                             adam_beta2=0.95, lr_warmup_steps=200)  # fmt: skip
    accelerator = make_accelerator(args)
    codes_dir = prior_args.codes
    if codes_dir is None:
        if not prior_args.tokenizer:
            raise ValueError("pass --codes (a train.encode folder) or --tokenizer with --dataset to encode first")
        codes_dir = os.path.join(args.output_dir, "codes")
        if not os.path.exists(os.path.join(codes_dir, "vqgpt_codes.json")):
            encode_dataset(prior_args.tokenizer, data_args, codes_dir, prior_args.encode_batch_size, accelerator)
    codes, meta = load_codes(codes_dir)
    info = PriorInfo.from_dict({**meta, "tokenizer": prior_args.tokenizer_hub_id or meta["tokenizer"]})
    tokenizer = None
    try:
        tokenizer = VQVAE.from_pretrained(meta["tokenizer"]).eval() if meta["tokenizer"] else None
    except Exception as e:  # the grids are a convenience; training does not need the tokenizer
        accelerator.print(f"warning: tokenizer {meta['tokenizer']} not loadable ({type(e).__name__}); no sample grids")
    if tokenizer is not None:
        info.check_tokenizer(tokenizer)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_prior(prior_args.preset, info, n_layer=prior_args.n_layer, n_embd=prior_args.n_embd,
                        n_head=prior_args.n_head, dropout=prior_args.dropout)  # fmt: skip
    train_ds, test_ds = codes["train"], codes["test"]
    if data_args.max_train_samples:
        train_ds = train_ds.select(range(min(data_args.max_train_samples, len(train_ds))))
    if data_args.max_eval_samples:
        test_ds = test_ds.select(range(min(data_args.max_eval_samples, len(test_ds))))
    train_loader = torch.utils.data.DataLoader(train_ds.with_format("numpy"), batch_size=args.train_batch_size,
                                               shuffle=True, drop_last=True, collate_fn=_collate)  # fmt: skip
    eval_loader = torch.utils.data.DataLoader(test_ds.with_format("numpy"), batch_size=args.eval_batch_size, collate_fn=_collate)  # fmt: skip
    stage = PriorStage(info, prior_args, tokenizer, meta.get("dataset", ""))
    metrics = train(accelerator, args, stage, model, train_loader, eval_loader,
                    tracker_config={**asdict(prior_args), "codes": codes_dir})  # fmt: skip
    accelerator.print(f"prior saved to {args.output_dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return model, metrics


if __name__ == "__main__":
    run_main(main)
