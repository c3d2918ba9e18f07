"""The Dynamic Router and its ablation variants (paper Sec. 4.3, App. D.6; docs/design.md section 3).

Every router maps the timestep ``t`` (``[B]``, REPA convention: 0 = data,
1 = noise) to

- intra-group weights ``softmax(alpha_k)``: one weight per layer of group k,
  positive and summing to 1 (paper Eq. 3), and
- inter-group scales ``gamma = K * softmax(beta)`` (``[B, K]``, summing to K,
  so the uniform mix has gamma = 1; paper Eq. 4).

Groups are kept in the order of ``group_layers`` (name -> number of layers).
Single-group and union-of-groups ablations need no special router: they are
only a different ``group_layers``.  Every learned router starts from the
static uniform mix (zero-initialised output), so training begins from the
"Static Uniform" baseline of Table D.15.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ahpa.errors import AhpaError

ROUTER_KINDS = ("dynamic", "uniform", "linear", "lut", "attention", "content")
TIME_ENCODINGS = ("linear", "sinusoidal", "fourier")
SINUSOIDAL_T_SCALE = 1000.0  # t in [0, 1] is scaled to DiT's 0..1000 step range before the sin/cos
FOURIER_SIGMA = 10.0  # std of the random Fourier frequencies (cycles per unit t)
FOURIER_SEED = 0  # the frequencies are a fixed, seeded buffer


class LinearTimeEncoding(nn.Module):
    """``e = W t + b`` (App. D.6, "Linear Projection (Ours)")."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(1, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.proj(t.float()[:, None])


class SinusoidalTimeEncoding(nn.Module):
    """Transformer/DiT sinusoidal embedding of ``1000 t``: ``[cos(w_i t'), sin(w_i t')]``,
    ``w_i = 10000^(-i / (dim/2))``."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = SINUSOIDAL_T_SCALE * t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FourierTimeEncoding(nn.Module):
    """Random Fourier features ``[cos(2 pi b t), sin(2 pi b t)]``, ``b ~ N(0, sigma^2)``
    drawn once from a seeded generator and stored as a buffer (not trained)."""

    def __init__(self, dim: int, sigma: float = FOURIER_SIGMA, seed: int = FOURIER_SEED):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", sigma * torch.randn(dim // 2, generator=gen))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def build_time_encoding(kind: str, dim: int) -> nn.Module:
    if kind not in TIME_ENCODINGS:
        raise AhpaError(f"unknown router time encoding '{kind}'; choose one of: {', '.join(TIME_ENCODINGS)}")
    if kind == "linear":
        return LinearTimeEncoding(dim)
    if dim % 2:
        raise AhpaError(f"the {kind} time encoding needs an even align.time_dim, got {dim}")
    return SinusoidalTimeEncoding(dim) if kind == "sinusoidal" else FourierTimeEncoding(dim)


class Router(nn.Module):
    """Base class: turns ``sum_k L_k + K`` logits into intra weights and gamma."""

    uses_content = False

    def __init__(self, group_layers: dict[str, int]):
        super().__init__()
        if not group_layers or any(n < 1 for n in group_layers.values()):
            raise AhpaError(f"the router needs at least one group with at least one layer, got {group_layers!r}; check prior.groups")
        self.group_layers = dict(group_layers)
        self.groups = list(group_layers)
        self.num_logits = sum(self.group_layers.values()) + len(self.groups)
        self.temperature = 1.0  # softmax temperature (align.router_temperature; 1 = the paper's softmax)

    def split(self, logits: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits ``[B, sum L + K]`` -> (``{g: softmax(alpha_g / T)}``, ``gamma = K softmax(beta / T)``)."""
        *alphas, beta = (logits.float() / self.temperature).split([*self.group_layers.values(), len(self.groups)], dim=1)
        intra = {g: F.softmax(a, dim=1) for g, a in zip(self.groups, alphas)}
        return intra, len(self.groups) * F.softmax(beta, dim=1)

    def logits(self, t: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, t: torch.Tensor, content: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.split(self.logits(t, content))


class UniformRouter(Router):
    """"Static Uniform" (Table D.15): every layer and group weighted equally; no parameters."""

    def logits(self, t: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        return t.new_zeros(t.shape[0], self.num_logits, dtype=torch.float32)


class LinearHeuristicRouter(Router):
    """"Heuristic (Linear)" (Table D.15): uniform within each group; with two groups
    the group weights are ``(1 - t, t)`` for (mid, deep), i.e. ``gamma = K (1 - t, t)``,
    so the deep group leads at high noise (t = 1) and the mid group at t = 0.  The deep
    group is the one with the larger name (G4 > G3), whatever order it is given in."""

    def __init__(self, group_layers: dict[str, int]):
        super().__init__(group_layers)
        if len(self.groups) > 2:
            raise AhpaError(f"the linear heuristic router schedules a mid and a deep group; got {len(self.groups)} groups {self.groups}")
        self.deep = self.groups.index(max(self.groups))

    def forward(self, t: torch.Tensor, content: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        t = t.float().clamp(0.0, 1.0)
        intra = {g: t.new_full((t.shape[0], n), 1.0 / n) for g, n in self.group_layers.items()}
        if len(self.groups) == 1:
            return intra, t.new_ones(t.shape[0], 1)
        share = torch.stack([1 - t, t], dim=1) if self.deep == 1 else torch.stack([t, 1 - t], dim=1)
        return intra, len(self.groups) * share


def _mlp(in_dim: int, hidden: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` linear layers with SiLU between; the last one zero-initialised."""
    if depth < 2:
        raise AhpaError(f"align.router_depth must be at least 2 linear layers, got {depth}")
    layers: list[nn.Module] = []
    for i in range(depth - 1):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.SiLU()]
    last = nn.Linear(hidden, out_dim)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class MLPRouter(Router):
    """The Dynamic Router (Sec. 4.3): time encoding -> ``depth``-layer SiLU MLP -> logits.

    With ``content_dim`` it becomes the content-adaptive variant (App. D.6): the
    globally pooled hidden state ``[B, content_dim]`` of the aligned block is
    projected by a linear layer and added to the time embedding.
    """

    def __init__(self, group_layers: dict[str, int], time_encoding: str = "linear", time_dim: int = 128,
                 hidden: int = 256, depth: int = 4, content_dim: int | None = None):
        super().__init__(group_layers)
        self.time_embed = build_time_encoding(time_encoding, time_dim)
        self.content_proj = nn.Linear(content_dim, time_dim) if content_dim else None
        self.uses_content = self.content_proj is not None
        self.mlp = _mlp(time_dim, hidden, self.num_logits, depth)

    def logits(self, t: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        e = self.time_embed(t)
        if self.content_proj is not None:
            if content is None:
                raise AhpaError("the content-adaptive router needs the pooled hidden state of the aligned block")
            e = e + self.content_proj(content.float())
        return self.mlp(e)


class LUTRouter(Router):
    """Lookup table over ``bins`` uniform time bins (App. D.6): two learnable tables of
    intra and inter logits, indexed by ``floor(t * bins)``; zero-initialised."""

    def __init__(self, group_layers: dict[str, int], bins: int = 10):
        super().__init__(group_layers)
        if bins < 1:
            raise AhpaError(f"align.lut_bins must be at least 1, got {bins}")
        self.bins = bins
        self.intra_table = nn.Parameter(torch.zeros(bins, sum(self.group_layers.values())))
        self.inter_table = nn.Parameter(torch.zeros(bins, len(self.groups)))

    def logits(self, t: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        index = (t.float() * self.bins).long().clamp(0, self.bins - 1)
        return torch.cat([self.intra_table[index], self.inter_table[index]], dim=1)


class AttentionRouter(Router):
    """Attention over learned prototypes (App. D.6): the query is a linear map of the
    time embedding; keys and values are ``prototypes`` learned vectors; the value
    vectors hold logits and start at zero, so the router starts uniform."""

    def __init__(self, group_layers: dict[str, int], time_encoding: str = "linear", time_dim: int = 128, prototypes: int = 8):
        super().__init__(group_layers)
        if prototypes < 1:
            raise AhpaError(f"align.prototypes must be at least 1, got {prototypes}")
        self.time_embed = build_time_encoding(time_encoding, time_dim)
        self.query = nn.Linear(time_dim, time_dim)
        self.keys = nn.Parameter(torch.randn(prototypes, time_dim) / math.sqrt(time_dim))
        self.values = nn.Parameter(torch.zeros(prototypes, self.num_logits))

    def logits(self, t: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        q = self.query(self.time_embed(t))
        attn = F.softmax(q @ self.keys.t() / math.sqrt(q.shape[1]), dim=1)
        return attn @ self.values


def build_router(kind: str, group_layers: dict[str, int], time_encoding: str = "linear", time_dim: int = 128,
                 hidden: int = 256, depth: int = 4, lut_bins: int = 10, prototypes: int = 8,
                 content_dim: int | None = None) -> Router:
    """Build the router ``kind`` (config ``align.router``) for ``group_layers`` (name -> L_k)."""
    if kind == "dynamic":
        return MLPRouter(group_layers, time_encoding, time_dim, hidden, depth)
    if kind == "content":
        if not content_dim:
            raise AhpaError("the content router needs content_dim (the hidden width of the aligned block)")
        return MLPRouter(group_layers, time_encoding, time_dim, hidden, depth, content_dim=content_dim)
    if kind == "uniform":
        return UniformRouter(group_layers)
    if kind == "linear":
        return LinearHeuristicRouter(group_layers)
    if kind == "lut":
        return LUTRouter(group_layers, lut_bins)
    if kind == "attention":
        return AttentionRouter(group_layers, time_encoding, time_dim, prototypes)
    raise AhpaError(f"unknown router '{kind}'; choose one of: {', '.join(ROUTER_KINDS)}")
