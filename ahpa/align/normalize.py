"""Per-layer normalisation of the hierarchical prior features (docs/design.md section 2).

The paper is silent on normalisation, but the selected VAE layers differ in
scale by orders of magnitude, so without it the router's softmax weights would
be dominated by the loudest layer.  Each layer is normalised on its own, before
the router mixes the layers of a group (paper Eq. 3).
"""

from __future__ import annotations

import torch

from ahpa.errors import AhpaError

NORMALIZE_MODES = ("token", "none", "spatial", "irepa")
IREPA_EPS = 1e-6  # iREPA adds it to the std (ldm/utils.py L113-145)
EPS = 1e-6  # added to the variance; features are float32 by then


def normalize_features(f: torch.Tensor, mode: str = "token", eps: float = EPS, alpha: float = 0.6) -> torch.Tensor:
    """Normalise features ``[B, L, C, H, W]`` layer by layer, in float32.

    - ``"token"`` (default): every token of every layer is standardised over its
      C channels, ``(f - mean_C) / sqrt(var_C + eps)`` (biased variance; a
      LayerNorm without learned parameters).
    - ``"spatial"``: every channel of every layer is z-scored over H, W.
    - ``"irepa"``: iREPA's spatial normalisation of teacher tokens,
      ``(f - alpha * mean_T) / (std_T + 1e-6)`` over the tokens, per channel and
      image, unbiased std (its code default alpha = 0.6; its README writes 1).
    - ``"none"``: the features are only cast to float32.
    """
    if f.dim() != 5:
        raise AhpaError(f"prior features must be [B, L, C, H, W], got shape {tuple(f.shape)}; check the feature cache or prior")
    f = f.float()
    if mode == "none":
        return f
    if mode == "irepa":
        std, mean = torch.std_mean(f, dim=(3, 4), correction=1, keepdim=True)
        return (f - alpha * mean) / (std + IREPA_EPS)
    if mode == "token":
        dims: tuple[int, ...] = (2,)
    elif mode == "spatial":
        dims = (3, 4)
    else:
        raise AhpaError(f"unknown feature normalisation '{mode}'; choose one of: {', '.join(NORMALIZE_MODES)}")
    var, mean = torch.var_mean(f, dim=dims, correction=0, keepdim=True)
    return (f - mean) * torch.rsqrt(var + eps)
