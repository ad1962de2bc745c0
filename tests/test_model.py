"""The presets map their intended image sizes to the documented code grids."""

import pytest
import torch

from tokenizer import PRESETS, VQVAE, get_config


@pytest.mark.parametrize("preset,size,grid", [("tiny", 28, 7), ("fashion-mnist", 28, 7), ("fashion-mnist-14", 28, 14), ("rgb-32", 32, 8), ("rgb-32", 64, 16)])  # fmt: skip
def test_preset_grids(preset, size, grid):
    model = VQVAE(get_config(preset)).eval()
    x = torch.rand(2, model.config.in_channels, size, size) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, grid, grid) and codes.dtype == torch.long
    assert model.decode(codes).shape == x.shape


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown tokenizer preset 'huge'; expected one of"):
        get_config("huge")
    assert set(PRESETS) == {"tiny", "fashion-mnist", "fashion-mnist-14", "rgb-32"}


def test_forward_reports_codebook_statistics():
    model = VQVAE(get_config("tiny")).train()
    out = model(torch.rand(4, 1, 28, 28) * 2 - 1)
    assert set(out.stats) == {"perplexity", "usage", "restarted", "counts", "window_usage", "level_usage"}
    assert out.stats["level_usage"] is None, "one level"
    assert out.stats["counts"].sum() == 4 * 49
    assert 0 < out.stats["usage"] <= 1 and out.stats["perplexity"] >= 1
    assert torch.allclose(out.loss, out.reconstruction_loss + out.commitment_loss)
