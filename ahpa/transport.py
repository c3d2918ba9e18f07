"""Interpolants, time sampling and the diffusion loss (docs/design.md section 1).

REPA's convention throughout: ``x_t = alpha_t x_0 + sigma_t eps`` with t=0 the
data and t=1 the noise; the network predicts the velocity
``v = d x_t / dt = alpha'_t x_0 + sigma'_t eps`` and is trained by mean squared
error on it (SiT's flow-matching objective, REPA's ``loss.py``).

Paths:
- ``linear``: alpha_t = 1 - t, sigma_t = t, so v = eps - x_0 (the default).
- ``cosine`` (SiT's GVP): alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2).

Time sampling:
- ``uniform``: t ~ U(0, 1) (the default).
- ``lognormal``: the noise-to-signal ratio sigma_t / alpha_t is log-normal,
  ``sigma_t / alpha_t = exp(n)`` with ``n ~ N(time_mean, time_std)`` (EDM's
  sigma distribution, as in REPA's ``weighting="lognormal"``).  On the linear
  path this is t = sigmoid(n), i.e. t is logit-normal; on the cosine path
  t = (2 / pi) * atan(exp(n)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ahpa.errors import AhpaError

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "lognormal")


def check_path(path: str) -> None:
    if path not in PATHS:
        raise AhpaError(f"unknown transport path {path!r}; choose one of: {', '.join(PATHS)}")


def path_coefficients(path: str, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), each shaped like ``t``."""
    check_path(path)
    if path == "linear":
        one = torch.ones_like(t)
        return 1 - t, t, -one, one
    half_pi = math.pi / 2
    cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
    return cos, sin, -half_pi * sin, half_pi * cos


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``x``."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class Transport:
    """The interpolant between data (t=0) and Gaussian noise (t=1) and its training loss."""

    def __init__(self, path: str = "linear", time_sampling: str = "uniform",
                 time_mean: float = 0.0, time_std: float = 1.0):
        check_path(path)
        if time_sampling not in TIME_SAMPLINGS:
            raise AhpaError(f"unknown time sampling {time_sampling!r}; choose one of: {', '.join(TIME_SAMPLINGS)}")
        if time_std <= 0:
            raise AhpaError(f"transport.time_std must be positive, got {time_std}")
        self.path = path
        self.time_sampling = time_sampling
        self.time_mean = float(time_mean)
        self.time_std = float(time_std)

    def sample_t(self, n: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``n`` training times in [0, 1] (float32), drawn with ``generator`` when given."""
        draw_device = generator.device if generator is not None else device
        if self.time_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=draw_device)
        else:
            n_ = torch.randn(n, generator=generator, device=draw_device) * self.time_std + self.time_mean
            # sigma_t / alpha_t = exp(n_); inverted per path (module docstring).
            t = torch.sigmoid(n_) if self.path == "linear" else torch.atan(torch.exp(n_)) * (2 / math.pi)
        return t.to(device) if device is not None else t

    def interpolate(self, x0: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, v_target) for data ``x0``, noise ``eps`` and times ``t`` ``[B]``."""
        alpha, sigma, d_alpha, d_sigma = (expand_like(c, x0) for c in path_coefficients(self.path, t))
        return alpha * x0 + sigma * eps, d_alpha * x0 + d_sigma * eps

    def training_losses(self, model: nn.Module, x0: Tensor, y: Tensor, hidden_depths: Sequence[int] = (),
                        generator: torch.Generator | None = None, t: Tensor | None = None,
                        eps: Tensor | None = None, model_kwargs: dict | None = None) -> dict:
        """Flow-matching loss of ``model`` on clean latents ``x0`` with labels ``y``.

        ``t`` and ``eps`` are drawn (t first, then eps, from ``generator`` when given)
        unless passed in; ``model_kwargs`` go to the model call.  Returns ``loss``
        ``[B]`` (per-sample MSE on the velocity, mean over C, H, W, computed in
        float32), the times ``t`` ``[B]`` and ``hidden`` (block index -> ``[B, N, D]``
        tokens) from the same forward pass, empty if no depths asked.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        t = t.to(device=x0.device, dtype=x0.dtype)
        if eps is None and generator is None:
            eps = torch.randn_like(x0)
        elif eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x_t, target = self.interpolate(x0, eps, t)
        hidden: dict = {}
        kwargs = dict(model_kwargs or {})
        if hidden_depths:
            velocity, hidden = model(x_t, t, y, hidden_depths=tuple(hidden_depths), **kwargs)
        else:
            velocity = model(x_t, t, y, **kwargs)
        loss = mean_flat((velocity.float() - target.float()) ** 2)
        return {"loss": loss, "t": t, "hidden": hidden}
