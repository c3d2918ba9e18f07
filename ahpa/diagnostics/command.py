"""``ahpa diagnose {gsnr,router,features,projection}``: the paper's analyses on any checkpoint (Sec. 3, 5.4; Figs. 2, 4, 5),
and what a projected feature cache costs the alignment gradient (docs/projected-caches.md)."""

from __future__ import annotations

from ahpa.diagnostics import features, gsnr, projection_fidelity, router_command


def register(subparsers) -> None:
    p = subparsers.add_parser("diagnose", help="G-SNR along the trajectory, router trajectories, feature pictures")
    sub = p.add_subparsers(dest="diagnostic", metavar="DIAGNOSTIC")
    g = sub.add_parser("gsnr", help="G-SNR of the alignment gradient per t, for several targets (Fig. 2, Table 7)")
    gsnr.add_arguments(g)
    g.set_defaults(func=gsnr.run_gsnr)
    r = sub.add_parser("router", help="router weights against t (Fig. 5), and over training for a run directory")
    router_command.add_arguments(r)
    r.set_defaults(func=router_command.run_router)
    f = sub.add_parser("features", help="PCA pictures of the pooled VAE features per layer (Fig. 4)")
    features.add_arguments(f)
    f.set_defaults(func=features.run_features)
    j = sub.add_parser("projection", help="explained variance and alignment-gradient cosine of projected targets, per K and t")
    projection_fidelity.add_arguments(j)
    j.set_defaults(func=projection_fidelity.run_projection)
    p.set_defaults(func=lambda args: p.print_help() or 1)
