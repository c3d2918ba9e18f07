"""What every prior hands to training: latent moments and target features.

A prior is computed from ONE pass of a frozen encoder (SPEC section 2).  Its
output is the contract between the extractor (on the fly), the feature cache
(on disk) and the alignment objective:

- ``latent_mean``, ``latent_std``: the VAE posterior moments, ``[B, C, h, w]``,
  unscaled (the scaling factor is applied when a latent is sampled).
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


def sample_latent(
    mean: torch.Tensor,
    std: torch.Tensor,
    scale: float | torch.Tensor = 0.18215,
    shift: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x0 = (mean + std * eps - shift) * scale from the stored posterior.

    ``scale``/``shift`` are the SD-VAE scaling factor (0.18215, shift 0) by
    default, or per-channel tensors ``[C]`` (iREPA's channel statistics, with
    scale = 1/std_c and shift = mean_c).
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    x = mean + std * eps
    if isinstance(shift, torch.Tensor):
        shift = shift.to(x).view(1, -1, 1, 1)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(x).view(1, -1, 1, 1)
    return (x - shift) * scale
