"""One training step's module: the backbone, its alignment objective and the transport, as DDP/FSDP wrap them;
the EMA update and the optimizer's parameter groups.

    batch -> transport (t, eps, x_t) -> backbone -> v -> diffusion loss --+
                                        +-> hidden at block d -> head -+-> align loss (x lambda)
                        features + t -> router -> target -------------+
"""

from __future__ import annotations

import torch

from ahpa.config import Config
from ahpa.distributed import ema_pairs
from ahpa.transport import Transport


class TrainingModule(torch.nn.Module):
    """SiT plus its alignment objective: the one module that DDP wraps."""

    def __init__(self, sit: torch.nn.Module, objective: torch.nn.Module | None, transport: Transport):
        super().__init__()
        self.sit = sit
        self.objective = objective
        self.transport = transport

    def forward(self, x0, y, t, eps, drop, features):
        depths = tuple(self.objective.depths) if self.objective is not None else ()
        out = self.transport.training_losses(
            self.sit, x0, y, hidden_depths=depths, t=t, eps=eps, model_kwargs={"force_drop_ids": drop}
        )
        loss_diff = out["loss"]
        if self.objective is None:
            return loss_diff.mean(), loss_diff.detach().mean(), torch.zeros((), device=x0.device)
        loss_align, _ = self.objective(out["hidden"], features, t, loss_diff=loss_diff)
        return (loss_diff + loss_align).mean(), loss_diff.detach().mean(), loss_align.detach().mean()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, keep: torch.Tensor | None = None) -> None:
    """ema <- ema + (1 - decay) * keep * (model - ema); ``keep`` (device 0/1) masks a skipped step."""
    ema_params, params = ema_pairs(ema, model)  # FSDP: this rank's rows only (sync_ema gathers)
    torch._foreach_lerp_(ema_params, params, 1.0 - decay if keep is None else keep * (1.0 - decay))


def rank_slice(x: torch.Tensor, rank: int, per_rank: int) -> torch.Tensor:
    return x[rank * per_rank : (rank + 1) * per_rank]


def optimizer_param_groups(module: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW parameter groups: one group (the paper), or with ``align.router_lr_mult != 1`` the
    router's parameters in a second group at ``train.lr * router_lr_mult``."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if cfg.align.router_lr_mult == 1.0:
        return [{"params": [p for _, p in params]}]
    router = [p for n, p in params if n.startswith("objective.router.")]
    rest = [p for n, p in params if not n.startswith("objective.router.")]
    return [{"params": rest}, {"params": router, "lr": cfg.train.lr * cfg.align.router_lr_mult}]


