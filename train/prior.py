"""Stage two: train the prior (GPT-2 or Llama; over levels of codes also a depth or a next-scale prior) on code sequences.

    accelerate launch -m train.prior --codes runs/codes --preset fashion-mnist --output-dir runs/prior
    accelerate launch -m train.prior --tokenizer runs/tok --dataset fashion_mnist --output-dir runs/prior
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from accelerate import Accelerator

from common.cli import UsageError, option, parse_args, run_main
from common.data import DataArguments, TrainingDataArguments
from common.images import image_grid
from evaluation import Evaluator, load_spaces
from prior import GUIDANCE_SCHEDULES, PriorInfo, bits, build_prior, generate_codes, prior_loss
from prior import ARCHITECTURES, PRESETS, architecture
from sample.pipeline import DEFAULT_SAMPLING, describe_sampling, generation_kwargs
from tokenizer import VQVAE
from train.encode import encode_dataset, load_codes
from train.loop import TrainingArguments, make_accelerator, train


@dataclass
class PriorArguments:
    codes: str | None = option(None, "Folder written by train.encode.")
    tokenizer: str | None = option(None, "Without --codes: encode --dataset with this tokenizer first (cached in OUTPUT_DIR/codes).")  # fmt: skip
    preset: str = option("fashion-mnist", "Model size.", choices=list(PRESETS))
    arch: str = option("gpt2", "gpt2 (GPT2LMHeadModel) or llama (LlamaForCausalLM: RoPE, SwiGLU, RMSNorm) over the flattened codes; over levels of codes also depth (RQ-Transformer: a spatial and a depth Llama) or scales (VAR: next-scale prediction).", choices=list(ARCHITECTURES))  # fmt: skip
    depth_layers: int | None = option(None, "--arch depth: layers of the depth transformer (default 1).", domain="positive")
    p_uncond: float = option(0.1, "Probability of replacing the class by the null class (trains guidance).", domain="probability")  # fmt: skip
    n_layer: int | None = option(None, "Transformer layers (default: the preset's).", domain="positive")
    n_embd: int | None = option(None, "Width (default: the preset's).", domain="positive")
    n_head: int | None = option(None, "Attention heads (default: the preset's).", domain="positive")
    dropout: float | None = option(None, "Dropout (default: the preset's). GPT-2: residual, embedding and attention; Llama and the level priors: attention only (transformers' Llama has no other).", domain="probability")  # fmt: skip
    classifier: str | None = option(None, "Reference classifier: evaluation then samples and reports FD, KID, precision, recall, class accuracy and detail.")  # fmt: skip
    eval_spaces: list[str] = option([], "With --classifier: more feature spaces for that evaluation (as python -m evaluation --spaces).")  # fmt: skip
    eval_samples_per_class: int = option(20, "With --classifier: samples per class scored at each evaluation.", domain="positive")  # fmt: skip
    # The prior's sampling settings: its evaluation samples at them, and they are recorded in its config as
    # the settings it samples at (sample.pipeline.ClassConditionalPipeline.sampling_settings).
    sample_guidance_scale: float = option(DEFAULT_SAMPLING["guidance_scale"], "Guidance the prior samples at (its evaluation, and the pipeline by default).", domain="non-negative")  # fmt: skip
    sample_temperature: float = option(DEFAULT_SAMPLING["temperature"], domain="non-negative")
    sample_top_k: int = option(DEFAULT_SAMPLING["top_k"], "0 = no top-k filtering.", domain="non-negative")
    sample_top_p: float = option(DEFAULT_SAMPLING["top_p"], "1 = no nucleus filtering.", domain="top-p")
    sample_guidance_schedule: str = option(DEFAULT_SAMPLING["guidance_schedule"], "linear: the guidance rises from 1 at the first code to the scale at the last.", choices=list(GUIDANCE_SCHEDULES))  # fmt: skip
    sample_deep_temperature: float | None = option(None, "Multi-level codes: the temperature of the levels after the first (0 = greedy; default as the first).", domain="non-negative")  # fmt: skip
    sample_deep_top_k: int | None = option(None, "Multi-level codes: top-k of the levels after the first (0 = none; default as the first).", domain="non-negative")  # fmt: skip
    samples_per_class: int = option(4, "Samples per class in the evaluation grid.", domain="positive")
    encode_batch_size: int = option(1024, domain="positive")
    levels: int | None = option(None, "Of multi-level codes, model only the first d levels (samples decode from them); default all.", domain="positive")  # fmt: skip
    tokenizer_hub_id: str | None = option(None, "Record this Hub id as the prior's tokenizer (when the tokenizer was pushed), instead of the local folder the codes name.")  # fmt: skip

    def validate(self) -> None:
        if self.codes is None and self.tokenizer is None:
            raise UsageError("pass --codes (a train.encode folder) or --tokenizer with --dataset to encode first")
        if self.depth_layers is not None and self.arch != "depth":
            raise UsageError(f"--depth-layers {self.depth_layers} is for --arch depth (this is --arch {self.arch})")

    def sampling(self) -> dict:
        return {k: getattr(self, f"sample_{k}") for k in DEFAULT_SAMPLING}


def _collate(examples, length: int):
    """A batch of the first ``length`` codes of each example (the levels the prior models) and its labels."""
    return {
        "codes": torch.from_numpy(np.stack([e["codes"][:length] for e in examples])).long(),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }


class PriorStage:
    name = "prior"

    def __init__(self, info: PriorInfo, args: PriorArguments, tokenizer: VQVAE | None, dataset: str,
                 evaluator: Evaluator | None = None):  # fmt: skip
        self.info, self.args, self.tokenizer, self.dataset, self.evaluator = info, args, tokenizer, dataset, evaluator
        self.last_report = None

    def training_loss(self, model, batch, step):
        loss = prior_loss(model, batch["codes"], batch["labels"], self.info.layout, self.args.p_uncond)
        return loss, {"bits_per_token": bits(loss.detach())}

    def _samples(self, model, accelerator, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` images of every class (or unconditional ones), the same on every rank."""
        classes = range(self.info.num_classes) if self.info.num_classes else [-1]
        labels = torch.tensor([c for c in classes for _ in range(per_class)])
        g = torch.Generator(device=accelerator.device).manual_seed(0)
        images = []
        for chunk in labels.split(256):
            codes = generate_codes(model, self.info.layout, self.info.seq_len, chunk, generator=g, **generation_kwargs(self.info.sampling))
            images.append(self.info.decode(self.tokenizer.to(accelerator.device), codes).float().cpu())
        return torch.cat(images), labels

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        per_seq = []
        for batch in loader:
            nll = prior_loss(model, batch["codes"], batch["labels"], self.info.layout, p_uncond=0.0, reduction="none")
            per_seq.append(accelerator.gather_for_metrics(nll).cpu())
        nats = float(torch.cat(per_seq).mean())
        metrics = {"bits_per_token": bits(nats), "bits_per_image": bits(nats) * self.info.seq_len}
        if self.evaluator is not None and self.tokenizer is not None:
            images, labels = self._samples(model, accelerator, self.args.eval_samples_per_class)
            report = self.evaluator.score(images, labels)
            self.last_report = report
            metrics.update(report.scalars())
        return metrics

    @torch.no_grad()
    def image(self, model, accelerator):
        if self.tokenizer is None:
            return None
        images, _ = self._samples(model, accelerator, self.args.samples_per_class)
        return image_grid(images, nrow=self.args.samples_per_class)  # one row per class

    def model_card(self, model):
        cfg = model.config
        arch = architecture(cfg)
        sampling = describe_sampling(self.info.sampling)
        kind = {"gpt2": "A GPT-2 prior", "llama": "A Llama prior", "depth": "A depth-transformer prior (RQ-Transformer, Llama blocks)",
                "scales": "A next-scale prior (VAR, Llama blocks)"}[arch]  # fmt: skip
        return dict(
            title=f"vqgpt prior ({self.args.preset}, {arch})",
            summary=(f"{kind} over {self.info.code_layout.describe()} codes of the tokenizer "
                     f"`{self.info.tokenizer}` (K={self.info.num_codes}), conditioned on {self.info.num_classes} classes "
                     "with classifier-free guidance."
                     + (f" Sample metrics: {self.args.eval_samples_per_class} samples per class ({sampling}), "
                        f"{', '.join(s.name for s in self.evaluator.spaces)} features, against {self.evaluator.reference_name}; "
                        "`fd` and `fd_floor` are the first space's, the floor that of as many real training images." if self.evaluator else "")),  # fmt: skip
            dataset=self.dataset,
            details={"dataset": self.dataset, "preset": self.args.preset, "architecture": arch, "tokenizer": self.info.tokenizer,
                     "layers": cfg.num_hidden_layers, "width": cfg.hidden_size, "heads": cfg.num_attention_heads,
                     "parameters": sum(p.numel() for p in model.parameters()), "p_uncond": self.args.p_uncond,
                     "samples by default at": sampling,
                     "uniform baseline (bits/token)": f"{math.log2(self.info.num_codes):.4g}"},  # fmt: skip
            tags=[arch if arch in ("gpt2", "llama") else "llama", "image-generation", "class-conditional"],
            usage='from sample import ClassConditionalPipeline\npipe = ClassConditionalPipeline.from_pretrained("PATH_OR_REPO_ID")\n'
                  f'images = pipe(["{self.info.class_names[0] if self.info.class_names else 0}"] * 8)',
        )  # fmt: skip


def main(argv=None):
    args, data_args, prior_args = parse_args((TrainingArguments, TrainingDataArguments, PriorArguments), argv,
                                             lr_scheduler="cosine", learning_rate=6e-4, weight_decay=0.1,
                                             adam_beta2=0.95, lr_warmup_steps=200)  # fmt: skip
    accelerator = make_accelerator(args, "prior")
    codes_dir = prior_args.codes
    if codes_dir is None:
        codes_dir = os.path.join(args.output_dir, "codes")
        if not os.path.exists(os.path.join(codes_dir, "vqgpt_codes.json")):
            encode_dataset(prior_args.tokenizer, data_args, codes_dir, prior_args.encode_batch_size, accelerator)
    codes, meta = load_codes(codes_dir)
    info = PriorInfo.from_dict({**meta, "tokenizer": prior_args.tokenizer_hub_id or meta["tokenizer"], "sampling": prior_args.sampling()},
                               levels=prior_args.levels)  # fmt: skip
    tokenizer = None
    try:
        tokenizer = VQVAE.from_pretrained(meta["tokenizer"]).eval() if meta["tokenizer"] else None
    except Exception as e:  # the grids are a convenience; training does not need the tokenizer
        accelerator.print(f"warning: tokenizer {meta['tokenizer']} not loadable ({type(e).__name__}); no sample grids")
    if tokenizer is not None:
        info.check_tokenizer(tokenizer)
    evaluator = None
    if prior_args.classifier:
        if tokenizer is None:
            raise UsageError("--classifier scores samples, which needs the tokenizer the codes name; it could not be loaded")
        spaces, classifier = load_spaces(prior_args.classifier, prior_args.eval_spaces, accelerator.device)
        reference = DataArguments(dataset=meta.get("dataset") or classifier.config.dataset, max_eval_samples=data_args.max_eval_samples)  # fmt: skip
        with accelerator.main_process_first():
            evaluator = Evaluator.from_dataset(spaces, reference, classifier=classifier)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_prior(prior_args.preset, info, arch=prior_args.arch, n_layer=prior_args.n_layer, n_embd=prior_args.n_embd,
                        n_head=prior_args.n_head, dropout=prior_args.dropout, depth_layers=prior_args.depth_layers)  # fmt: skip
    train_ds, test_ds = codes["train"], codes["test"]
    if data_args.max_train_samples:
        train_ds = train_ds.select(range(min(data_args.max_train_samples, len(train_ds))))
    if data_args.max_eval_samples:
        test_ds = test_ds.select(range(min(data_args.max_eval_samples, len(test_ds))))
    collate = functools.partial(_collate, length=info.seq_len)
    train_loader = torch.utils.data.DataLoader(train_ds.with_format("numpy"), batch_size=args.train_batch_size,
                                               shuffle=True, drop_last=True, collate_fn=collate)  # fmt: skip
    eval_loader = torch.utils.data.DataLoader(test_ds.with_format("numpy"), batch_size=args.eval_batch_size, collate_fn=collate)  # fmt: skip
    stage = PriorStage(info, prior_args, tokenizer, meta.get("dataset", ""), evaluator)
    metrics = train(accelerator, args, stage, model, train_loader, eval_loader,
                    tracker_config={**asdict(prior_args), "codes": codes_dir})  # fmt: skip
    return model, metrics, stage


if __name__ == "__main__":
    run_main(main)
