"""``ahpa diagnose {gsnr,router,features}``: the paper's analyses on any checkpoint (Sec. 3, 5.4; Figs. 2, 4, 5)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ahpa.diagnostics import gsnr

    p = subparsers.add_parser("diagnose", help="G-SNR along the trajectory, router trajectories, feature pictures")
    sub = p.add_subparsers(dest="diagnostic", metavar="DIAGNOSTIC")
    g = sub.add_parser("gsnr", help="G-SNR of the alignment gradient per t, for several targets (Fig. 2, Table 7)")
    gsnr.add_arguments(g)
    g.set_defaults(func=gsnr.run_gsnr)
    p.set_defaults(func=lambda args: p.print_help() or 1)
