"""What the launcher started, against what it was asked for: the one check is ``accelerate launch --cpu
--num_processes N`` (N > 1), whose CPU launcher starts a single process and says nothing (an upstream
behaviour); ``ahpa`` names it in one warning line (docs/reliability.md)."""

from __future__ import annotations

import os


def _launcher_cmdline() -> list[str]:
    """The parent process's command line (Linux /proc), e.g. ``accelerate launch --cpu --num_processes 2 ...``."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def requested_processes(argv: list[str], env) -> int | None:
    """Processes asked of ``accelerate launch`` (``--num_processes N``, ``--num-processes=N``) or by
    ``ACCELERATE_NUM_PROCESSES``; None when neither says."""
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (argv[i + 1] if arg == flag and i + 1 < len(argv) else None)
            if value is not None and value.isdigit():
                return int(value)
    value = env.get("ACCELERATE_NUM_PROCESSES", "")
    return int(value) if value.isdigit() else None


def launch_mismatch(env=None, argv: list[str] | None = None) -> str | None:
    """A warning when ``accelerate launch --cpu --num_processes N`` (N > 1) started one process: accelerate's
    ``--cpu`` launcher ignores ``--num_processes`` and sets no WORLD_SIZE.  The run is still correct (the global
    batch and every draw do not depend on the process count), only N times slower than asked."""
    env = os.environ if env is None else env
    if "ACCELERATE_USE_CPU" not in env or int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return None  # not started by accelerate launch, or several processes did start
    wanted = requested_processes(_launcher_cmdline() if argv is None else argv, env)
    if not wanted or wanted <= 1:
        return None
    return (f"warning: {wanted} processes were requested (accelerate launch --cpu --num_processes {wanted}) but one started "
            "(WORLD_SIZE unset): accelerate's --cpu launcher runs a single process. This run continues as one process with "
            "the same global batch and results; for several CPU processes use `torchrun --nproc_per_node "
            f"{wanted} -m ahpa.cli ...` (gloo)")
