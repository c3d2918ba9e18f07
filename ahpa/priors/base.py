"""What every prior hands to training: latent moments and target features.

A prior is computed from ONE pass of a frozen encoder (docs/design.md section 2).  Its
output is the contract between the extractor (on the fly), the feature cache
(on disk) and the alignment objective:

- ``latent_mean``, ``latent_std``: the VAE posterior moments, ``[B, C, h, w]``,
  unscaled (:func:`normalize_latent` is applied to the sampled latent).
- ``features``: group name (``"G3"``, ``"G4"``, ...) to a tensor
  ``[B, L_k, C_k, H, W]``: the L_k selected layers of group k, resampled to the
  token grid ``H x W`` and NOT yet normalised (normalisation is applied by the
  alignment objective, so the cache stays independent of that choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PriorOutput:
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, *args, **kwargs) -> "PriorOutput":
        return PriorOutput(
            self.latent_mean.to(*args, **kwargs),
            self.latent_std.to(*args, **kwargs),
            {k: v.to(*args, **kwargs) for k, v in self.features.items()},
        )


def _channelwise(v: float | list | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar, or a per-channel list/tensor shaped to broadcast over [B, C, H, W]."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.view(1, -1, 1, 1) if v.ndim else v


def normalize_latent(x: torch.Tensor, scale: float | list | torch.Tensor, shift: float | list | torch.Tensor = 0.0) -> torch.Tensor:
    """VAE latent -> diffusion space: ``(x - shift) * scale``.

    ``scale``/``shift`` are the SD-VAE scaling factor (0.18215) and 0, or
    per-channel values (iREPA's channel statistics: scale = 1/std_c, shift = mean_c).
    """
    return (x - _channelwise(shift, x)) * _channelwise(scale, x)


def denormalize_latent(z: torch.Tensor, scale: float | list | torch.Tensor, shift: float | list | torch.Tensor = 0.0) -> torch.Tensor:
    """Diffusion space -> VAE latent: ``z / scale + shift`` (the inverse of :func:`normalize_latent`)."""
    return z / _channelwise(scale, z) + _channelwise(shift, z)
