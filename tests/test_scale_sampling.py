"""Counter-based SDE noise (ahpa.counter_rng): known answers, law, and per-index determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import ahpa.counter_rng as counter_rng
from ahpa.counter_rng import StepNoise, counter_normal, philox4x32, seed_keys
from ahpa.generate.engine import assemble_samples, generate_samples
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


def philox_reference(counter, key, rounds=10):
    """Philox4x32 transcribed from Random123's philox.h with Python integers (no overflow to care about)."""
    c, (k0, k1) = list(counter), key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
    return c


def test_philox_matches_python_transcription_on_random_words():
    """Random 32-bit words: the int64 products overflow and wrap, which the transcription never does."""
    rng = np.random.default_rng(0)
    counters, keys = rng.integers(0, 2**32, size=(4, 64)), rng.integers(0, 2**32, size=(2, 64))
    out = philox4x32(torch.from_numpy(counters), torch.from_numpy(keys))
    assert out.T.tolist() == [philox_reference(c, k) for c, k in zip(counters.T.tolist(), keys.T.tolist())]


def test_counter_normal_keeps_the_values_of_0_2_0():
    """Pinned from ahpa 0.2.0's implementation (to float64 rounding: the bits of log/cos/sin may
    differ between CPUs), so SDE samples drawn with 0.2.0 are reproduced."""
    keys = seed_keys(sde_seeds([0, 12345], 7))
    assert keys.tolist() == [[2668623899, 1314385897], [1014427442, 687451150]]
    assert philox4x32(torch.tensor([[5], [3], [0], [0]]), keys[:, :1]).flatten().tolist() == \
        [915089778, 4032510162, 2984309538, 441060685]
    expected = torch.tensor([[-0.8750935379209694, -0.1375352888949183, -0.40948574640620083, 1.895813941254443,
                              -1.5337808449650576, -0.36815922641443727],
                             [-0.5707555402111998, 0.789374262218084, -2.4745160014445484, -0.053420798946621426,
                              -1.2907772728186284, 0.5835545301962056]], dtype=torch.float64)
    torch.testing.assert_close(counter_normal(keys, 3, (4, 2, 2)).flatten(1)[:, :6], expected, rtol=1e-14, atol=1e-14)


def test_several_steps_per_call_equal_one_step_per_call():
    keys, shape = seed_keys(sde_seeds(range(9), 3)), (4, 16, 16)  # 2 x 9 x 256 words: chunked float math
    many = counter_normal(keys, range(2, 7), shape)
    assert many.shape == (5, 9, *shape)
    for k, step in enumerate(range(2, 7)):
        assert many[k].numpy().tobytes() == counter_normal(keys, step, shape).numpy().tobytes()
    blocked = StepNoise(keys, shape, 7, max_elements=3 * 9 * 1024)  # 3 steps per call
    assert blocked.per_call == 3
    for step in range(7):
        assert blocked(step).numpy().tobytes() == counter_normal(keys, step, shape).numpy().tobytes()


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (benchmarks/gpu_suite.sh runs it)")
def test_cuda_noise_equals_cpu_noise_and_is_batch_invariant():
    """The same Philox words on CUDA (exactly) and the same normals to float64 rounding; bitwise batch invariance."""
    keys, shape = seed_keys(sde_seeds(range(64), 5)), (4, 32, 32)
    counter = torch.randint(0, 2**32, (4, 1000), dtype=torch.int64)
    assert torch.equal(philox4x32(counter.cuda(), keys[:, :1].cuda()).cpu(), philox4x32(counter, keys[:, :1]))
    gpu = counter_normal(keys.cuda(), [17, 18], shape)
    torch.testing.assert_close(gpu.cpu(), counter_normal(keys, [17, 18], shape), rtol=1e-12, atol=1e-12)
    assert torch.equal(counter_normal(keys[:, 20:27].cuda(), [17, 18], shape), gpu[:, 20:27])
    assert torch.equal(counter_normal(keys[:, 5:6].cuda(), 18, shape), gpu[1, 5:6])


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


def test_noise_is_one_batched_call_for_all_steps(monkeypatch):
    """The sampler asks for its step noise once for the whole batch and every step that fits in a call."""
    calls = []
    original = counter_rng.counter_normal

    def counting(keys, step, shape, dtype=torch.float64):
        calls.append((keys.shape[1], list(step)))
        return original(keys, step, shape, dtype)

    monkeypatch.setattr(counter_rng, "counter_normal", counting)
    noise = noise_for_indices(range(5), 0, (4, 2, 2))
    sample(Elementwise(), torch.zeros(5, dtype=torch.long), noise, mode="sde", steps=4, seeds=sde_seeds(range(5), 0))
    assert calls == [(5, [0, 1, 2])]  # steps - 1 stochastic steps, then the mean step
