"""Counter-based SDE noise (ahpa.counter_rng): known answers, law, and per-index determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import ahpa.counter_rng as counter_rng
from ahpa.counter_rng import counter_normal, philox4x32, seed_keys
from ahpa.generate import assemble_samples, generate_samples
from ahpa.sampling import noise_for_indices, sample, sde_seeds

pytestmark = pytest.mark.usefixtures("one_thread")

# Random123's kat_vectors for philox4x32_10: (counter, key) -> output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers():
    counters = torch.tensor([c for c, _, _ in PHILOX_KAT]).T  # [4, 3]
    keys = torch.tensor([k for _, k, _ in PHILOX_KAT]).T  # [2, 3]
    out = philox4x32(counters, keys)
    assert out.T.tolist() == [list(o) for _, _, o in PHILOX_KAT]


def test_counter_normal_is_standard_normal_and_independent():
    keys = seed_keys(sde_seeds(range(200), 0))
    a = counter_normal(keys, 0, (4, 8, 8))  # 51200 values
    b = counter_normal(keys, 1, (4, 8, 8))
    flat = a.flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.015  # ~4.5 standard errors
    # no correlation between steps, samples, or neighbouring elements (pairs of one Box-Muller draw)
    for x, y in [(a, b), (a[:-1], a[1:]), (a.flatten()[0::2], a.flatten()[1::2])]:
        assert abs(np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1]) < 0.02
    # even and odd words of a block both reach the tails
    assert (a.abs() > 3.5).sum() > 0


def test_counter_normal_byte_identical_for_batch_sizes_1_7_64():
    """64 x 4x32x32 noise is 262144 values: above torch's parallel grain, so the chunking matters."""
    shape = (4, 32, 32)
    full = counter_normal(seed_keys(sde_seeds(range(64), 5)), 17, shape)
    seven = counter_normal(seed_keys(sde_seeds(range(20, 27), 5)), 17, shape)
    assert seven.numpy().tobytes() == full[20:27].numpy().tobytes()
    for i in (0, 33, 63):
        one = counter_normal(seed_keys(sde_seeds([i], 5)), 17, shape)
        assert one.numpy().tobytes() == full[i : i + 1].numpy().tobytes()
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(full, counter_normal(seed_keys(sde_seeds(range(64), 6)), 17, shape))


def test_chunking_keeps_identity_with_two_threads(monkeypatch):
    """The CPU path must not depend on how torch splits a large tensor over threads."""
    torch.set_num_threads(2)
    try:
        shape = (4, 32, 32)
        full = counter_normal(seed_keys(sde_seeds(range(16), 1)), 3, shape)
        one = counter_normal(seed_keys(sde_seeds([9], 1)), 3, shape)
        assert one.numpy().tobytes() == full[9:10].numpy().tobytes()
    finally:
        torch.set_num_threads(1)


class Elementwise(nn.Module):
    """v = a x + b t, elementwise: its output rows never depend on the batch."""

    num_classes = 10

    def forward(self, x, t, y):
        return -0.7 * x + 0.3 * t.view(-1, 1, 1, 1).to(x.dtype) + 0.01 * y.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("batches", [(1, 7, 64)])
def test_sde_samples_byte_identical_for_batch_sizes(batches):
    model, shape, n = Elementwise(), (4, 8, 8), 64

    def draw(indices):
        noise = noise_for_indices(indices, seed=2, shape=shape)
        y = torch.tensor(indices) % 10
        return sample(model, y, noise, mode="sde", steps=6, seeds=sde_seeds(indices, 2))

    results = []
    for b in batches:
        parts = [draw(list(range(s, min(s + b, n)))) for s in range(0, n, b)]
        results.append(torch.cat(parts).numpy().tobytes())
    assert all(r == results[0] for r in results)


def test_generate_one_and_two_processes_byte_identical(tmp_path):
    model = Elementwise()
    meta = dict(model="probe", input_size=8, in_channels=4, num_classes=10, learn_sigma=False, vae="tiny",
                scaling_factor=0.5, latent_shift=None, latent_scale=None, time_convention="repa")
    model.register_parameter("w", nn.Parameter(torch.zeros(1)))  # generate_samples reads the device from it
    kwargs = dict(mode="sde", steps=5, cfg_scale=1.0)
    decode = lambda x: torch.tanh(x[:, :3])  # noqa: E731

    one = generate_samples(model, meta, decode, tmp_path / "one", 20, 7, kwargs, seed=4)
    for rank in range(2):
        generate_samples(model, meta, decode, tmp_path / "two", 20, 3, kwargs, seed=4, rank=rank, world=2)
    two = assemble_samples(tmp_path / "two", 20)
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
        assert len(np.unique(a["arr_0"].reshape(20, -1), axis=0)) == 20


def test_noise_is_one_batched_call_per_step(monkeypatch):
    """The sampler asks for its step noise once per stochastic step, for the whole batch."""
    calls = []
    original = counter_rng.counter_normal

    def counting(keys, step, shape, dtype=torch.float64):
        calls.append((keys.shape[1], step))
        return original(keys, step, shape, dtype)

    monkeypatch.setattr("ahpa.sampling.counter_normal", counting)
    noise = noise_for_indices(range(5), 0, (4, 2, 2))
    sample(Elementwise(), torch.zeros(5, dtype=torch.long), noise, mode="sde", steps=4, seeds=sde_seeds(range(5), 0))
    assert calls == [(5, 0), (5, 1), (5, 2)]  # steps - 1 stochastic steps, then the mean step
