"""Stage one: train the VQ-VAE tokenizer.

    accelerate launch -m train.tokenizer --dataset fashion_mnist --preset fashion-mnist --output-dir runs/tok
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel as unwrap

from common.cli import UsageError, option, parse_args, run_main
from common.data import TrainingDataArguments, image_loader, image_loaders, load_image_data, model_input
from common.images import image_grid, psnr
from evaluation import Embedded, Evaluator, load_spaces
from tokenizer import PRESETS, VQVAE, get_config
from tokenizer.model import QUANTIZERS, VQVAEConfig, check_config
from tokenizer.quantizer import _global_offsets
from tokenizer.losses import PatchDiscriminator, PerceptualLoss, adaptive_weight, discriminator_loss, generator_loss
from train.loop import TrainingArguments, make_accelerator, train


@dataclass
class TokenizerArguments:
    preset: str = option("fashion-mnist", "Model size and codebook.", choices=list(PRESETS))
    num_codes: int | None = option(None, "Override the preset's K.", domain="positive")
    code_dim: int | None = option(None, "Override the preset's D.", domain="positive")
    channels: int | None = option(None, "Override the preset's base width.", domain="positive")
    num_downsamples: int | None = option(None, "Override the preset's stride-2 steps: the code grid is the image size / 2**N (presets: 2).", domain="positive")  # fmt: skip
    dead_threshold: float | None = option(None, "Override the dead-code threshold (0: no restarts).", domain="non-negative")  # fmt: skip
    num_grid_images: int = option(16, "Test images in the reconstruction grid.", domain="positive")
    channels_last: bool = option(False, "NHWC memory format for the convolutions (off: it measured slower on a GPU, docs/scaling.md).")
    classifier: str | None = option(None, "Reference classifier: evaluation then reports the reconstructions' Fréchet distance, KID, precision, recall, class accuracy and detail.")  # fmt: skip
    eval_spaces: list[str] = option([], "With --classifier: more feature spaces for that evaluation (as python -m evaluation --spaces).")  # fmt: skip
    finetune_decoder: str | None = option(None, "Fine-tune only the decoder of this trained tokenizer (taming's decoder-only stage, with --disc-weight): its encoder and codebook, so its codes, stay as they are; the model options are this tokenizer's.")  # fmt: skip
    finetune_levels: int | None = option(None, "With --finetune-decoder: decode the first N levels of the codes (the levels a prior samples); default every prefix by the tokenizer's quantizer dropout.", domain="positive")  # fmt: skip
    # Codebook options (in the quantizer; EMA, restarts and the distributed equivalence hold for all).
    codebook_dim: int | None = option(None, "Quantize in this many dimensions, through 1x1 projections (LlamaGen: 8).", domain="positive")  # fmt: skip
    l2_codes: bool = option(False, "Unit-norm codes: nearest by cosine (LlamaGen); on top of the preset.")
    rotation_trick: bool = option(False, "The rotation trick instead of the straight-through estimator; on top of the preset.")
    # Levels of codes (docs/training.md#levels-of-codes): each level keeps the codebook's guarantees.
    quantizer: str = option("ema", "ema: one level of codes, nearest to an EMA codebook; residual: --levels codes at every position, each quantizing what the levels before it left; multiscale: the residual at each of --scales (VAR); gumbel: Gumbel-softmax codes, one level.", choices=list(QUANTIZERS))  # fmt: skip
    levels: int = option(1, "Levels of a residual quantizer.", domain="positive")
    scales: str | None = option(None, "Scales of a multiscale quantizer, increasing, the last one the code grid: e.g. 1,2,4,7 for 28 px at f=4.")  # fmt: skip
    gumbel_anneal_steps: int | None = option(None, "--quantizer gumbel: steps over which the temperature falls from 1 to 1/16 (default 1000).", domain="positive")  # fmt: skip
    gumbel_kl_weight: float | None = option(None, "--quantizer gumbel: weight of the KL term to uniform codes (default 5e-4).", domain="non-negative")  # fmt: skip
    shared_codebook: bool = option(False, "One codebook for every residual level instead of one each.")
    quantizer_dropout: float = option(0.0, "Fraction of training images that keep only their first d levels (d uniform), so that every prefix of the levels decodes.", domain="probability")  # fmt: skip
    # Losses. The adversarial and perceptual terms are off unless given a weight.
    pixel_loss: str = option("l2", "Reconstruction loss: l2 (MSE, the VQ-VAE's) or l1 (taming's).", choices=["l2", "l1"])
    perceptual_weight: float = option(0.0, "LPIPS weight (needs the lpips package; downloads VGG weights once).", domain="non-negative")  # fmt: skip
    disc_weight: float = option(0.0, "Weight of the adversarial loss; 0 trains no discriminator.", domain="non-negative")
    disc_start: int = option(0, "Step at which the discriminator starts (taming starts it late).", domain="non-negative")
    disc_loss: str = option("hinge", "hinge or non-saturating.", choices=["hinge", "non-saturating"])
    adaptive_disc_weight: bool = option(False, "Scale the adversarial term by taming's gradient-norm ratio at the decoder's last layer.")  # fmt: skip
    disc_lr: float | None = option(None, "Discriminator learning rate; unset: --learning-rate.", domain="positive")
    disc_channels: int = option(64, domain="positive")
    disc_layers: int = option(2, "Stride-2 layers of the PatchGAN (taming: 3 at 256 px; 2 suits 28-64 px).", domain="positive")  # fmt: skip

    def validate(self) -> None:
        """The level options' combinations, in the words of the model's own check (tokenizer.model.check_config)."""
        try:
            check_config(VQVAEConfig(quantizer=self.quantizer, levels=self.levels, shared_codebook=self.shared_codebook,
                                     quantizer_dropout=self.quantizer_dropout, scales=self.scale_list(),
                                     codebook_dim=self.codebook_dim, l2_codes=self.l2_codes, rotation_trick=self.rotation_trick))  # fmt: skip
            if self.quantizer != "gumbel" and (self.gumbel_anneal_steps or self.gumbel_kl_weight is not None):
                raise ValueError("--gumbel-anneal-steps and --gumbel-kl-weight need --quantizer gumbel")
        except ValueError as e:
            raise UsageError(str(e)) from None

    def scale_list(self) -> list[int] | None:
        if self.scales is None:
            return None
        try:
            return [int(s) for s in self.scales.split(",")]
        except ValueError:
            raise UsageError(f"--scales {self.scales!r}: expected a comma list of sizes, e.g. 1,2,4,7") from None


class TokenizerStage:
    name = "tokenizer"

    def __init__(self, data_args: TrainingDataArguments, model_args: TokenizerArguments, grid_images: torch.Tensor,
                 crop: tuple[int, int] | None = None, evaluator: Evaluator | None = None, in_channels: int = 1):  # fmt: skip
        self.data_args, self.model_args, self.grid_images, self.evaluator = data_args, model_args, grid_images, evaluator
        self.crop = crop  # (H, W) of the original images when they were padded
        self.memory_format = torch.channels_last if model_args.channels_last else torch.contiguous_format
        a = model_args
        self.perceptual = PerceptualLoss() if a.perceptual_weight > 0 else None
        # The discriminator is the loop's auxiliary network: its own optimizer, checkpointed with the model.
        self.auxiliary = PatchDiscriminator(in_channels, a.disc_channels, a.disc_layers) if a.disc_weight > 0 else None
        self.auxiliary_lr = a.disc_lr

    @torch.no_grad()
    def _frozen_latent(self, model, x: torch.Tensor, step: int) -> torch.Tensor:
        """Decoder-only fine-tuning: the latent of ``x``'s codes, each image cut to its first d levels (d =
        --finetune-levels, or drawn by the tokenizer's quantizer dropout at this step, per example of the
        global batch as in training), computed without updates to the encoder or the codebook."""
        tok = unwrap(model)
        codes = tok.encode(x)
        levels = tok.num_levels
        if levels == 1:
            return tok.latent(codes).clone()
        if self.model_args.finetune_levels:
            kept = torch.full((len(x),), min(self.model_args.finetune_levels, levels))
        else:
            offset, population = _global_offsets(len(x), x.device)
            g = torch.Generator().manual_seed(tok.config.seed * 1_000_003 + step * 7919 + 5)
            dropped = torch.rand(population, generator=g) < tok.config.quantizer_dropout
            depth = torch.randint(1, levels + 1, (population,), generator=g)
            kept = torch.where(dropped, depth, levels)[offset : offset + len(x)]
        grid = tok.code_layout(*x.shape[-2:]).grid
        parts = {d: tok.latent(codes[(kept == d).to(codes.device)], levels=d, grid=grid) for d in kept.unique().tolist()}
        latent = next(iter(parts.values())).new_zeros(len(x), *next(iter(parts.values())).shape[1:])
        for d, part in parts.items():
            latent[(kept == d).to(latent.device)] = part
        return latent.clone()  # a normal tensor: the decoder's first layer keeps its input for backward

    def training_loss(self, model, batch, step):
        a = self.model_args
        x = batch["pixel_values"].contiguous(memory_format=self.memory_format)
        out = model(x, latent=self._frozen_latent(model, x, step)) if a.finetune_decoder else model(x)
        recon = out.reconstruction
        pixel = (F.l1_loss if a.pixel_loss == "l1" else F.mse_loss)(recon.float(), x.float())
        nll = pixel if self.perceptual is None else pixel + a.perceptual_weight * self.perceptual(recon, x)
        loss = nll + out.commitment_loss
        s = out.stats
        logs = {"rec_loss": out.reconstruction_loss.detach(), "commit_loss": out.commitment_loss.detach()}
        if s:  # the codebook's statistics (none when only the decoder trains)
            logs.update(perplexity=s["perplexity"], usage=s["usage"], window_usage=s["window_usage"], restarted=s["restarted"])
        if self.auxiliary is not None:
            adversarial, disc_loss, weight = self._adversarial(model, x, recon, nll, step)
            loss = loss + weight * adversarial + disc_loss
            logs.update(g_loss=adversarial.detach(), d_loss=disc_loss.detach(), adv_weight=weight)
        return loss, logs

    def _adversarial(self, model, x, recon, nll, step):
        """(generator term, discriminator loss, weight of the generator term) at ``step``; zeros before the start.

        The generator term goes through the plain discriminator with its weights frozen, so it reaches only
        the tokenizer; the discriminator's loss sees the reconstructions detached, so it reaches only the
        discriminator (through its DDP wrapper, which averages its gradients). One backward then trains both.
        """
        a = self.model_args
        zero = recon.new_zeros(())
        if step < a.disc_start:
            return zero, zero, zero
        disc = unwrap(self.auxiliary)
        disc.requires_grad_(False)
        adversarial = generator_loss(a.disc_loss, disc(recon).float())
        disc.requires_grad_(True)
        weight = recon.new_tensor(a.disc_weight)
        if a.adaptive_disc_weight:
            weight = weight * adaptive_weight(nll, adversarial, unwrap(model).decoder.net[-1].weight)
        real, fake = self.auxiliary(torch.cat([x, recon.detach()])).float().chunk(2)
        return adversarial, discriminator_loss(a.disc_loss, real, fake), weight

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict[str, float]:
        tokenizer = unwrap(model)
        levels = tokenizer.num_levels
        counts = torch.zeros(levels, tokenizer.config.num_codes, device=accelerator.device)  # per level
        psnrs, prefix_psnrs, losses, embedded, labels = [], [], [], [], []
        for batch in loader:
            x = batch["pixel_values"].contiguous(memory_format=self.memory_format)
            out = model(x)
            recon = out.reconstruction
            layout = tokenizer.code_layout(*x.shape[-2:])
            # Every shorter prefix of the levels, decoded alone (the codec's lower rates).
            prefixes = [tokenizer.decode(out.indices, levels=d) for d in range(1, levels)]
            if self.crop:  # measure on the original pixels, not the padding
                x, recon = x[..., : self.crop[0], : self.crop[1]], recon[..., : self.crop[0], : self.crop[1]]
                prefixes = [p[..., : self.crop[0], : self.crop[1]] for p in prefixes]
            p, idx = accelerator.gather_for_metrics((psnr(recon, x), out.indices.flatten(1)))
            psnrs.append(p.cpu())
            prefix_psnrs.append(torch.stack([accelerator.gather_for_metrics(psnr(r, x)).cpu() for r in prefixes], 1) if prefixes else None)  # fmt: skip
            for i, level in enumerate(layout.split(idx)):  # each level's (or scale's) codes
                counts[i] += torch.bincount(level.flatten(), minlength=counts.shape[1]).float()
            losses.append(float(out.reconstruction_loss))
            if self.evaluator is not None:  # every space's features on the device, gathered like the rest
                e = self.evaluator.embed_batch(recon.clamp(-1, 1))
                f, lg, detail, y = accelerator.gather_for_metrics((e.features, e.logits, e.detail, batch["labels"]))
                embedded.append(Embedded(f, lg, detail).cpu()), labels.append(y.cpu())
        probs = counts.sum(0) / counts.sum()
        level_usage = (counts > 0).float().mean(1)
        metrics = {
            "psnr": float(torch.cat(psnrs).mean()),
            "codebook_usage": float(level_usage.min()),  # of the least used level
            "perplexity": float(torch.exp(-(probs * probs.clamp(min=1e-10).log()).sum())),
            "rec_loss": sum(losses) / max(len(losses), 1),
        }
        if levels > 1:
            prefix = torch.cat(prefix_psnrs).mean(0)
            metrics.update({f"psnr_levels_{d + 1}": float(v) for d, v in enumerate(prefix)})
            metrics.update({f"codebook_usage_level_{i + 1}": float(u) for i, u in enumerate(level_usage)})
        if embedded:
            report = self.evaluator.score_features(Embedded.cat(embedded), torch.cat(labels))
            metrics.update(report.scalars("recon_"))
        return metrics

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
                     + ("a grid of codes" if model.num_levels == 1 else
                        (f"residual scales {','.join(map(str, cfg.scales))} of codes" if cfg.quantizer == "multiscale" else
                         f"{cfg.levels} residual levels of codes at every position" + (" (one shared codebook)" if cfg.shared_codebook else ""))
                        + ", every prefix of them decodable")
                     + f" from a codebook of K={cfg.num_codes} (D={cfg.code_dim}), downsampling f={cfg.downsample_factor}, "
                     "EMA codebook with dead-code restarts."
                     + (f" Its decoder fine-tuned from `{self.model_args.finetune_decoder}` (encoder and codebooks unchanged)."
                        if self.model_args.finetune_decoder else "")),  # fmt: skip
            dataset=self.data_args.dataset,
            details={"dataset": self.data_args.dataset, **({"decoder fine-tuned from": self.model_args.finetune_decoder} if self.model_args.finetune_decoder
                     else {"preset": self.model_args.preset}), **asdict(cfg)},  # fmt: skip
            tags=["vq-vae", "image-tokenizer"],
            usage='from tokenizer import VQVAE\nmodel = VQVAE.from_pretrained("PATH_OR_REPO_ID")\n'
                  "codes = model.encode(images)   # images: (B, C, H, W) in [-1, 1]\n"
                  "images = model.decode(codes)",
        )  # fmt: skip


def main(argv=None):
    args, data_args, model_args = parse_args((TrainingArguments, TrainingDataArguments, TokenizerArguments), argv)
    accelerator = make_accelerator(args, "tokenizer")
    with accelerator.main_process_first():
        data = load_image_data(data_args, seed=args.seed)
    config = get_config(model_args.preset, in_channels=data.channels, num_codes=model_args.num_codes,
                        code_dim=model_args.code_dim, channels=model_args.channels, num_downsamples=model_args.num_downsamples,
                        dead_threshold=model_args.dead_threshold, seed=args.seed, codebook_dim=model_args.codebook_dim,
                        l2_codes=model_args.l2_codes or None, rotation_trick=model_args.rotation_trick or None,
                        quantizer=model_args.quantizer, levels=model_args.levels, shared_codebook=model_args.shared_codebook,
                        quantizer_dropout=model_args.quantizer_dropout, scales=model_args.scale_list(),
                        gumbel_anneal_steps=model_args.gumbel_anneal_steps, gumbel_kl_weight=model_args.gumbel_kl_weight)  # fmt: skip
    transform, size, original = model_input(data, data_args, data.channels, config.downsample_factor)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if model_args.finetune_decoder:
        model = VQVAE.from_pretrained(model_args.finetune_decoder)
        if model.config.in_channels != data.channels:
            raise UsageError(f"--finetune-decoder {model_args.finetune_decoder}: a {model.config.in_channels}-channel tokenizer; "
                             f"{data_args.dataset} has {data.channels}-channel images")  # fmt: skip
        config = model.config
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)  # the codebook's EMA is never run: encode() makes no updates
    else:
        model = VQVAE(config)
    model = model.to(memory_format=torch.channels_last if model_args.channels_last else torch.contiguous_format)
    model.code_layout(*size)  # a scale list that does not end at these images' grid: one line, before any work
    train_loader, eval_loader = image_loaders(data, transform, args, data_args, accelerator)
    grid_set = data.test.select(range(min(model_args.num_grid_images, len(data.test))))
    grid = next(iter(image_loader(grid_set, transform, len(grid_set), shuffle=False)))["pixel_values"]
    evaluator = None
    if model_args.classifier:
        spaces, classifier = load_spaces(model_args.classifier, model_args.eval_spaces, accelerator.device)
        evaluator = Evaluator(spaces, data, classifier, reference_name=f"{data_args.dataset} test split")
    stage = TokenizerStage(data_args, model_args, grid, crop=original if data_args.pad_to_multiple else None,
                           evaluator=evaluator, in_channels=data.channels)  # fmt: skip
    metrics = train(accelerator, args, stage, model, train_loader, eval_loader,
                    tracker_config={**asdict(data_args), **asdict(model_args)})  # fmt: skip
    return model, metrics, stage


if __name__ == "__main__":
    run_main(main)
