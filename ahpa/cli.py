"""The ``ahpa`` command.  Each subcommand lives beside the code it runs and
registers itself here through a ``register(subparsers)`` function that sets
``func`` on its parser; this file only collects them and turns
:class:`AhpaError` into one clear line on stderr (exit status 2)."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from ahpa import __version__
from ahpa.errors import AhpaError

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except AhpaError as err:
        print(f"ahpa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk or a read-only / forbidden place met while writing: atomic writers left
        # the previous outputs intact (io.py); one line, like any other bad input.
        if err.errno not in _WRITE_ERRNOS:
            raise
        print(f"ahpa {args.command}: error: {err.filename or 'a file'}: {err.strerror}; free space or choose a "
              "writable --out (or fix the file's permissions), then rerun: finished work resumes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ahpa {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
