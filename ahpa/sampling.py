"""ODE and SDE samplers with classifier-free guidance (docs/design.md section 1).

Time runs from t=1 (noise) to t=0 (data), REPA's convention; time grids are
float64 and the state is integrated in float64, the model runs in the dtype of
the initial noise.  Number of model evaluations (NFE, counting a guided
evaluation as one batched forward):

- ``ode`` + ``euler``: ``steps`` Euler steps on the uniform grid, NFE = steps.
- ``ode`` + ``heun``: Heun's second-order method on the same grid, with the
  last step left first order (as REPA's sampler): NFE = 2 * steps - 1.
- ``sde``: Euler-Maruyama (REPA's ``euler_maruyama_sampler``, SiT's SDE with
  ``last_step="Mean"``): ``steps - 1`` stochastic steps on a uniform grid from
  t=1 to t=``last_step_size`` (0.04), then one mean-only (noise-free) step to
  t=0: NFE = steps.

The reverse-time SDE is ``dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW`` with
``w(t) = 2t`` (REPA's ``compute_diffusion``; on the linear path this is SiT's
``diffusion_form="sigma"``) and the score derived from the velocity.  Every
step of it leaves the marginals p_t unchanged in the continuous limit, so it
samples the same distribution as the probability-flow ODE.

Guidance: ``v = v_null + s (v_cond - v_null)`` where s = ``cfg_scale`` for
samples whose t lies in ``guidance_interval`` = [t_low, t_high] and s = 1
(the conditional velocity alone) elsewhere.  The conditional and null-class
inputs go through the model in one batch; with ``cfg_scale == 1`` (or no
sample in the interval) the batch is not doubled.  All latent channels are
guided, as in REPA (DiT/SiT's ``forward_with_cfg`` guided only the first three).

Seeding: :func:`noise_for_indices` (the initial noise, one CPU generator per
sample, drawn once per batch) and the SDE step noise make sample i a function
of (seed, i) alone, independent of batch size, batch position and the number of
processes.  The step noise is counter-based (:mod:`ahpa.counter_rng`): Philox of
(the sample's SDE seed from :func:`sde_seeds`, the step, the element), one
batched call for a block of steps (:class:`ahpa.counter_rng.StepNoise`).  It replaced one ``torch.Generator`` call per sample per
step (v0.1): SDE samples of v0.1 are not reproduced; ODE samples are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ahpa.counter_rng import StepNoise, seed_keys
from ahpa.errors import AhpaError
from ahpa.transport import check_path, expand_like, path_coefficients

MODES = ("ode", "sde")
METHODS = ("euler", "heun")
TIME_CONVENTIONS = ("repa", "sit")
NOISE_STREAM, SDE_STREAM = 0, 1  # independent random streams per sample


def derive_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``seed`` (numpy SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def noise_for_indices(indices: Sequence[int], seed: int, shape: Sequence[int],
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial noise ``[len(indices), *shape]``: row k depends only on (seed, indices[k]).

    Drawn on the CPU so the same seed gives the same noise on any device.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(derive_seed(seed, i)))
            for i in indices]
    return torch.stack(rows).to(device=device, dtype=dtype)


def sde_seeds(indices: Sequence[int], seed: int) -> list[int]:
    """Per-sample 63-bit seeds of the SDE step noise (pass as ``sample(..., seeds=...)``): the
    Philox keys of :func:`ahpa.counter_rng.counter_normal`."""
    return [derive_seed(seed, i, SDE_STREAM) for i in indices]


class SiTTimeConvention(nn.Module):
    """Presents a model trained in SiT's convention (t=0 noise, velocity data - noise)
    to the REPA-convention samplers: ``v_repa(x, t) = -v_sit(x, 1 - t)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return -self.model(x, 1 - t, y)


def guided_velocity(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float = 1.0,
                    guidance_interval: tuple[float, float] = (0.0, 1.0), dtype: torch.dtype = torch.float32,
                    guide_t: Tensor | None = None) -> Tensor:
    """The (guided) velocity at state ``x`` and per-sample times ``t`` ``[B]``, in float64.

    Samples whose ``guide_t`` (default ``t``) lies in [t_low, t_high] get
    ``u + cfg_scale (c - u)``, the others ``c``.  Heun passes the step's start time
    for both of its evaluations, as REPA's sampler decides guidance once per step.
    """
    low, high = guidance_interval
    guide_t = t if guide_t is None else guide_t
    inside = (guide_t >= low) & (guide_t <= high)
    if cfg_scale == 1.0 or not bool(inside.any()):
        return model(x.to(dtype), t.to(dtype), y).to(torch.float64)
    # Text models (MMDiT) hold their null condition (the empty prompt's embedding); class models a null class.
    null = model.null_condition(y) if hasattr(model, "null_condition") else torch.full_like(y, model.num_classes)
    both = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]).to(dtype), torch.cat([y, null]))
    cond, uncond = both.to(torch.float64).chunk(2)
    scale = torch.where(inside, torch.as_tensor(float(cfg_scale), dtype=torch.float64, device=t.device), 1.0)
    return uncond + expand_like(scale, x) * (cond - uncond)


def score_from_velocity(v: Tensor, x: Tensor, t: Tensor, path: str = "linear") -> Tensor:
    """grad log p_t(x) from the velocity (REPA's ``get_score_from_velocity``).

    With x_t = a x0 + s eps and v = a' x0 + s' eps, Tweedie's formula gives
    score = (a/a' v - x) / (s^2 - a/a' s s').  Undefined at t=0 (the SDE grid stops before it).
    """
    alpha, sigma, d_alpha, d_sigma = (expand_like(c, x) for c in path_coefficients(path, t))
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)


def diffusion_coefficient(t: Tensor) -> Tensor:
    """w(t) = g(t)^2 of the reverse SDE: 2t (REPA's ``compute_diffusion``)."""
    return 2 * t


def ode_time_grid(steps: int) -> Tensor:
    """``steps + 1`` uniform times from 1 to 0 (float64)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def sde_time_grid(steps: int, last_step_size: float = 0.04) -> Tensor:
    """``steps`` uniform times from 1 to ``last_step_size``, then 0 (float64)."""
    head = torch.linspace(1.0, last_step_size, steps, dtype=torch.float64)
    return torch.cat([head, torch.zeros(1, dtype=torch.float64)])


def _check(mode: str, method: str, steps: int, path: str, time_convention: str, last_step_size: float) -> None:
    if mode not in MODES:
        raise AhpaError(f"unknown sampling mode {mode!r}; choose one of: {', '.join(MODES)}")
    if method not in METHODS:
        raise AhpaError(f"unknown ODE method {method!r}; choose one of: {', '.join(METHODS)}")
    if mode == "sde" and method != "euler":
        raise AhpaError("the SDE sampler is Euler-Maruyama only; use --method euler with --mode sde")
    if steps < 1:
        raise AhpaError(f"sampling needs at least 1 step, got {steps}")
    if time_convention not in TIME_CONVENTIONS:
        raise AhpaError(f"unknown time convention {time_convention!r}; choose one of: {', '.join(TIME_CONVENTIONS)}")
    if not 0.0 < last_step_size < 1.0:
        raise AhpaError(f"last_step_size must lie in (0, 1), got {last_step_size}")
    check_path(path)


@torch.no_grad()
def sample(model: nn.Module, y: Tensor, noise: Tensor, *, mode: str = "ode", method: str = "euler",
           steps: int = 250, cfg_scale: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0),
           path: str = "linear", time_convention: str = "repa", seeds: Sequence[int] | None = None,
           last_step_size: float = 0.04) -> Tensor:
    """Integrate from ``noise`` (t=1) to data (t=0) for class labels ``y``.

    ``seeds``: one integer per sample for its SDE noise (see :func:`sde_seeds`);
    None draws it from the global torch generator.  Returns latents in ``noise.dtype``.
    """
    _check(mode, method, steps, path, time_convention, last_step_size)
    if time_convention == "sit":
        model = SiTTimeConvention(model)
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise AhpaError(f"got {len(seeds)} SDE seeds for {noise.shape[0]} samples; pass one seed per sample")
    dtype, device, batch = noise.dtype, noise.device, noise.shape[0]

    def velocity(x: Tensor, t: Tensor, guide_t: Tensor | None = None) -> Tensor:
        return guided_velocity(model, x, t, y, cfg_scale, guidance_interval, dtype, guide_t)

    def times(t: Tensor) -> Tensor:  # a grid point for every sample
        return t.expand(batch).to(device)

    x = noise.to(torch.float64)
    if mode == "ode":
        grid = ode_time_grid(steps)
        for i in range(steps):
            t_cur, t_next = grid[i], grid[i + 1]
            d_cur = velocity(x, times(t_cur))
            x_next = x + (t_next - t_cur).item() * d_cur
            if method == "heun" and i < steps - 1:
                d_next = velocity(x_next, times(t_next), guide_t=times(t_cur))
                x_next = x + (t_next - t_cur).item() * 0.5 * (d_cur + d_next)
            x = x_next
        return x.to(dtype)

    grid = sde_time_grid(steps, last_step_size)
    intervals = len(grid) - 1
    step_noise = StepNoise(seed_keys(seeds, device), x.shape[1:], intervals - 1) if seeds is not None else None
    for i in range(intervals):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = (t_next - t_cur).item()
        v = velocity(x, times(t_cur))
        w = diffusion_coefficient(t_cur).item()
        drift = v - 0.5 * w * score_from_velocity(v, x, times(t_cur), path)
        x = x + drift * dt
        if i < intervals - 1:  # the last step is the mean (noise-free) step to t=0
            x = x + (w * -dt) ** 0.5 * _standard_normal(x, step_noise, i)
    return x.to(dtype)


def _standard_normal(x: Tensor, step_noise: StepNoise | None, step: int) -> Tensor:
    """Step noise like ``x``: counter-based per sample, else the global generator."""
    if step_noise is None:
        return torch.randn(x.shape, device=x.device, dtype=torch.float32).to(x.dtype)
    return step_noise(step).to(x.dtype)
