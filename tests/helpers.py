"""Small randomly initialised models shared by several test files."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn


def small_vae(block_out_channels: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> AutoencoderKL:
    """A frozen AutoencoderKL with SD-VAE's block types at small widths (32 px inputs)."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    return vae.requires_grad_(False).eval()


def randomised(model: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Overwrite every trainable weight but ``pos_embed`` (adaLN-Zero would make SiT blocks the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
