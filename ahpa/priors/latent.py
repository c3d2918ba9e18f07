"""SRA2-style latent alignment target: the VAE's own output as a prior group (a RECONSTRUCTION).

SRA2 has no public code.  Its abstract aligns "the intermediate latent features
of diffusion transformers with VAE features via a lightweight projection layer,
supervised by a feature alignment loss"; the AHPA paper calls it alignment to
"the final output of a frozen VAE encoder", a "single compressed latent".  The
reconstruction (``docs/baselines.md``):

- target = the VAE posterior MEAN, scaled exactly like the diffusion input
  (:func:`~ahpa.priors.base.normalize_latent`: SD-VAE x 0.18215, or iREPA's
  per-channel statistics), so it is deterministic (no posterior noise);
- brought to the token grid by ``"patchify"`` (default: each p x p latent patch
  becomes one token of C p^2 channels, channel order ``c p^2 + i p + j`` as
  ``F.pixel_unshuffle``; lossless, 16 channels for SD-VAE at p = 2) or
  ``"pool"`` (average over each p x p patch: C channels);
- group ``"latent"`` ``[B, L=1, C', grid, grid]`` of ``PriorOutput.features``.

It is a function of the latent moments already produced by the one VAE pass
and already stored in every feature cache, so it costs no encoder pass and no
storage: every batch source derives it at batch time (:func:`latent_target`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ahpa.config import LATENT_GROUP
from ahpa.errors import AhpaError
from ahpa.priors.base import normalize_latent

LATENT_TARGETS = ("patchify", "pool")


def latent_group_shape(latent_shape: tuple[int, int, int], grid: int, mode: str = "patchify") -> tuple[int, int]:
    """(L = 1, channels) of the latent group for latents ``[C, h, w]`` on a ``grid x grid`` token grid."""
    if mode not in LATENT_TARGETS:
        raise AhpaError(f"unknown prior.latent_target '{mode}'; choose one of: {', '.join(LATENT_TARGETS)}")
    C, h, w = latent_shape
    if h != w or grid < 1 or h % grid:
        raise AhpaError(f"the SRA2 latent target needs square latents whose side is a multiple of the token grid {grid}; "
                        f"this VAE gives latents {C}x{h}x{w}; use a VAE/resolution whose latent side is {grid} x the SiT patch size")
    p = h // grid
    return 1, C * p * p if mode == "patchify" else C


def latent_target(latent_mean: torch.Tensor, scale, shift, grid: int, mode: str = "patchify",
                  expected: tuple[int, int] | None = None) -> torch.Tensor:
    """``[B, 1, C', grid, grid]`` float32 target from posterior means ``[B, C, h, w]``.

    ``expected`` (L, C') from :func:`latent_group_shape` at set-up: a batch whose latents
    give another shape (a cache of another VAE) is refused.
    """
    if latent_mean.ndim != 4:
        raise AhpaError(f"the SRA2 latent target expects latent means [B, C, h, w], got {tuple(latent_mean.shape)}")
    shape = latent_group_shape(tuple(latent_mean.shape[1:]), grid, mode)
    if expected is not None and tuple(expected) != shape:
        raise AhpaError(f"the latents give an SRA2 target of {shape[1]} channels but the run was set up for {expected[1]} "
                        "(another VAE or latent shape); use the VAE this run was configured with")
    z = normalize_latent(latent_mean.float(), scale, shift)
    p = z.shape[-1] // grid
    z = F.pixel_unshuffle(z, p) if mode == "patchify" else F.avg_pool2d(z, p)
    return z.unsqueeze(1)


def add_latent_target(batch: dict, scale, shift, grid: int, mode: str, expected: tuple[int, int]) -> dict:
    """Add group ``"latent"`` to ``batch["features"]`` (derived from ``batch["latent_mean"]``)."""
    features = dict(batch.get("features") or {})
    features[LATENT_GROUP] = latent_target(batch["latent_mean"], scale, shift, grid, mode, expected)
    return {**batch, "features": features}
