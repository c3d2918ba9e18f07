"""bf16 and compiled sampling (ahpa.sampling_speed): off by default, recorded, equal to eager."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ahpa.errors import AhpaError
from ahpa.generate.engine import MANIFEST, generate_samples
from ahpa.models.sit import build_sit
from ahpa.sampling import noise_for_indices, sample, sde_seeds
from ahpa.sampling_speed import AutocastForward, speed_wrapped
from helpers import randomised

pytestmark = pytest.mark.usefixtures("one_thread")
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"  # inductor's C++ build: minutes here
COMPILE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_sit(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    sit = build_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=10)
    sit.blocks, sit.depth = sit.blocks[:depth], depth
    randomised(sit, std=0.05)  # adaLN-Zero would make the blocks the identity
    return sit.eval()


def draw(model, n: int = 6, steps: int = 4, cfg: float = 1.5, device: str = "cpu"):
    idx = list(range(n))
    noise = noise_for_indices(idx, 3, (4, 8, 8), device)
    return sample(model, torch.tensor(idx, device=device) % 10, noise, mode="sde", steps=steps, cfg_scale=cfg,
                  guidance_interval=(0.0, 0.7), seeds=sde_seeds(idx, 3))


def test_compiled_sampling_equals_eager():
    """Guided SDE sampling (batches of 6 and, inside the guidance interval, 12) through the compiled model."""
    model = tiny_sit(depth=1).to(COMPILE_DEVICE)  # one block: the compile cost grows with depth, the check does not
    eager = draw(model, device=COMPILE_DEVICE)
    compiled = speed_wrapped(model, compile=True, backend=COMPILE_BACKEND)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(draw(compiled, device=COMPILE_DEVICE), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (benchmarks/gpu_suite.sh runs it)")
def test_bf16_sampling_on_cuda_is_close_to_float32():
    model = tiny_sit().cuda()
    full, half = draw(model, device="cuda"), draw(speed_wrapped(model, precision="bf16"), device="cuda")
    assert half.dtype == torch.float32 and 0 < (half - full).abs().max() < 0.2


def test_bf16_runs_the_network_in_bf16_and_keeps_the_state_float():
    model = tiny_sit()
    seen = {}
    model.x_embedder.register_forward_hook(lambda m, i, o: seen.update(x=i[0].dtype, embed=o.dtype))
    wrapped = speed_wrapped(model, precision="bf16")
    assert isinstance(wrapped, AutocastForward) and wrapped.num_classes == 10
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.arange(3)
    out = wrapped(x, t, y)
    assert seen == {"x": torch.float32, "embed": torch.bfloat16}  # the input stays float32, the convs run bf16
    assert out.dtype == torch.float32
    reference = model(x, t, y)
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.05  # bf16 rounding (8 mantissa bits): nonzero, small
    samples = draw(wrapped)
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert 0 < (samples - draw(model)).abs().max() < 0.2


def test_options_are_recorded_and_refused_when_mixed(tmp_path):
    model = tiny_sit(depth=1)
    meta = dict(model="probe", input_size=8, in_channels=4, num_classes=10, learn_sigma=False, vae="tiny",
                scaling_factor=0.5, latent_shift=None, latent_scale=None, time_convention="repa")
    decode = lambda x: torch.tanh(x[:, :3])  # noqa: E731
    kwargs = dict(mode="ode", steps=2)
    generate_samples(model, meta, decode, tmp_path / "plain", 2, 2, kwargs)
    assert not {"precision", "compile"} & json.loads((tmp_path / "plain" / MANIFEST).read_text()).keys()
    out = generate_samples(model, meta, decode, tmp_path / "bf16", 2, 2, kwargs, precision="bf16")
    assert json.loads((tmp_path / "bf16" / MANIFEST).read_text())["precision"] == "bf16"
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, 8, 8, 3)
    with pytest.raises(AhpaError, match="precision differ"):
        generate_samples(model, meta, decode, tmp_path / "bf16", 4, 2, kwargs)
    with pytest.raises(AhpaError, match="unknown sampling precision"):
        generate_samples(model, meta, decode, tmp_path / "x", 2, 2, kwargs, precision="fp8")
    assert not (tmp_path / "x").exists()
