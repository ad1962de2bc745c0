"""Stage one of vqgpt: the VQ-VAE image tokenizer."""

from .model import PRESETS, VQVAE, VQVAEConfig, VQVAEOutput, get_config
from .quantizer import EMAQuantizer, QuantizerOutput

__all__ = ["PRESETS", "VQVAE", "VQVAEConfig", "VQVAEOutput", "get_config", "EMAQuantizer", "QuantizerOutput"]
