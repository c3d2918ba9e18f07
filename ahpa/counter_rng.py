"""Counter-based Gaussian noise for the SDE sampler: one batched call per step.

Sample i's step-s noise is a pure function of (its 64-bit key, s, element),
computed for the whole batch at once with vectorised integer ops:

- Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3";
  the generator behind cuRAND and torch's CUDA RNG) maps the 128-bit counter
  ``(block, step, 0, 0)`` and the 64-bit key to four 32-bit words.  32-bit words
  live in int64 tensors; the 32x32 -> 64-bit products are split into 16-bit
  halves so no int64 product overflows.  Checked against the Random123
  known-answer vectors in ``tests/test_scale_sampling.py``.
- Box-Muller turns each pair of words into two N(0, 1) values, in float64.

Why not ``torch.Generator`` per sample: that is ``batch`` calls per step (the old
scheme); one torch generator for the batch makes each sample depend on its
batch position.  Here the noise of sample i never depends on the batch size,
its position or the number of processes.

Bitwise batch invariance on the CPU: torch evaluates ``log``/``cos``/``sin`` with
SIMD code (Sleef) except on the scalar remainder of a loop and splits large
tensors across threads at positions that depend on the size, and the two paths
may differ in the last bit.  So each sample's elements are padded to a multiple
of ``PAD`` and the float math runs on flat chunks of ``CHUNK`` elements (below
torch's 32768-element parallel grain, a multiple of every SIMD width): every
element then takes the SIMD path, whatever the batch.  On CUDA each element runs
the same code, so no chunking is needed.  Values agree across device types to
float64 rounding, not bitwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF
ROUNDS = 10
PAD = 128  # elements per sample rounded up to this (4 per Philox block)
CHUNK = 16384  # CPU float math in chunks of this many elements (< torch's parallel grain 32768)


def _mulhilo(a: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of ``a * m`` for 32-bit values held in int64 (no overflow)."""
    p1 = (a & 0xFFFF) * m  # < 2**48
    p2 = (a >> 16) * m  # < 2**48
    s = p1 + ((p2 & 0xFFFF) << 16)  # < 2**49
    return (p2 >> 16) + (s >> 32), s & MASK32


def philox4x32(counter: Tensor, key: Tensor, rounds: int = ROUNDS) -> Tensor:
    """Philox4x32-``rounds``: ``counter [4, *S]`` and ``key [2, *S]`` (int64 holding uint32,
    broadcastable) -> ``[4, *S]`` int64 words in [0, 2**32)."""
    c = counter.to(torch.int64)
    k = key.to(torch.int64)
    shape = torch.broadcast_shapes(c.shape[1:], k.shape[1:])
    c = c.expand(4, *shape)
    mult = torch.tensor([M1, M0], dtype=torch.int64, device=c.device).view(2, *([1] * len(shape)))
    bump = torch.tensor([W0, W1], dtype=torch.int64, device=c.device).view(2, *([1] * len(shape)))
    for r in range(rounds):
        if r:
            k = (k + bump) & MASK32
        # (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2; new = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
        hi, lo = _mulhilo(c[[2, 0]], mult)
        mixed = hi ^ c[[1, 3]] ^ k
        c = torch.stack([mixed, lo], dim=1).reshape(4, *shape)
    return c


def _box_muller(words: Tensor) -> Tensor:
    """``[4, n]`` uniform words -> ``[4, n]`` float64 standard normals (pairs (0, 1) and (2, 3))."""
    u = (words.to(torch.float64) + 1.0) * 2.0**-32  # (0, 1]: log is finite
    radius = torch.sqrt(-2.0 * torch.log(u[0::2]))
    angle = (2.0 * math.pi) * (words[1::2].to(torch.float64) * 2.0**-32)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).reshape(4, -1)


def seed_keys(seeds, device=None) -> Tensor:
    """Per-sample 64-bit integer seeds -> Philox keys ``[2, B]`` (low and high 32 bits)."""
    values = [int(s) & ((1 << 64) - 1) for s in seeds]
    return torch.tensor([[v & MASK32 for v in values], [v >> 32 for v in values]], dtype=torch.int64, device=device)


def counter_normal(keys: Tensor, step: int, shape, dtype: torch.dtype = torch.float64) -> Tensor:
    """N(0, 1) noise ``[B, *shape]`` for per-sample keys ``[2, B]`` at integer ``step``.

    Element e of sample b is Box-Muller of Philox(counter=(e // 4, step, 0, 0), key=keys[:, b]):
    a function of (keys[:, b], step, e) alone.
    """
    if not 0 <= step < 2**32:
        raise ValueError(f"step must lie in [0, 2**32), got {step}")
    batch, device = keys.shape[1], keys.device
    n = math.prod(shape)
    blocks = -(-n // PAD) * PAD // 4
    counter = torch.zeros(4, 1, blocks, dtype=torch.int64, device=device)
    counter[0, 0] = torch.arange(blocks, dtype=torch.int64, device=device)
    counter[1] = step
    words = philox4x32(counter, keys[:, :, None]).reshape(4, -1)  # [4, B * blocks]
    if device.type == "cpu" and words.shape[1] > CHUNK // 4:  # see the module docstring
        normals = torch.cat([_box_muller(w) for w in words.split(CHUNK // 4, dim=1)], dim=1)
    else:
        normals = _box_muller(words)
    # element 4j + q of a sample is word q of its block j
    out = normals.view(4, batch, blocks).permute(1, 2, 0).reshape(batch, blocks * 4)[:, :n]
    return out.reshape(batch, *shape).to(dtype)
