"""Samplers against closed forms: Gaussian data has an exact velocity field.

For x0 ~ N(mu, Sigma) and eps ~ N(0, I), x_t = a x0 + s eps is Gaussian and
E[v | x_t] = a' mu + (a a' Sigma + s s' I)(a^2 Sigma + s^2 I)^-1 (x_t - a mu).
Every sampler here is affine in its inputs for this field, so the exact mean and
covariance of its output are read off by pushing basis vectors through it
(for the SDE also through each step's noise); no Monte Carlo error hides a bug.
Deliberately broken samplers are run through the same checks and must fail them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ahpa.sampling as sampling
from ahpa.errors import AhpaError
from ahpa.sampling import (
    SiTTimeConvention,
    guided_velocity,
    noise_for_indices,
    sample,
    score_from_velocity,
    sde_seeds,
    sde_time_grid,
)
from ahpa.transport import Transport, expand_like, path_coefficients

D = 4
MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
SIGMA = torch.tensor([[2.00, 0.58, 1.02, -0.48],
                      [0.58, 0.99, -0.69, 0.06],
                      [1.02, -0.69, 2.14, -0.66],
                      [-0.48, 0.06, -0.66, 0.83]], dtype=torch.float64)  # non-diagonal, eigenvalues 0.1 .. 3.3


def rowwise_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ m computed so that each row's result is bitwise independent of the batch size."""
    return (x[:, :, None] * m[None]).sum(1)


class GaussianVelocity(nn.Module):
    """The exact velocity E[v | x_t] for x0 ~ N(mu, Sigma) on ``path``; ``[B, D, 1, 1]`` latents."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, path: str = "linear", num_classes: int = 1):
        super().__init__()
        self.path, self.num_classes, self.mu = path, num_classes, mu
        self.lam, self.q = torch.linalg.eigh(sigma)
        self.calls: list[int] = []  # batch size of every forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        a, s, da, ds = (c.double()[:, None] for c in path_coefficients(self.path, t.double()))
        z = rowwise_matmul(x.double().flatten(1) - a * self.mu, self.q)  # eigenbasis of Sigma
        gain = (a * da * self.lam + s * ds) / (a * a * self.lam + s * s)
        return (da * self.mu + rowwise_matmul(gain * z, self.q.T)).reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) = -(a^2 Sigma + s^2 I)^-1 (x - a mu)."""
        a, s, _, _ = (c.double()[:, None] for c in path_coefficients(self.path, t.double()))
        z = rowwise_matmul(x.double().flatten(1) - a * self.mu, self.q)
        return rowwise_matmul(-z / (a * a * self.lam + s * s), self.q.T).reshape(x.shape)


def ode_moments(model: nn.Module, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (mean, covariance) of the ODE sampler's output for N(0, I) input."""
    basis = torch.cat([torch.zeros(1, D), torch.eye(D)]).double().view(D + 1, D, 1, 1)
    out = sample(model, torch.zeros(D + 1, dtype=torch.long), basis, **kwargs).flatten(1)
    m = (out[1:] - out[0]).T
    return out[0], m @ m.T


def sde_moments(model: nn.Module, monkeypatch, noise_scale: float = 1.0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (mean, covariance) of the SDE sampler's output: the sampler is affine in the
    initial noise and in each step's noise, so feed unit vectors through both
    (``noise_scale`` != 1 simulates a sampler whose step noise is too large)."""
    steps = kwargs["steps"]
    batch = 1 + D + (steps - 1) * D
    noise = torch.zeros(batch, D, dtype=torch.float64)
    noise[1 : 1 + D] = torch.eye(D)
    calls = []

    def unit_step_noise(x, keys, step):
        k = len(calls)
        calls.append(k)
        xi = torch.zeros(batch, D, dtype=torch.float64)
        xi[1 + D + k * D : 1 + D + (k + 1) * D] = noise_scale * torch.eye(D)
        return xi.view_as(x)

    monkeypatch.setattr(sampling, "_standard_normal", unit_step_noise)
    out = sample(model, torch.zeros(batch, dtype=torch.long), noise.view(batch, D, 1, 1), mode="sde", **kwargs)
    out = out.flatten(1)
    m = (out[1:] - out[0]).T
    return out[0], m @ m.T


def errors(mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    return (mean - MU).abs().max().item(), (cov - SIGMA).abs().max().item()


# (mode, method, steps, path) -> tolerance on max |mean error| and max |covariance error|.
# Measured errors (exact, no sampling noise) are printed with -s; they are well inside.
CASES = {
    ("ode", "euler", 250, "linear"): (1e-9, 0.03),  # Euler is exact for the mean on the linear path
    ("ode", "euler", 250, "cosine"): (0.012, 0.006),
    ("ode", "heun", 50, "linear"): (1e-9, 0.0015),
    ("ode", "heun", 50, "cosine"): (0.0015, 0.0006),
    ("sde", "euler", 250, "linear"): (1e-9, 0.025),
    ("sde", "euler", 250, "cosine"): (0.016, 0.006),
}


def moments(model, monkeypatch, mode, method, steps, path, noise_scale=1.0):
    if mode == "ode":
        return ode_moments(model, method=method, steps=steps, path=path)
    return sde_moments(model, monkeypatch, noise_scale, steps=steps, path=path)


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c)))
def test_sampler_recovers_gaussian(case, monkeypatch):
    mode, method, steps, path = case
    tol_mean, tol_cov = CASES[case]
    err_mean, err_cov = errors(*moments(GaussianVelocity(MU, SIGMA, path), monkeypatch, *case))
    print(f"{case}: mean error {err_mean:.2e}, covariance error {err_cov:.2e}")
    assert err_mean <= tol_mean and err_cov <= tol_cov


def test_convergence_order():
    """Euler's error halves when the steps double (first order); Heun's quarters."""
    model = GaussianVelocity(MU, SIGMA, "linear")
    for method, steps, expected in (("euler", 100, 2.0), ("heun", 25, 4.0)):
        coarse = errors(*ode_moments(model, method=method, steps=steps))[1]
        fine = errors(*ode_moments(model, method=method, steps=2 * steps))[1]
        assert coarse / fine == pytest.approx(expected, rel=0.1), (method, coarse, fine)


class Negated(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x, t, y):
        return -self.model(x, t, y)


class SiTConvention(nn.Module):
    """The Gaussian field as a SiT-trained model sees it: t=0 noise, v = data - noise."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x, t, y):
        return -self.model(x, 1 - t, y)


def _no_final_step_grid(steps, last_step_size=0.04):
    return torch.linspace(1.0, last_step_size, steps, dtype=torch.float64)  # stops at t = 0.04


def _score_twice(v, x, t, path):
    return 2 * score_from_velocity(v, x, t, path)  # drift v - w s: the factor 1/2 missing


# name -> (model wrapper, attributes of ahpa.sampling to patch, SDE step-noise scale)
MUTANTS = {
    "flipped-sign": (Negated, {}, 1.0),
    "reversed-time": (SiTConvention, {}, 1.0),  # a SiT-trained model sampled as if REPA-trained
    "score-twice": (None, {"score_from_velocity": _score_twice}, 1.0),
    "noise-sqrt2": (None, {}, 2**0.5),  # noise sqrt(2 w dt), SiT's sqrt(2 * diffusion) mixed with REPA's w
    "no-final-mean-step": (None, {"sde_time_grid": _no_final_step_grid}, 1.0),
}


MUTANT_CASES = [(case, name) for case in CASES if case[3] == "linear" for name, (wrap, _, _) in MUTANTS.items()
                if case[0] == "sde" or wrap is not None]  # the others are SDE-only mistakes


@pytest.mark.parametrize("case,mutant", MUTANT_CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
def test_broken_samplers_fail_the_same_check(case, mutant, monkeypatch):
    wrap, patches, noise_scale = MUTANTS[mutant]
    model = GaussianVelocity(MU, SIGMA, case[3])
    model = wrap(model) if wrap else model
    for name, value in patches.items():
        monkeypatch.setattr(sampling, name, value)
    err_mean, err_cov = errors(*moments(model, monkeypatch, *case, noise_scale=noise_scale))
    print(f"{mutant} {case}: mean error {err_mean:.2e}, covariance error {err_cov:.2e}")
    tol_mean, tol_cov = CASES[case]
    assert err_mean > 3 * tol_mean + 0.05 or err_cov > 3 * tol_cov  # fails the check three times over


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_oracle_is_the_regression_of_the_training_target(path):
    """The closed-form field minimises Transport's loss: its residual is orthogonal to (1, x_t)."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = (MU + torch.randn(n, D, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T).view(n, D, 1, 1)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    x_t, target = Transport(path).interpolate(x0, eps, t)
    residual = (target - GaussianVelocity(MU, SIGMA, path)(x_t, t, None)).flatten(1)
    features = torch.cat([torch.ones(n, 1, dtype=torch.float64), x_t.flatten(1)], 1)
    correlation = features.T @ residual / n  # would be O(1) for a wrong field
    assert correlation.abs().max().item() < 0.02


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_velocity_matches_closed_form(path):
    model = GaussianVelocity(MU, SIGMA, path)
    x = torch.randn(6, D, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    t = torch.tensor([0.04, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(model(x, t, None), x, t, path), model.score(x, t))


def test_sit_time_convention_wrapper():
    """A SiT-convention model wrapped for the sampler equals the REPA-convention field."""
    model = GaussianVelocity(MU, SIGMA)
    sit_model = SiTConvention(model)
    x = torch.randn(5, D, 1, 1, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(SiTTimeConvention(sit_model)(x, t, None), model(x, t, None))
    noise = torch.randn(8, D, 1, 1, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    direct = sample(model, y, noise, steps=20)
    torch.testing.assert_close(sample(sit_model, y, noise, steps=20, time_convention="sit"), direct)


def test_sde_monte_carlo_with_real_noise(monkeypatch):
    """The real step noise has the law assumed above: 20K SDE samples match the exact scheme moments."""
    model = GaussianVelocity(MU, SIGMA)
    mean, cov = sde_moments(model, monkeypatch, steps=20)
    monkeypatch.undo()
    torch.manual_seed(0)
    n = 20_000
    out = sample(model, torch.zeros(n, dtype=torch.long), torch.randn(n, D, 1, 1, dtype=torch.float64),
                 mode="sde", steps=20).flatten(1)
    z = (out - mean) @ torch.linalg.inv(torch.linalg.cholesky(cov)).T  # N(0, I) if the noise is right
    # standard errors: mean 1/sqrt(n) = 0.007, covariance sqrt(2/n) = 0.01
    assert z.mean(0).abs().max().item() < 0.035
    assert (torch.cov(z.T) - torch.eye(D, dtype=torch.float64)).abs().max().item() < 0.05


class ConstantGuidanceProbe(nn.Module):
    """Velocity c[y] for a class, u for the null class; records batch sizes."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.cond = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
        self.uncond = 0.5
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        null = y == self.num_classes
        value = torch.where(null, self.uncond, self.cond[y.clamp(max=self.num_classes - 1)])
        return value.view(-1, 1, 1, 1).expand(x.shape).to(x.dtype)


def test_guidance_per_sample_interval():
    probe = ConstantGuidanceProbe()
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    v = guided_velocity(probe, x, t, y, cfg_scale=4.0, guidance_interval=(0.0, 0.7), dtype=torch.float64).flatten()
    u, c = probe.uncond, probe.cond
    expected = torch.stack([u + 4 * (c[0] - u), u + 4 * (c[1] - u), c[2]])
    torch.testing.assert_close(v, expected)
    assert probe.calls == [6]  # conditional and null inputs in one forward


def test_guidance_in_the_sampler():
    """Euler with constant fields: x_0 = x_1 - sum of step * guided velocity, guided only inside the interval."""
    probe = ConstantGuidanceProbe()
    y = torch.tensor([0, 1])
    noise = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    out = sample(probe, y, noise, steps=10, cfg_scale=3.0, guidance_interval=(0.0, 0.55)).flatten()
    inside = 5  # t = 0.5, 0.4, 0.3, 0.2, 0.1 of the grid 1.0, 0.9, ..., 0.1
    c, u = probe.cond[:2], probe.uncond
    expected = -0.1 * (inside * (u + 3 * (c - u)) + (10 - inside) * c)
    torch.testing.assert_close(out, expected)
    assert probe.calls == [2] * 5 + [4] * 5  # doubled batch only inside the interval

    probe.calls.clear()
    torch.testing.assert_close(sample(probe, y, noise, steps=10, cfg_scale=1.0).flatten(), -c)
    assert probe.calls == [2] * 10  # no guidance: never doubled


@pytest.mark.parametrize("mode,method,nfe", [("ode", "euler", 7), ("ode", "heun", 13), ("sde", "euler", 7)])
def test_number_of_model_evaluations(mode, method, nfe):
    model = GaussianVelocity(MU, SIGMA)
    sample(model, torch.zeros(2, dtype=torch.long), torch.randn(2, D, 1, 1), mode=mode, method=method, steps=7)
    assert len(model.calls) == nfe


def test_time_grids():
    grid = sde_time_grid(250)
    assert grid.dtype == torch.float64 and len(grid) == 251
    assert grid[0] == 1.0 and grid[-2] == 0.04 and grid[-1] == 0.0
    torch.testing.assert_close(grid[:-1].diff(), torch.full((249,), -0.96 / 249, dtype=torch.float64))


def test_samples_depend_only_on_seed_and_index():
    """Sample 7 alone equals sample 7 at position 3 of a batch of 5 (initial and SDE noise)."""
    model = GaussianVelocity(MU, SIGMA)
    shape = (D, 1, 1)

    def run(indices):
        noise = noise_for_indices(indices, seed=11, shape=shape, dtype=torch.float64)
        y = torch.zeros(len(indices), dtype=torch.long)
        return noise, sample(model, y, noise, mode="sde", steps=20, seeds=sde_seeds(indices, 11))

    noise1, out1 = run([7])
    noise5, out5 = run([4, 5, 6, 7, 8])
    assert torch.equal(noise1[0], noise5[3]) and torch.equal(out1[0], out5[3])
    assert not torch.equal(out5[2], out5[3])
    assert not torch.equal(noise_for_indices([7], 12, shape), noise_for_indices([7], 11, shape))
    many = noise_for_indices(range(4000), seed=0, shape=(8,))
    assert abs(many.mean().item()) < 0.03 and abs(many.std().item() - 1) < 0.02  # 5 standard errors


@pytest.mark.parametrize("kwargs", [{"mode": "flow"}, {"method": "rk4"}, {"mode": "sde", "method": "heun"},
                                    {"steps": 0}, {"path": "vp"}, {"time_convention": "edm"}])
def test_bad_options_raise_ahpa_error(kwargs):
    with pytest.raises(AhpaError):
        sample(GaussianVelocity(MU, SIGMA), torch.zeros(1, dtype=torch.long), torch.randn(1, D, 1, 1), **kwargs)


def test_heun_decides_guidance_once_per_step_at_its_start():
    """REPA's Heun guides both evaluations of a step iff the step's start time is in the interval."""

    class Constant(nn.Module):  # velocity c for real labels, u for the null class
        num_classes = 3

        def forward(self, x, t, y):
            c = torch.where(y == self.num_classes, -1.0, 2.0)
            return expand_like(c.to(x.dtype), x).expand_as(x)

    noise = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([0, 1])
    out = sample(Constant(), y, noise, mode="ode", method="heun", steps=2, cfg_scale=3.0, guidance_interval=(0.0, 0.6))
    c, u, s = 2.0, -1.0, 3.0
    guided = u + s * (c - u)
    # step 1 -> 0.5 starts outside [0, 0.6]: both evaluations unguided; step 0.5 -> 0 (last, Euler) is guided
    expected = -0.5 * c - 0.5 * guided
    torch.testing.assert_close(out, torch.full_like(out, expected))
