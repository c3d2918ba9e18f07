"""G-SNR of the alignment gradient at one batch (paper Sec. 3; docs/design.md section 6).

    tr(S) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1)
    G-SNR = ||g_bar||^2 / tr(S)            (per-sample form)
    n * G-SNR                              (batch-mean form: the SNR of the batch-mean gradient)

plus the cosine between the mean diffusion gradient and ``g_bar`` (gradient conflict, App. E.1).
The command that sweeps t and targets is :mod:`ahpa.diagnostics.gsnr`; the cheap monitor of a
training run is :func:`training_gsnr`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ahpa.data.sampler import step_generator
from ahpa.errors import AhpaError
from ahpa.probe.per_sample import GradStats, grad_stats

PARAM_SETS = ("upstream", "block:N", "blocks:A-B", "head", "router", "sit", "all")


class AlignmentProbe(nn.Module):
    """SiT + one alignment objective; ``forward(batch)`` -> per-sample ``lambda * L_align`` ``[b]``.

    Built from the public pieces the training loop uses (``Transport.training_losses``,
    ``AlignmentObjective.forward``), so it computes the training loss of each sample.
    ``batch``: x0, y, t, eps, drop ([b]), features ({key: [b, L, C, H, W]}).
    """

    def __init__(self, sit: nn.Module, objective: nn.Module, transport):
        super().__init__()
        self.sit, self.objective, self.transport = sit, objective, transport

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.transport.training_losses(
            self.sit, batch["x0"], batch["y"], hidden_depths=tuple(self.objective.depths), t=batch["t"],
            eps=batch["eps"], model_kwargs={"force_drop_ids": batch["drop"]},
        )
        align, _ = self.objective(out["hidden"], batch["features"], batch["t"])
        return align, out["loss"]

    def forward(self, batch: dict) -> torch.Tensor:
        return self.losses(batch)[0]


def select_parameters(probe: AlignmentProbe, spec: str) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``probe`` named by ``spec`` (terms joined by ``+``):
    ``upstream`` (embedders and blocks 1..d, d = deepest aligned block; docs/design.md section 6),
    ``block:N``, ``blocks:A-B``, ``head`` (projection heads), ``router``, ``sit`` (all of SiT),
    ``all`` (SiT + heads + router)."""
    sit, depth = probe.sit, max(probe.objective.depths)
    prefixes: list[str] = []
    for term in spec.split("+"):
        term = term.strip()
        if term == "upstream":
            prefixes += ["sit.x_embedder.", "sit.t_embedder.", "sit.y_embedder."] + [f"sit.blocks.{i}." for i in range(depth)]
        elif term.startswith("block:") or term.startswith("blocks:"):
            body = term.split(":", 1)[1]
            try:
                lo, hi = (int(v) for v in body.split("-")) if "-" in body else (int(body), int(body))
            except ValueError:
                raise AhpaError(f"--params term '{term}' must look like block:N or blocks:A-B (1-indexed)") from None
            if not 1 <= lo <= hi <= sit.depth:
                raise AhpaError(f"--params term '{term}' names blocks outside 1..{sit.depth} of {sit.name}")
            prefixes += [f"sit.blocks.{i - 1}." for i in range(lo, hi + 1)]
        elif term == "head":
            prefixes.append("objective.heads.")
        elif term == "router":
            prefixes.append("objective.router.")
        elif term == "sit":
            prefixes.append("sit.")
        elif term == "all":
            prefixes += ["sit.", "objective."]
        else:
            raise AhpaError(f"unknown --params term '{term}'; use terms of: {', '.join(PARAM_SETS)}, joined by '+'")
    chosen = {k: p for k, p in probe.named_parameters() if p.requires_grad and k.startswith(tuple(prefixes))}
    if not chosen:
        raise AhpaError(f"--params {spec} selects no trainable parameter of this target (a parameter-free router has none)")
    return chosen


def gsnr_record(stats: GradStats, diff_mean: dict[str, torch.Tensor] | None = None) -> dict:
    """Every number of one (target, t) point: the raw ingredients and both G-SNR forms."""
    trace = stats.trace_cov
    rec = {
        "n": stats.n,
        "mean_grad_sq": stats.mean_sq,  # ||g_bar||^2
        "sum_sample_grad_sq": stats.sum_sq,  # sum_i ||g_i||^2
        "trace_cov": trace,
        "gsnr": stats.gsnr,
        "gsnr_batch": stats.n * stats.gsnr,
    }
    if diff_mean is not None:
        dot = sum(float((diff_mean[k].double() * stats.mean[k].double()).sum()) for k in stats.mean)
        diff_sq = sum(float(v.double().pow(2).sum()) for v in diff_mean.values())
        rec["diff_grad_sq"] = diff_sq
        # undefined (NaN, null in the JSON) where a gradient is zero, e.g. at initialisation, where
        # the zero-initialised output layer and adaLN-Zero give the upstream blocks no diffusion gradient
        rec["cos_diff_align"] = dot / math.sqrt(diff_sq * stats.mean_sq) if diff_sq > 0 and stats.mean_sq > 0 else float("nan")
    return rec


def probe_point(probe: AlignmentProbe, batch: dict, params_spec: str = "upstream", method: str = "ghost",
                chunk_size: int = 8) -> dict:
    """G-SNR record (plus mean losses) of one batch; the batch's t is whatever it holds."""
    params = select_parameters(probe, params_spec)
    stats = grad_stats(probe, params, batch, method=method, chunk_size=chunk_size)
    with torch.enable_grad():
        align, diff = probe.losses(batch)
        got = torch.autograd.grad(diff.mean(), list(params.values()), allow_unused=True)
    diff_mean = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), got)}
    rec = gsnr_record(stats, diff_mean)
    rec["loss_align"] = float(align.detach().mean())
    rec["loss_diffusion"] = float(diff.detach().mean())
    return rec


def summarize(records: list[dict], key: str) -> dict:
    """Table 7 columns: mean of ``key`` over t > 0.5, t < 0.5 and all t."""
    def mean(rs):
        vals = [r[key] for r in rs if math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else float("nan")
    return {"t>0.5": mean([r for r in records if r["t"] > 0.5]), "t<0.5": mean([r for r in records if r["t"] < 0.5]),
            "all": mean(records)}


# ---------------------------------------------------------------------- during training (train.gsnr_every)

TRAIN_T = (0.1, 0.5, 0.9)  # a few points of the trajectory: near data, middle, near noise
TRAIN_SAMPLES = 64


def training_gsnr(module: nn.Module, x0: torch.Tensor, batch: dict, step: int, seed: int,
                  t_values=TRAIN_T, n: int = TRAIN_SAMPLES) -> dict[str, float]:
    """A cheap G-SNR estimate for TensorBoard (``train.gsnr_every``): the first ``n`` samples of the
    current batch at each of ``t_values``, ghost norms over the upstream parameters (one forward and
    one backward of the batch per t, plus one for the diffusion gradient).  ``module`` is the
    training module (``sit``, ``objective``, ``transport``); noise comes from its own generator,
    so the training run's random stream is untouched.  Returns ``{"gsnr/batch/t=0.1": ..., ...}``."""
    probe = AlignmentProbe(module.sit, module.objective, module.transport)
    n = min(n, x0.shape[0])
    dev = x0.device
    g = step_generator(seed, step, dev, stream=4)
    p_drop = float(getattr(module.sit.y_embedder, "dropout_prob", 0.0))
    features = {k: v[:n] for k, v in (batch.get("features") or {}).items()}
    out = {}
    for t in t_values:
        b = {"x0": x0[:n].detach(), "y": batch["y"][:n], "t": torch.full((n,), float(t), device=dev),
             "eps": torch.randn(x0[:n].shape, generator=g, device=dev), "features": features,
             "drop": torch.rand(n, generator=g, device=dev) < p_drop}
        rec = probe_point(probe, b, "upstream", "ghost")
        out[f"gsnr/batch/t={t:g}"] = rec["gsnr_batch"]
        out[f"gsnr/per_sample/t={t:g}"] = rec["gsnr"]
        if math.isfinite(rec["cos_diff_align"]):
            out[f"gsnr/cos_diff_align/t={t:g}"] = rec["cos_diff_align"]
    return out
