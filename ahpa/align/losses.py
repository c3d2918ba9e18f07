"""Alignment losses (paper Eq. 5, App. D.1; docs/design.md section 4).

All losses return one value per sample, ``[B]``, and are computed in float32
whatever the input dtype: an fp16 cosine similarity overflows in the squared
norms and turns into NaN (a known REPA fault).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ahpa.errors import AhpaError

LOSS_KINDS = ("cosine", "l1", "smooth_l1")
COSINE_EPS = 1e-8  # lower bound on each token's norm


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-sample loss between ``pred`` and ``target`` of shape ``[B, C, *spatial]``.

    - ``"cosine"``: negative cosine similarity over channels per token, averaged
      over tokens (in [-1, 1]; -1 = perfectly aligned).
    - ``"l1"``, ``"smooth_l1"`` (beta 1): averaged over channels and tokens.
    """
    if pred.shape != target.shape:
        raise AhpaError(f"projection head output {tuple(pred.shape)} does not match the alignment target {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        per_token = -F.cosine_similarity(pred, target, dim=1, eps=COSINE_EPS)
    elif kind == "l1":
        per_token = (pred - target).abs()
    elif kind == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    else:
        raise AhpaError(f"unknown alignment loss '{kind}'; choose one of: {', '.join(LOSS_KINDS)}")
    return per_token.flatten(1).mean(1)
