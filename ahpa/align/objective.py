"""The AHPA alignment objective (paper Sec. 4.3-4.4; docs/design.md sections 3-4).

One module holds everything the alignment branch trains: the router and one
projection head per alignment depth.  Given the SiT hidden states of the
aligned blocks, the prior features and the timestep, it returns the per-sample
alignment loss, already multiplied by lambda, so that the training loop only
adds it to the diffusion loss: ``L = L_diff + lambda * L_align``.

The target is built from the detached prior features (paper Eqs. 3-4):
``Y = concat_k(gamma_k * sum_l softmax(alpha_k)_l * norm(F_{k,l}))``, channels
concatenated in the order of ``group_shapes``.  The router learns from the
alignment loss alone and nothing of the target reaches the backbone; the
backbone's gradient comes only through the head.  The objective is saved on its
own (``objective.safetensors``): the SiT state dict never holds these weights,
and sampling never runs them (docs/design.md section 4).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from ahpa.align.heads import build_head
from ahpa.align.losses import LOSS_KINDS, alignment_loss
from ahpa.align.normalize import NORMALIZE_MODES, normalize_features
from ahpa.align.router import build_router
from ahpa.errors import AhpaError

ROUTER_SIGNALS = ("alignment", "usefulness")  # what trains the router (docs/design.md section 13)


class AlignmentObjective(nn.Module):
    """Router + projection heads + alignment loss.

    Args:
        hidden_size: width D of the SiT hidden states.
        grid: token grid side (tokens are ``grid * grid``, row-major as DiT patchifies).
        group_shapes: group name -> (L_k layers, C_k channels), e.g. ``{"G3": (4, 512), "G4": (4, 512)}``.
        depths: 1-indexed blocks whose output is aligned; with several, the loss is their mean.
        router, time_encoding, time_dim, router_hidden, router_depth, lut_bins, prototypes:
            see :func:`ahpa.align.router.build_router` (config ``align.*``).
        head: projection head kind (:func:`ahpa.align.heads.build_head`).
        loss: ``"cosine"`` | ``"l1"`` | ``"smooth_l1"``.
        weight: lambda.
        normalize: per-layer feature normalisation (``prior.normalize``).
        normalize_alpha: iREPA's alpha for ``normalize="irepa"`` (``prior.normalize_alpha``).
        router_entropy, router_temperature, router_warmup_steps: controls of the router's
            collapse (``align.router_*``, all off by default = the paper's method):
            an entropy bonus ``- c * H`` on the router's softmaxes, the softmax temperature,
            and a warm-up that blends the static uniform mix into the router's weights
            linearly over the first N training steps (the trainer calls :meth:`set_step`).
        router_signal: what trains the router.  ``"alignment"`` (the paper): the alignment loss, through
            the target.  ``"usefulness"`` (docs/design.md section 13): the router is detached from the
            alignment loss and maximises ``router_usefulness * E[sum_k gamma_k / K sum_l alpha_kl u_kl]``,
            where ``u_kl`` is the cosine, per sample, between the diffusion loss's gradient and the gradient
            of the alignment loss to layer l of group k alone, both at the aligned hidden state (App. E.1's
            agreement).  It needs the per-sample diffusion loss (``forward(..., loss_diff=)``).
    """

    def __init__(self, hidden_size: int, grid: int, group_shapes: dict[str, tuple[int, int]], depths: Sequence[int],
                 router: str = "dynamic", head: str = "conv3", loss: str = "cosine", weight: float = 1.0,
                 normalize: str = "token", time_encoding: str = "linear", time_dim: int = 128,
                 router_hidden: int = 256, router_depth: int = 4, lut_bins: int = 10, prototypes: int = 8,
                 normalize_alpha: float = 0.6,
                 router_entropy: float = 0.0, router_temperature: float = 1.0, router_warmup_steps: int = 0,
                 router_signal: str = "alignment", router_usefulness: float = 1.0):
        super().__init__()
        if router_temperature <= 0 or router_entropy < 0 or router_warmup_steps < 0:
            raise AhpaError(f"router controls out of range: temperature {router_temperature} must be > 0, entropy "
                            f"{router_entropy} and warm-up steps {router_warmup_steps} must be >= 0")
        if router_signal not in ROUTER_SIGNALS:
            raise AhpaError(f"unknown router signal '{router_signal}'; choose one of: {', '.join(ROUTER_SIGNALS)}")
        if not depths or any(d < 1 for d in depths):
            raise AhpaError(f"alignment depths must be 1-indexed block numbers, got {list(depths)}")
        if loss not in LOSS_KINDS:
            raise AhpaError(f"unknown alignment loss '{loss}'; choose one of: {', '.join(LOSS_KINDS)}")
        if normalize not in NORMALIZE_MODES:
            raise AhpaError(f"unknown feature normalisation '{normalize}'; choose one of: {', '.join(NORMALIZE_MODES)}")
        self.hidden_size, self.grid = hidden_size, grid
        self.group_shapes = {g: (int(L), int(C)) for g, (L, C) in group_shapes.items()}
        self.groups = list(self.group_shapes)
        self.depths = [int(d) for d in depths]
        self.loss_kind, self.weight, self.normalize = loss, float(weight), normalize
        self.normalize_alpha = float(normalize_alpha)  # normalize="irepa" only
        self.router = build_router(
            router, {g: L for g, (L, _) in self.group_shapes.items()}, time_encoding=time_encoding,
            time_dim=time_dim, hidden=router_hidden, depth=router_depth, lut_bins=lut_bins,
            prototypes=prototypes, content_dim=hidden_size if router == "content" else None,
        )
        self.router.temperature = float(router_temperature)
        self.router_entropy, self.router_warmup_steps = float(router_entropy), int(router_warmup_steps)
        self.router_signal, self.router_usefulness = router_signal, float(router_usefulness)
        # Training step for the warm-up; not persistent (checkpoints keep their keys), the trainer sets it every step.
        self.register_buffer("step", torch.zeros((), dtype=torch.float32), persistent=False)
        self.target_dim = sum(C for _, C in self.group_shapes.values())
        self.heads = nn.ModuleDict({str(d): build_head(head, hidden_size, self.target_dim) for d in self.depths})

    def normalized_features(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The detached, normalised features ``[B, L_k, C_k, grid, grid]`` of every group, shapes checked."""
        out = {}
        for g in self.groups:
            if g not in features:
                raise AhpaError(f"prior features lack group '{g}' (have {sorted(features)}); the cache or prior must provide prior.groups")
            f = features[g].detach()
            L, C = self.group_shapes[g]
            if f.dim() != 5 or tuple(f.shape[1:]) != (L, C, self.grid, self.grid):
                raise AhpaError(f"prior features of group '{g}' have shape {tuple(f.shape)}, expected [B, {L}, {C}, {self.grid}, {self.grid}]; "
                                "the cache or prior does not match this model's token grid or prior.split")
            out[g] = normalize_features(f, self.normalize, alpha=self.normalize_alpha)
        return out

    def alignment_target(self, features: dict[str, torch.Tensor], t: torch.Tensor,
                         content: torch.Tensor | None = None, *, normalized: dict[str, torch.Tensor] | None = None,
                         detach_router: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ``Y`` ``[B, sum C_k, grid, grid]`` (float32) and ``gamma`` ``[B, K]`` (Eqs. 3-4)."""
        intra, gamma = self.warmed_up(*self.router(t, content))
        if detach_router:  # router_signal=usefulness: the alignment loss does not train the router
            intra, gamma = {g: a.detach() for g, a in intra.items()}, gamma.detach()
        normalized = self.normalized_features(features) if normalized is None else normalized
        parts = [gamma[:, k, None, None, None] * torch.einsum("bl,blchw->bchw", intra[g], normalized[g]) for k, g in enumerate(self.groups)]
        return torch.cat(parts, dim=1), gamma

    def usefulness(self, h: torch.Tensor, pred: torch.Tensor, normalized: dict[str, torch.Tensor],
                   loss_diff: torch.Tensor) -> dict[str, torch.Tensor]:
        """``u_kl`` per sample, ``{group: [B, L_k]}``: the cosine between ``d loss_diff_i / d h_i`` and the gradient,
        at the same hidden state ``h_i``, of the alignment loss of head output ``pred`` to layer l of group k alone.

        Positive where a step down the alignment loss to that layer is also a step down the diffusion loss.
        Every sample's loss depends on its own hidden state only, so the gradients of the batch sums are the
        per-sample gradients.  The M = sum_k L_k head gradients are one batched vector-Jacobian product
        (``is_grads_batched``, vmap inside autograd).  Nothing here is kept in the graph: the values are
        weights of the router's loss, not paths for the backbone's gradient.
        """
        g_diff = torch.autograd.grad(loss_diff.sum(), h, retain_graph=True)[0].flatten(1).float()
        with torch.enable_grad():
            p = pred.detach().float().requires_grad_(True)
            grads, offset = [], 0
            for g in self.groups:
                L, C = self.group_shapes[g]
                part = p[:, offset : offset + C]
                for l in range(L):
                    grads.append(torch.autograd.grad(alignment_loss(part, normalized[g][:, l], self.loss_kind).sum(), p)[0])
                offset += C
        g_head = torch.autograd.grad(pred, h, grad_outputs=torch.stack(grads).to(pred.dtype), retain_graph=True,
                                     is_grads_batched=True)[0]  # [M, B, N, D]
        u = torch.nn.functional.cosine_similarity(g_head.flatten(2).float(), g_diff[None], dim=2, eps=1e-12)  # [M, B]
        out, start = {}, 0
        for g in self.groups:
            L = self.group_shapes[g][0]
            out[g] = u[start : start + L].T.detach()
            start += L
        return out

    def router_content(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The content router's input (App. D.6): the pooled tokens of the first aligned block, detached so that the
        target stays a target; None for the other routers."""
        return hidden[self.depths[0]].detach().float().mean(dim=1) if self.router.uses_content else None

    def predict(self, h: torch.Tensor, depth: int) -> torch.Tensor:
        """The projection head of block ``depth`` on its hidden state ``h`` ``[B, N, D]`` -> ``[B, sum C_k, grid, grid]``."""
        B, N, D = h.shape
        if N != self.grid * self.grid or D != self.hidden_size:
            raise AhpaError(f"hidden state of block {depth} is {tuple(h.shape)}, expected [B, {self.grid * self.grid}, {self.hidden_size}]")
        x = h.transpose(1, 2).reshape(B, D, self.grid, self.grid)  # token i * grid + j -> (row i, column j)
        return self.heads[str(depth)](x)

    def set_step(self, step: int) -> None:
        """The training step (for ``router_warmup_steps``); in place, so no recompilation under torch.compile."""
        self.step.fill_(float(step))

    def warmed_up(self, intra: dict[str, torch.Tensor], gamma: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Blend ``(1 - w) * uniform + w * router``, ``w = min(step / warmup, 1)`` (no-op without warm-up)."""
        if self.router_warmup_steps <= 0:
            return intra, gamma
        w = (self.step / self.router_warmup_steps).clamp(max=1.0)
        intra = {g: (1 - w) / a.shape[1] + w * a for g, a in intra.items()}
        return intra, (1 - w) + w * gamma

    def router_entropy_bonus(self, t: torch.Tensor, content: torch.Tensor | None = None) -> torch.Tensor:
        """Mean normalised entropy ``H / log n`` (in [0, 1]) of the router's softmaxes per sample ``[B]``:
        the intra-group softmax of every group with more than one layer and the inter-group softmax."""
        intra, gamma = self.router(t, content)
        probs = [a for a in intra.values() if a.shape[1] > 1] + ([gamma / gamma.shape[1]] if gamma.shape[1] > 1 else [])
        if not probs:
            return t.new_zeros(t.shape[0], dtype=torch.float32)
        ent = [-(p * p.clamp_min(1e-12).log()).sum(1) / math.log(p.shape[1]) for p in probs]
        return torch.stack(ent).mean(0)

    def forward(self, hidden: dict[int, torch.Tensor], features: dict[str, torch.Tensor],
                t: torch.Tensor, loss_diff: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample ``lambda * L_align`` ``[B]`` and statistics: the unweighted mean loss
        ``align_loss`` and the batch-mean ``gamma_<group>``.  ``loss_diff``: the per-sample diffusion
        loss, for ``router_signal="usefulness"`` (without it, or without grad, the router gets no signal)."""
        for d in self.depths:
            if d not in hidden:
                raise AhpaError(f"no hidden state for alignment depth {d} (have {sorted(hidden)}); pass hidden_depths={self.depths} to the model")
        # The target is a fixed-precision teacher signal: built in float32 outside autocast.
        device_type = t.device.type
        fp32 = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()
        with fp32:
            # Content router (App. D.6): pooled tokens of the first aligned block, detached so
            # that the target stays a target and the backbone learns only through the head.
            content = self.router_content(hidden)
            normalized = self.normalized_features(features)
            useful = self.router_signal == "usefulness" and loss_diff is not None and torch.is_grad_enabled()
            target, gamma = self.alignment_target(features, t, content, normalized=normalized, detach_router=self.router_signal == "usefulness")
        losses, utility = [], []
        for d in self.depths:
            h = hidden[d]
            pred = self.predict(h, d)
            losses.append(alignment_loss(pred, target, self.loss_kind))
            if useful:
                with fp32:
                    utility.append(self.usefulness(h, pred, normalized, loss_diff))
        align = torch.stack(losses).mean(dim=0)
        # 0-d tensors left on the device (no host sync per step); float() them to log.
        stats = {"align_loss": align.mean().detach()}
        stats |= {f"gamma_{g}": gamma[:, k].mean().detach() for k, g in enumerate(self.groups)}
        loss = self.weight * align
        if utility:  # the usefulness signal: it reaches only the router (u is detached, the target too)
            with fp32:
                intra, gamma_raw = self.router(t, content)
                K = gamma_raw.shape[1]
                mixed = [sum(gamma_raw[:, k] / K * (intra[g] * u[g]).sum(1) for k, g in enumerate(self.groups)) for u in utility]
                value = torch.stack(mixed).mean(0)
            stats["router_usefulness"] = value.mean().detach()
            loss = loss - self.router_usefulness * value
        if self.router_entropy > 0:  # the bonus rewards spread weights; it reaches only the router
            with fp32:
                bonus = self.router_entropy_bonus(t, content)
            stats["router_entropy"] = bonus.mean().detach()
            loss = loss - self.router_entropy * bonus
        return loss, stats

    @torch.no_grad()
    def router_weights(self, t_grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Router output on ``t_grid`` ``[T]`` as CPU float tensors (content router: zero content):
        ``{"gamma/G3": [T], ..., "intra/G3": [T, L_G3], ...}``, groups in target order."""
        device = next(self.heads.parameters()).device
        t = t_grid.detach().to(device=device, dtype=torch.float32).flatten()
        content = t.new_zeros(t.shape[0], self.hidden_size) if self.router.uses_content else None
        intra, gamma = self.router(t, content)
        weights = {f"gamma/{g}": gamma[:, k].cpu() for k, g in enumerate(self.groups)}
        return weights | {f"intra/{g}": intra[g].cpu() for g in self.groups}


def extra_parameters(objective: nn.Module) -> int:
    """Number of parameters the alignment branch adds to training (0 at inference)."""
    return sum(p.numel() for p in objective.parameters())
