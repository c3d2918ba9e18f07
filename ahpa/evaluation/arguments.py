"""The checks ``ahpa evaluate`` makes of its arguments before anything is read or written, shared by
the ADM metrics (:mod:`ahpa.evaluation.command`) and the text-to-image ones (:mod:`ahpa.evaluation.t2i`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ahpa.errors import AhpaError
from ahpa.evaluation.features import default_cache_dir
from ahpa.io import check_output_dir, check_output_file


def check_arguments(args: argparse.Namespace, suffix: str = ".metrics.json") -> str:
    """Every argument and output path, before anything is read or written; returns the device.

    ``suffix``: of the default results file beside each sample file."""
    if args.batch < 1:
        raise AhpaError(f"--batch must be at least 1 (got {args.batch})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise AhpaError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise AhpaError(f"--device {device} asked for, but this machine has no usable CUDA GPU; use --device cpu (slow) or run on a GPU")
    if kind not in ("cuda", "cpu"):
        raise AhpaError(f"--device {device!r}: use cuda, cuda:N or cpu")
    outs = [Path(args.out)] if args.out else [Path(p).with_suffix(suffix) for p in args.samples]
    for out in outs:
        check_output_file(out, "--out" if args.out else "results file", need_bytes=64 * 2**10)
    if args.csv:
        check_output_file(args.csv, "--csv", need_bytes=64 * 2**10)
    check_output_dir(args.cache_dir or default_cache_dir(), "--cache-dir")
    return device
