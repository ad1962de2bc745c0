"""The VQGAN losses of the tokenizer: a PatchGAN discriminator, hinge / non-saturating GAN losses,
taming's adaptive weight, and LPIPS as a perceptual loss.

taming-transformers trains with L1 + LPIPS + a PatchGAN started late, with the adversarial term scaled by
the ratio of gradient norms at the decoder's last layer; LlamaGen with L2 + LPIPS + PatchGAN at a fixed
weight. Both are options of ``train.tokenizer``; what wins on Fashion-MNIST is recorded in docs/tokenizer.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, taming's NLayerDiscriminator): one real/fake logit per image patch.

    GroupNorm replaces BatchNorm, so the real and the fake half of one batch do not share statistics and
    every process normalises alike; weights start as in taming (N(0, 0.02) convs, N(1, 0.02) norm scales).
    """

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last block keeps the resolution, as in taming
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        seq += [nn.Conv2d(width, 1, 4, 1, 1)]  # (B, 1, h', w') logits
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge: ``(relu(1 - D(x)) + relu(1 + D(G(z)))) / 2``; non-saturating: the same with softplus."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Hinge: ``-D(G(z))``; non-saturating: ``softplus(-D(G(z)))`` (= -log sigmoid)."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, limit: float = 1e4) -> torch.Tensor:
    """taming's balance: ``|grad nll| / (|grad g_loss| + 1e-4)`` at the decoder's last layer, clamped, constant.

    It scales the adversarial term to pull on the decoder as hard as the reconstruction does, whatever
    the two losses' scales.
    """
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, limit).detach()


class PerceptualLoss(nn.Module):
    """LPIPS (Zhang et al. 2018, VGG) through the ``lpips`` package; frozen. Grayscale is repeated to RGB.

    The package downloads its VGG backbone on first use, so this loss needs a network once; without it,
    or without the package, it fails with one line.
    """

    def __init__(self):
        super().__init__()
        try:
            import lpips
        except Exception as e:  # not installed, or torchvision missing / broken
            raise UserError(f"--perceptual-weight needs the lpips package and torchvision ({type(e).__name__}); "
                            "pip install 'vqgpt[lpips]'") from None  # fmt: skip
        try:
            self.net = lpips.LPIPS(net="vgg", verbose=False).eval()
        except Exception as e:
            raise UserError(f"LPIPS could not load its VGG weights ({type(e).__name__}); they are downloaded on first use, "
                            "so --perceptual-weight needs a network once") from None  # fmt: skip
        self.net.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.net(x.float(), y.float()).mean()
