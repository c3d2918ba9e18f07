"""The interpolant, its velocity target, time sampling and the training loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ahpa.errors import AhpaError
from ahpa.models.sit import build_sit
from ahpa.transport import Transport


def _pair(seed: int = 0, shape=(3, 4, 2, 2)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_endpoints_data_at_0_noise_at_1(path):
    x0, eps = _pair()
    transport = Transport(path)
    x_start, _ = transport.interpolate(x0, eps, torch.zeros(3, dtype=torch.float64))
    x_end, _ = transport.interpolate(x0, eps, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(x_start, x0)
    torch.testing.assert_close(x_end, eps)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_target_is_time_derivative_of_x_t(path):
    x0, eps = _pair(1)
    transport = Transport(path)
    t = torch.tensor([0.05, 0.5, 0.93], dtype=torch.float64)
    h = 1e-6
    _, v = transport.interpolate(x0, eps, t)
    forward, _ = transport.interpolate(x0, eps, t + h)
    backward, _ = transport.interpolate(x0, eps, t - h)
    torch.testing.assert_close(v, (forward - backward) / (2 * h), rtol=1e-7, atol=1e-7)


def test_linear_target_and_cosine_closed_forms():
    x0, eps = _pair(2)
    t = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
    x_t, v = Transport("linear").interpolate(x0, eps, t)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tb) * x0 + tb * eps)
    torch.testing.assert_close(v, eps - x0)
    x_t, v = Transport("cosine").interpolate(x0, eps, t)
    a, s = torch.cos(math.pi / 2 * tb), torch.sin(math.pi / 2 * tb)
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    torch.testing.assert_close(v, math.pi / 2 * (a * eps - s * x0))  # variance preserving: a^2 + s^2 = 1


def test_uniform_time_moments():
    t = Transport().sample_t(200_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.003)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.002)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_time_moments(path):
    """log(sigma_t / alpha_t) ~ N(mean, std): logit(t) on the linear path, log tan(pi t / 2) on the cosine one."""
    transport = Transport(path, "lognormal", time_mean=-0.4, time_std=1.2)
    t = transport.sample_t(200_000, generator=torch.Generator().manual_seed(1)).double()
    assert 0 < t.min() and t.max() < 1
    log_ratio = torch.logit(t) if path == "linear" else torch.log(torch.tan(math.pi / 2 * t))
    assert log_ratio.mean().item() == pytest.approx(-0.4, abs=0.015)  # standard error 0.003
    assert log_ratio.std().item() == pytest.approx(1.2, abs=0.015)
    if path == "linear":  # median of a logit-normal is sigmoid(mean)
        assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(-0.4)).item(), abs=0.005)


class Recorder(nn.Module):
    """Returns a fixed function of its inputs and remembers them."""

    def __init__(self):
        super().__init__()
        self.inputs: list[tuple] = []
        self.hidden = {2: torch.ones(1)}

    def forward(self, x, t, y, hidden_depths=()):
        self.inputs.append((x, t, y, tuple(hidden_depths)))
        v = 0.5 * x + t.view(-1, 1, 1, 1)
        return (v, self.hidden) if hidden_depths else v


@pytest.mark.parametrize("path,time_sampling", [("linear", "uniform"), ("cosine", "lognormal")])
def test_training_losses_matches_hand_computation(path, time_sampling):
    transport = Transport(path, time_sampling)
    x0 = torch.randn(4, 3, 2, 2)
    y = torch.arange(4)
    model = Recorder()
    out = transport.training_losses(model, x0, y, hidden_depths=(2,), generator=torch.Generator().manual_seed(5))
    assert len(model.inputs) == 1 and model.inputs[0][3] == (2,)  # one forward gives both outputs
    assert out["hidden"] is model.hidden
    # The generator draws t first, then eps.
    gen = torch.Generator().manual_seed(5)
    t = transport.sample_t(4, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(out["t"], t)
    x_t, target = transport.interpolate(x0, eps, t)
    torch.testing.assert_close(model.inputs[0][0], x_t)
    expected = ((0.5 * x_t + t.view(-1, 1, 1, 1) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["loss"], expected)
    plain = transport.training_losses(Recorder(), x0, y, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain["loss"], expected)
    assert plain["hidden"] == {}
    given = transport.training_losses(Recorder(), x0, y, t=t, eps=eps)  # draws made by the caller
    torch.testing.assert_close(given["loss"], expected)


def test_training_losses_with_sit_hidden_states():
    model = build_sit("SiT-T/4", input_size=8, num_classes=10)
    x0 = torch.randn(2, 4, 8, 8)
    out = Transport().training_losses(model, x0, torch.tensor([1, 3]), hidden_depths=(2,),
                                      generator=torch.Generator().manual_seed(0),
                                      model_kwargs={"force_drop_ids": torch.tensor([True, False])})
    assert out["loss"].shape == (2,) and out["t"].shape == (2,)
    assert out["hidden"][2].shape == (2, model.grid**2, model.hidden_size)
    out["loss"].mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # zero-initialised output layer learns first


@pytest.mark.parametrize("kwargs", [{"path": "vp"}, {"time_sampling": "beta"}, {"time_std": 0.0}])
def test_bad_options_raise_ahpa_error(kwargs):
    with pytest.raises(AhpaError):
        Transport(**kwargs)
