"""A deterministic, resumable stream of per-rank index batches.

The stream is the concatenation of epoch orders (epoch e: a permutation of
``range(n)`` seeded by ``(seed, e)``), cut into global batches of
``batch_per_rank * world`` indices; rank r takes slice r of each global batch.
A global batch may straddle an epoch boundary, so every index is seen exactly
once per epoch and the state after k batches is a pure function of k:
``epoch, position = divmod(k * global_batch, n)`` from the start.  Resuming
from :meth:`state_dict` therefore gives exactly the batches an uninterrupted
stream would give (the REPA fault of checkpoints without data position).

With ``shard_sizes`` (contiguous index ranges, one per cache shard), an epoch
shuffles the shard order and then shuffles indices within each window of
``shard_window`` consecutive shards of that order: reads stay inside a few
memory-mapped files at a time, while the order is still random across shards
from epoch to epoch.  The price is that a batch draws from one window (about
``shard_window * shard_size`` items) rather than the whole set; the extractor
writes shards from a shuffled image list, so each shard already mixes classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ahpa.errors import AhpaError


def step_generator(seed: int, step: int, device="cpu", stream: int = 0) -> torch.Generator:
    """The generator of all random draws of global step ``step`` (``stream`` separates independent uses).

    Seeded by (seed, step) alone, so a resumed run draws what an uninterrupted one
    would, and every rank draws the same global-batch values and takes its slice.
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 7 + stream) % (2**63 - 1))


class ResumableSampler:
    """Infinite batch sampler; pass it as ``DataLoader(batch_sampler=...)``."""

    def __init__(
        self,
        n: int,
        batch_per_rank: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        shard_sizes: Sequence[int] | None = None,
        shard_window: int = 8,
    ):
        if n < 1 or batch_per_rank < 1:
            raise AhpaError(f"sampler needs n >= 1 and batch_per_rank >= 1 (got n={n}, batch_per_rank={batch_per_rank})")
        if not 0 <= rank < world:
            raise AhpaError(f"rank {rank} is outside world size {world}")
        if shard_sizes is not None and (sum(shard_sizes) != n or min(shard_sizes) < 1):
            raise AhpaError(f"shard_sizes must be positive and sum to n={n} (they sum to {sum(shard_sizes)})")
        if shard_window < 1:
            raise AhpaError("shard_window must be at least 1")
        self.n, self.batch_per_rank, self.seed = n, batch_per_rank, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.shard_sizes = None if shard_sizes is None else [int(s) for s in shard_sizes]
        self.shard_window = shard_window
        self.global_batch = batch_per_rank * world
        self._start = (0, 0)  # (epoch, position) where the last load / construction put us
        self._yielded = 0  # batches yielded since then
        self._order: tuple[int, np.ndarray] | None = None  # cached (epoch, order)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of all n indices in ``epoch`` (int64)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        if not self.shuffle:
            order = np.arange(self.n, dtype=np.int64)
        else:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            if self.shard_sizes is None:
                order = rng.permutation(self.n).astype(np.int64)
            else:
                starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
                shards = rng.permutation(len(self.shard_sizes))
                parts = []
                for w in range(0, len(shards), self.shard_window):
                    window = np.concatenate([np.arange(starts[s], starts[s] + self.shard_sizes[s]) for s in shards[w : w + self.shard_window]])
                    parts.append(rng.permutation(window))
                order = np.concatenate(parts).astype(np.int64)
        self._order = (epoch, order)
        return order

    def _state_after(self, batches: int) -> tuple[int, int]:
        epoch, position = self._start
        epoch_delta, position = divmod(position + batches * self.global_batch, self.n)
        return epoch + epoch_delta, position

    def state_dict(self, consumed: int | None = None) -> dict:
        """``{"epoch", "position"}`` of the next global batch.

        By default, after the batches this sampler has yielded since the last
        load.  A ``DataLoader`` with workers draws batches ahead of training;
        then pass ``consumed``, the number of batches training has taken since
        the last load, to get the exact resume point.
        """
        epoch, position = self._state_after(self._yielded if consumed is None else consumed)
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n:
            raise AhpaError(f"sampler state {state} does not fit a dataset of {self.n} items; was the checkpoint made on another dataset?")
        self._start, self._yielded = (epoch, position), 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = self._state_after(self._yielded)
        lo, hi = self.rank * self.batch_per_rank, (self.rank + 1) * self.batch_per_rank
        while True:
            chunks, need = [], self.global_batch
            while need:
                order = self.epoch_order(epoch)
                take = min(need, self.n - position)
                chunks.append(order[position : position + take])
                need -= take
                position += take
                if position == self.n:
                    epoch, position = epoch + 1, 0
            self._yielded += 1
            yield np.concatenate(chunks)[lo:hi].tolist()
