"""Stage one: train the VQ-VAE tokenizer.

    accelerate launch -m train.tokenizer --dataset fashion_mnist --preset fashion-mnist --output-dir runs/tok
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator

from tokenizer import VQVAE, get_config
from tokenizer.images import image_grid, psnr
from train.data import DataArguments, image_loader, load_image_data, model_input
from train.loop import TrainingArguments, make_accelerator, parse_args, run_main, train


@dataclass
class TokenizerArguments:
    preset: str = field(default="fashion-mnist", metadata={"help": "tiny | fashion-mnist | rgb-32"})
    num_codes: int | None = field(default=None, metadata={"help": "Override the preset's K."})
    code_dim: int | None = field(default=None, metadata={"help": "Override the preset's D."})
    channels: int | None = field(default=None, metadata={"help": "Override the preset's base width."})
    dead_threshold: float | None = field(default=None, metadata={"help": "Override the dead-code threshold."})
    num_grid_images: int = field(default=16, metadata={"help": "Test images in the reconstruction grid."})


class TokenizerStage:
    name = "tokenizer"

    def __init__(self, data_args: DataArguments, model_args: TokenizerArguments, grid_images: torch.Tensor,
                 crop: tuple[int, int] | None = None):  # fmt: skip
        self.data_args, self.model_args, self.grid_images = data_args, model_args, grid_images
        self.crop = crop  # (H, W) of the original images when they were padded

    def training_loss(self, model, batch):
        out = model(batch["pixel_values"])
        s = out.stats
        logs = {"rec_loss": out.reconstruction_loss.detach(), "commit_loss": out.commitment_loss.detach(),
                "perplexity": s["perplexity"], "usage": s["usage"], "restarted": s["restarted"]}  # fmt: skip
        return out.loss, logs

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        counts = torch.zeros(model.config.num_codes, device=accelerator.device)
        psnrs, losses = [], []
        for batch in loader:
            x = batch["pixel_values"]
            out = model(x)
            recon = out.reconstruction
            if self.crop:  # measure on the original pixels, not the padding
                x, recon = x[..., : self.crop[0], : self.crop[1]], recon[..., : self.crop[0], : self.crop[1]]
            p, idx = accelerator.gather_for_metrics((psnr(recon, x), out.indices))
            psnrs.append(p.cpu())
            counts += torch.bincount(idx.flatten(), minlength=counts.numel()).float()
            losses.append(float(out.reconstruction_loss))
        probs = counts / counts.sum()
        return {
            "psnr": float(torch.cat(psnrs).mean()),
            "codebook_usage": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(probs * probs.clamp(min=1e-10).log()).sum())),
            "rec_loss": sum(losses) / max(len(losses), 1),
        }

    @torch.no_grad()
    def image(self, model, accelerator):
        x = self.grid_images.to(accelerator.device)
        recon = model(x).reconstruction
        return image_grid(torch.cat([x, recon]).cpu(), nrow=len(x))  # originals above reconstructions

    def model_card(self, model):
        cfg = model.config
        return dict(
            title=f"vqgpt tokenizer ({self.model_args.preset})",
            summary=(f"A VQ-VAE image tokenizer trained with vqgpt: {cfg.in_channels}-channel images -> "
                     f"a grid of codes from a codebook of K={cfg.num_codes} (D={cfg.code_dim}), downsampling f={cfg.downsample_factor}, "
                     "EMA codebook with dead-code restarts."),  # fmt: skip
            dataset=self.data_args.dataset,
            details={"dataset": self.data_args.dataset, "preset": self.model_args.preset, **asdict(cfg)},
            tags=["vq-vae", "image-tokenizer"],
            usage='from tokenizer import VQVAE\nmodel = VQVAE.from_pretrained("PATH_OR_REPO_ID")\n'
                  "codes = model.encode(images)   # images: (B, C, H, W) in [-1, 1]\n"
                  "images = model.decode(codes)",
        )  # fmt: skip


def main(argv=None):
    args, data_args, model_args = parse_args((TrainingArguments, DataArguments, TokenizerArguments), argv)
    accelerator = make_accelerator(args)
    with accelerator.main_process_first():
        data = load_image_data(data_args, seed=args.seed)
    config = get_config(model_args.preset, in_channels=data.channels, num_codes=model_args.num_codes,
                        code_dim=model_args.code_dim, channels=model_args.channels,
                        dead_threshold=model_args.dead_threshold, seed=args.seed)  # fmt: skip
    transform, _, original = model_input(data, data_args, data.channels, config.downsample_factor)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = VQVAE(config)
    train_loader = image_loader(data.train, transform, args.train_batch_size, shuffle=True,
                                num_workers=data_args.num_workers, drop_last=True)  # fmt: skip
    eval_loader = image_loader(data.test, transform, args.eval_batch_size, shuffle=False, num_workers=data_args.num_workers)  # fmt: skip
    grid_set = data.test.select(range(min(model_args.num_grid_images, len(data.test))))
    grid = next(iter(image_loader(grid_set, transform, len(grid_set), shuffle=False)))["pixel_values"]
    stage = TokenizerStage(data_args, model_args, grid, crop=original if data_args.pad_to_multiple else None)
    metrics = train(accelerator, args, stage, model, train_loader, eval_loader,
                    tracker_config={**asdict(data_args), **asdict(model_args)})  # fmt: skip
    accelerator.print(f"tokenizer saved to {args.output_dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return model, metrics


if __name__ == "__main__":
    run_main(main)
