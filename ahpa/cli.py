"""The ``ahpa`` command.  Each subcommand lives beside the code it runs and
registers itself here through a ``register(subparsers)`` function that sets
``func`` on its parser; this file only collects them and turns
:class:`AhpaError` (and a full disk or a read-only place, in any library's error type) into one clear line
on stderr (exit status 2), and :class:`~ahpa.preemption.Preempted` (SIGTERM/SIGUSR1, after the command saved
its finished work) into one line and exit status 75.  Ctrl-C stays exit 130 with its own line."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from ahpa import __version__
from ahpa.errors import AhpaError, disk_full
from ahpa.launch import launch_mismatch
from ahpa.preemption import EXIT_PREEMPTED, Preempted

# Each module defines register(subparsers) for the subcommands named beside it.
COMMANDS = [
    "ahpa.train",  # train
    "ahpa.demo",  # demo
    "ahpa.generate.command",  # sample
    "ahpa.evaluation.command",  # evaluate
    "ahpa.extract",  # extract
    "ahpa.data.tiny_vae",  # train-vae
    "ahpa.diagnostics.profile_command",  # profile
    "ahpa.diagnostics.command",  # diagnose
    "ahpa.study.command",  # study
]


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ahpa", description="Adaptive Hierarchical Prior Alignment for SiT/DiT training.")
    parser.add_argument("--version", action="version", version=f"ahpa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that ``section.key=value`` overrides may also come before or between the flags
    (``train a.b=1 --out X c.d=2``: argparse alone calls ``c.d=2`` an unrecognized argument)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown and hasattr(args, "overrides"):
        stray = [a for a in unknown if "=" in a and not a.startswith("-")]
        args.overrides = list(args.overrides or []) + stray
        unknown = [a for a in unknown if a not in stray]
    if unknown:
        hint = ("; section.key=value overrides go after the flags" if any("=" in a and not a.startswith("-") for a in unknown)
                else "")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if isinstance(getattr(args, "out", None), str) and not args.out.strip():  # --out "": the working directory, silently
        print(f"ahpa {args.command}: error: --out is empty; pass a directory (or file) name", file=sys.stderr)
        return 2
    mismatch = launch_mismatch()  # accelerate launch --cpu --num_processes 2 started one process: a warning
    if mismatch:
        print(f"ahpa {args.command}: {mismatch}", file=sys.stderr)
    try:
        result = args.func(args)
    except AhpaError as err:
        print(f"ahpa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:  # SIGTERM/SIGUSR1: the finished work is written (ahpa/preemption.py)
        print(f"ahpa {args.command}: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except OSError as err:
        # A full disk or a read-only / forbidden place met while writing: atomic writers left
        # the previous outputs intact (io.py); one line, like any other bad input.
        if err.errno not in _WRITE_ERRNOS:
            raise
        print(f"ahpa {args.command}: error: {err.filename or 'a file'}: {err.strerror}; free space or choose a "
              "writable --out (or fix the file's permissions), then rerun: finished work resumes", file=sys.stderr)
        return 2
    except Exception as err:
        # A full disk in another library's error type (safetensors' SafetensorError, torch's zip writer): one line too
        if not disk_full(err):
            raise
        print(f"ahpa {args.command}: error: {disk_full(err)} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
              "free space, then rerun: the previous outputs are intact and finished work resumes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ahpa {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
