"""Projection heads from the aligned block to the target width (Sec. 4.4, App. D.1).

Every head maps hidden tokens laid out on the grid, ``[B, D, h, w]``, to
``[B, C_out, h, w]``.  Default: one 3x3 convolution (Table D.13 (l)); its
spatial support smooths the resampling artefacts of the pooled VAE features.
"""

from __future__ import annotations

import math

from torch import nn

from ahpa.errors import AhpaError

HEAD_KINDS = ("conv3", "linear", "mlp3", "mlp5", "convblock2", "convblock3", "convblock5", "sra_mlp")
MLP_HIDDEN = 2048  # REPA's projector width (build_mlp, projector_dim=2048)
GROUPNORM_GROUPS = 32


def _token_mlp(in_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers`` token-wise linear layers (1x1 convs), width 2048, SiLU between; xavier-uniform
    weights and zero biases, as REPA initialises its projector (its SiT ``_basic_init``)."""
    widths = [in_dim] + [MLP_HIDDEN] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Conv2d(widths[i], widths[i + 1], 1))
        nn.init.xavier_uniform_(modules[-1].weight)  # fans of a 1x1 conv = those of the Linear layer
        nn.init.zeros_(modules[-1].bias)
        if i < layers - 1:
            modules.append(nn.SiLU())
    return nn.Sequential(*modules)


def _conv_block(in_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers - 1`` blocks of (3x3 conv, GroupNorm, SiLU) at width ``out_dim``, then a 3x3 conv."""
    modules: list[nn.Module] = []
    for i in range(layers - 1):
        modules += [
            nn.Conv2d(in_dim if i == 0 else out_dim, out_dim, 3, padding=1),
            nn.GroupNorm(math.gcd(GROUPNORM_GROUPS, out_dim), out_dim),
            nn.SiLU(),
        ]
    modules.append(nn.Conv2d(out_dim, out_dim, 3, padding=1))
    return nn.Sequential(*modules)


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build projection head ``kind`` (config ``align.head``): ``[B, in_dim, h, w] -> [B, out_dim, h, w]``."""
    if kind == "conv3":
        return nn.Conv2d(in_dim, out_dim, 3, padding=1)
    if kind == "linear":
        return nn.Conv2d(in_dim, out_dim, 1)
    if kind in ("mlp3", "mlp5"):
        return _token_mlp(in_dim, out_dim, int(kind[-1]))
    if kind in ("convblock2", "convblock3", "convblock5"):
        return _conv_block(in_dim, out_dim, int(kind[-1]))
    if kind == "sra_mlp":  # the SRA authors' head (SiT-SRA/models/sit.py L18-27): Linear(in, in+out), SiLU, Linear(in+out, out)
        return nn.Sequential(nn.Conv2d(in_dim, in_dim + out_dim, 1), nn.SiLU(), nn.Conv2d(in_dim + out_dim, out_dim, 1))
    raise AhpaError(f"unknown projection head '{kind}'; choose one of: {', '.join(HEAD_KINDS)}")
