"""Counter-based Gaussian noise for the SDE sampler: one batched call for many steps.

Sample i's step-s noise is a pure function of (its 64-bit key, s, element),
computed for the whole batch, and for several steps, at once:

- Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3";
  the generator behind cuRAND and torch's CUDA RNG) maps the 128-bit counter
  ``(block, step, 0, 0)`` and the 64-bit key to four 32-bit words.  32-bit words
  live in int64 tensors.  A 32 x 32-bit product wraps modulo 2**64 in int64, so its
  low word is ``p & MASK32`` and its high word ``(p >> 32) & MASK32`` (arithmetic
  shift, then masked).  Checked against the Random123 known-answer vectors and a
  pure-Python transcription in ``tests/test_scale_sampling.py``.
- Box-Muller turns each pair of words into two N(0, 1) values, in float64.

Why not ``torch.Generator`` per sample: that is ``batch`` calls per step (v0.1's
scheme); one torch generator for the batch makes each sample depend on its batch
position.  Here the noise of sample i never depends on the batch size, its
position, the number of processes, or how many steps are drawn per call.

Cost: counters and keys broadcast (``[steps, 1, blocks]`` against ``[1, batch, 1]``),
the round keys are computed once per call, each Philox round is 10 elementwise
integer ops, and :class:`StepNoise` draws up to ``MAX_ELEMENTS`` values (several
steps) per call: on a GPU the ~130 small kernels of a call are shared by all its steps.

Bitwise batch invariance on the CPU: torch evaluates ``log``/``cos``/``sin`` with
SIMD code (Sleef) except on the scalar remainder of a loop and splits large
tensors across threads at positions that depend on the size, and the two paths
may differ in the last bit.  So each sample's elements are padded to a multiple
of ``PAD`` and the float math runs on flat chunks of ``CHUNK`` elements (below
torch's 32768-element parallel grain, a multiple of every SIMD width): every
element then takes the SIMD path, whatever the batch.  On CUDA each element runs
the same code, so no chunking is needed.  Values agree across device types to
float64 rounding, not bitwise.  The values are those of ahpa 0.2.0 (same counters,
same float operations in the same order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF
ROUNDS = 10
PAD = 128  # elements per sample rounded up to this (4 per Philox block)
CHUNK = 16384  # CPU float math in chunks of this many elements (< torch's parallel grain 32768)
MAX_ELEMENTS = {"cuda": 1 << 22, "cpu": 1 << 18}  # StepNoise: values per call (32 MiB / 2 MiB of float64)


def _round_keys(key: Tensor, rounds: int) -> Tensor:
    """``key [2, *S]`` -> the key of every round ``[2, rounds, *S]`` (Weyl sequence mod 2**32)."""
    bumps = torch.tensor([[r * W0 for r in range(rounds)], [r * W1 for r in range(rounds)]],
                         dtype=torch.int64, device=key.device).view(2, rounds, *([1] * (key.dim() - 1)))
    return (key.unsqueeze(1) + bumps) & MASK32


def _philox_words(c: Sequence[Tensor], key: Tensor, rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four output words of Philox4x32 for counter words ``c`` (four int64 tensors holding
    uint32) and ``key [2, *S]``, all broadcastable; broadcast operands are never copied."""
    c0, c1, c2, c3 = c
    k0, k1 = _round_keys(key, rounds).unbind(0)
    for r in range(rounds):
        p0, p1 = c0 * M0, c2 * M1  # wrap modulo 2**64: exact low and high words
        # new = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); lo words are masked when next used
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0[r]) & MASK32, p1, ((p0 >> 32) ^ c3 ^ k1[r]) & MASK32, p0
    return c0, c1 & MASK32, c2, c3 & MASK32


def philox4x32(counter: Tensor, key: Tensor, rounds: int = ROUNDS) -> Tensor:
    """Philox4x32-``rounds``: ``counter [4, *S]`` and ``key [2, *S]`` (int64 holding uint32,
    broadcastable) -> ``[4, *S]`` int64 words in [0, 2**32)."""
    words = _philox_words(counter.to(torch.int64).unbind(0), key.to(torch.int64), rounds)
    return torch.stack(torch.broadcast_tensors(*words))


def seed_keys(seeds, device=None) -> Tensor:
    """Per-sample 64-bit integer seeds -> Philox keys ``[2, B]`` (low and high 32 bits)."""
    values = [int(s) & ((1 << 64) - 1) for s in seeds]
    return torch.tensor([[v & MASK32 for v in values], [v >> 32 for v in values]], dtype=torch.int64, device=device)


def _box_muller(even: Tensor, odd: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform words -> (r cos a, r sin a), r = sqrt(-2 log u) of ``even`` (u in (0, 1], so log
    is finite), a = 2 pi u' of ``odd``; float64."""
    radius = torch.sqrt(-2.0 * torch.log((even.to(torch.float64) + 1.0) * 2.0**-32))
    angle = (2.0 * math.pi) * (odd.to(torch.float64) * 2.0**-32)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def counter_normal(keys: Tensor, step: int | Sequence[int], shape, dtype: torch.dtype = torch.float64) -> Tensor:
    """N(0, 1) noise for per-sample keys ``[2, B]``: ``[B, *shape]`` at integer ``step``, or
    ``[len(step), B, *shape]`` for a sequence of steps (one call; the same values).

    Element e of sample b at step s is Box-Muller of Philox(counter=(e // 4, s, 0, 0), key=keys[:, b]):
    a function of (keys[:, b], s, e) alone.
    """
    steps = [step] if isinstance(step, int) else [int(s) for s in step]
    if not steps or not all(0 <= s < 2**32 for s in steps):
        raise ValueError(f"steps must be integers in [0, 2**32), at least one; got {step}")
    batch, device = keys.shape[1], keys.device
    n = math.prod(shape)
    blocks = -(-n // PAD) * PAD // 4
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counter = (torch.arange(blocks, dtype=torch.int64, device=device).view(1, 1, blocks),
               torch.tensor(steps, dtype=torch.int64, device=device).view(-1, 1, 1), zero, zero)
    w0, w1, w2, w3 = _philox_words(counter, keys.to(torch.int64).reshape(2, 1, batch, 1))
    full = (len(steps), batch, blocks)
    even = torch.stack((w0.expand(full), w2.expand(full))).view(-1)  # [pair, S, B, blocks] flat
    odd = torch.stack((w1.expand(full), w3.expand(full))).view(-1)
    if device.type == "cpu" and even.numel() > CHUNK:  # see the module docstring
        parts = [_box_muller(e, o) for e, o in zip(even.split(CHUNK), odd.split(CHUNK))]
        cos, sin = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        cos, sin = _box_muller(even, odd)
    # element 4j + 2p + c of a sample is pair p of block j, cos (c = 0) or sin (c = 1)
    out = torch.stack((cos.view(2, *full), sin.view(2, *full)), dim=-1).permute(1, 2, 3, 0, 4)
    out = out.reshape(len(steps), batch, blocks * 4)[..., :n].reshape(len(steps), batch, *shape).to(dtype)
    return out[0] if isinstance(step, int) else out


class StepNoise:
    """The step noise of steps ``0 .. count - 1`` for keys ``[2, B]``: ``noise(step)`` is
    ``counter_normal(keys, step, shape)``, drawn for as many steps per call as fit in
    ``max_elements`` values (default: ``MAX_ELEMENTS`` of the device type; larger blocks stop
    paying on the CPU, where they leave the cache).  The sampler asks for steps in increasing order."""

    def __init__(self, keys: Tensor, shape, count: int, dtype: torch.dtype = torch.float64,
                 max_elements: int | None = None):
        self.keys, self.shape, self.count, self.dtype = keys, tuple(shape), count, dtype
        if max_elements is None:
            max_elements = MAX_ELEMENTS.get(keys.device.type, MAX_ELEMENTS["cuda"])
        per_step = keys.shape[1] * -(-math.prod(shape) // PAD) * PAD
        self.per_call = max(1, min(count, max_elements // per_step))
        self._start, self._values = 0, None

    def __call__(self, step: int) -> Tensor:
        if not 0 <= step < self.count:
            raise ValueError(f"step {step} outside 0..{self.count - 1}")
        if self._values is None or not self._start <= step < self._start + len(self._values):
            self._start = step
            self._values = counter_normal(self.keys, range(step, min(step + self.per_call, self.count)),
                                          self.shape, self.dtype)
        return self._values[step - self._start]
