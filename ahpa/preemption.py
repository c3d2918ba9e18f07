"""Preemption: SIGTERM / SIGUSR1 stop a long command at a clean boundary, and it exits with :data:`EXIT_PREEMPTED`.

A cluster (SLURM with ``--signal``, Kubernetes, a spot instance) sends SIGTERM, or SIGUSR1 ahead of a time
limit, and kills the job a while later.  Inside :func:`handlers` both only set a flag; the command checks it
at its next boundary (``train``: the step in flight, then a checkpoint of exactly that step; ``sample``,
``extract``, ``study``, ``diagnose gsnr``: the unit of work in flight, which they already resume from) and
raises :class:`Preempted`.  The ``ahpa`` command prints its message on one line and exits 75 (EX_TEMPFAIL),
which a requeue script tests (docs/reliability.md, "Preemption").  A second signal while the checkpoint is
written only sets the flag again, so it cannot interrupt the save.

SIGINT (Ctrl-C) is left alone: it stays a KeyboardInterrupt, exit 130 (a person at the keyboard wants the
command to stop now, not after a checkpoint; the atomic writes keep the previous outputs intact).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later"; a requeue script tests it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Tests: ``AHPA_TEST_SIGTERM_AT=N`` makes a command send itself SIGTERM in its N-th unit of work: ``train`` during
# step N (after its backward pass, rank 0 only), ``sample`` after its N-th batch is written, ``extract`` after its
# N-th shard is handed to the writer; a test interrupts deterministically, without racing a sleep.
TEST_HOOK = "AHPA_TEST_SIGTERM_AT"

_received: list[int] = []


class Preempted(BaseException):
    """A command stopped on SIGTERM/SIGUSR1 after flushing its finished work; the CLI exits 75.

    A BaseException, like KeyboardInterrupt, so a generic ``except Exception`` does not swallow it."""


def requested() -> signal.Signals | None:
    """The first stop signal received inside :func:`handlers`, or None."""
    return signal.Signals(_received[0]) if _received else None


def _handler(signum, frame) -> None:
    if _received:  # a second signal: the command is already stopping (e.g. writing its checkpoint)
        print(f"ahpa: {signal.Signals(signum).name} again: already stopping at the next safe point, please wait",
              file=sys.stderr, flush=True)
    _received.append(signum)


@contextmanager
def handlers() -> Iterator[None]:
    """SIGTERM and SIGUSR1 set a flag (:func:`requested`) instead of ending the process; restored on exit.

    Outside the main thread (signals cannot be caught there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _received.clear()


def check(what: str) -> None:
    """Raise :class:`Preempted` (message: ``what``, e.g. "12 of 40 shards are written; rerun the same command
    to continue") when a stop signal has arrived; call it at a unit boundary, after the unit is written."""
    sig = requested()
    if sig is not None:
        raise Preempted(f"stopped on {sig.name}: {what}")


def stop_vote(local: bool, reduce: Callable[[int], int] | None = None) -> bool:
    """One decision for all ranks: stop when any rank received a signal.  ``reduce``: sum of an int over ranks
    (None: one process)."""
    return bool(reduce(int(local))) if reduce is not None else local


def vote_reduce(world: int) -> Callable[[int], int] | None:
    """The ``reduce`` of :func:`stop_vote` for ``world`` training processes: a sum over ranks of one int per step,
    on the CPU over gloo (a second, gloo group beside NCCL), so it adds no GPU synchronisation; None for one."""
    if world == 1:
        return None
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def reduce(value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(flag, group=group)
        return int(flag.item())

    return reduce


def preempted(where: str) -> Preempted:
    """The training loop's stop: ``where`` (step and checkpoint), the signal, and how to resume."""
    sig = requested()
    return Preempted(f"stopped on {sig.name if sig else 'a stop signal to another rank'} {where}; rerun the same command to resume")


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader's ``worker_init_fn``: its workers ignore SIGTERM/SIGUSR1 (``scancel`` signals every process of
    the job), so the main process, not a dead worker's error, decides when to stop; workers end with it."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def send_test_signal(step: int) -> None:
    """The test hook (:data:`TEST_HOOK`): SIGTERM to this process in its ``step``-th unit of work."""
    at = os.environ.get(TEST_HOOK)
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGTERM)
