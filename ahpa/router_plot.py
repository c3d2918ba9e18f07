"""Router trajectories along the denoising path (paper Fig. 5, Sec. 5.4).

Left panel: the inter-group scale gamma_k of each group versus t (the paper's
"autonomous handover").  One further panel per group: the intra-group layer
weights softmax(alpha_k) versus t ("microscopic calibration").  The t axis runs
from t = 1 (pure noise) on the left to t = 0 (data) on the right, the order in
which the sampler visits it.
"""

from __future__ import annotations

import os

import torch
from matplotlib.figure import Figure

from ahpa.align.objective import AlignmentObjective
from ahpa.io import atomic_open


def router_deviation(objective: AlignmentObjective, t_points: int = 101) -> float:
    """Largest distance from the static uniform mix over a t grid in [0, 1]:
    ``max(|softmax(alpha_k)_l - 1/L_k|, |gamma_k / K - 1/K|)``.  Zero for an untrained router."""
    w = objective.router_weights(torch.linspace(0.0, 1.0, t_points))
    K = len(objective.groups)
    dev = [(w[f"gamma/{g}"] / K - 1.0 / K).abs().max() for g in objective.groups]
    dev += [(w[f"intra/{g}"] - 1.0 / w[f"intra/{g}"].shape[1]).abs().max() for g in objective.groups]
    return float(torch.stack(dev).max())


def plot_router(objective: AlignmentObjective, path: str | os.PathLike, t_points: int = 101) -> dict:
    """Write the router trajectories as a PNG at ``path`` (atomically) and return the plotted
    values: ``{"t": [T] from 1 to 0, "gamma/<g>": [T], "intra/<g>": [T, L_g]}``."""
    t_grid = torch.linspace(1.0, 0.0, t_points)
    values = {"t": t_grid} | objective.router_weights(t_grid)
    t = t_grid.numpy()
    groups = objective.groups
    fig = Figure(figsize=(4.2 * (1 + len(groups)), 3.4))  # Agg canvas; no pyplot global state
    axes = fig.subplots(1, 1 + len(groups), squeeze=False)[0]
    for g in groups:
        axes[0].plot(t, values[f"gamma/{g}"].numpy(), label=g)
    axes[0].set_title("inter-group scale $\\gamma_k$")
    axes[0].set_ylabel("$\\gamma_k$ (sum = K)")
    for ax, g in zip(axes[1:], groups):
        weights = values[f"intra/{g}"].numpy()
        for layer in range(weights.shape[1]):
            ax.plot(t, weights[:, layer], label=f"layer {layer + 1}")
        ax.set_title(f"{g}: layer weights softmax($\\alpha_{{{g}}}$)")
        ax.set_ylabel("weight (sum = 1)")
    for ax in axes:
        ax.set_xlim(1.0, 0.0)  # noise on the left, data on the right
        ax.set_xlabel("t  (1 = noise  \u2192  0 = data)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=120)
    return values


def plot_router_training(steps: list[int], weights: list[dict], t_values: list[float], groups: list[str],
                         path: str | os.PathLike) -> None:
    """Router weights over training (Fig. 5 across checkpoints): one row for the group scales
    gamma_k and one per group for its layer weights, one column per t, training step on x.
    ``weights[i]`` is ``objective.router_weights(t_values)`` of checkpoint ``steps[i]``."""
    rows = 1 + len(groups)
    fig = Figure(figsize=(3.6 * len(t_values), 2.6 * rows))
    axes = fig.subplots(rows, len(t_values), squeeze=False)
    for j, t in enumerate(t_values):
        ax = axes[0][j]
        for g in groups:
            ax.plot(steps, [float(w[f"gamma/{g}"][j]) for w in weights], marker="o", ms=3, label=g)
        ax.set_title(f"$\\gamma_k$ at t = {t:g}", fontsize=9)
        for i, g in enumerate(groups, start=1):
            ax = axes[i][j]
            L = weights[0][f"intra/{g}"].shape[1]
            for layer in range(L):
                ax.plot(steps, [float(w[f"intra/{g}"][j, layer]) for w in weights], marker="o", ms=3, label=f"layer {layer + 1}")
            ax.set_title(f"{g} layer weights at t = {t:g}", fontsize=9)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xlabel("training step", fontsize=8)
    for row in axes:
        row[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
