"""``ahpa diagnose router``: router trajectories (paper Fig. 5, Sec. 5.4) of a checkpoint or of a whole run.

For one checkpoint: the group scales gamma_k and the within-group layer weights
against t (``router.png``, as the trainer writes).  For a run directory: the same
for its latest checkpoint, plus the weights over training at a few t
(``router_training.png``), from every checkpoint the run still holds
(``train.keep_last`` prunes older ones).  All values go to ``router.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ahpa.checkpointing import latest_checkpoint
from ahpa.errors import AhpaError
from ahpa.io import write_json_atomic
from ahpa.router_plot import plot_router, plot_router_training
from ahpa.runs import checkpoint_dir, load_objective


def run_router(args: argparse.Namespace) -> int:
    at = [float(v) for v in args.at.split(",") if v.strip()]
    if not at or any(not 0.0 <= v <= 1.0 for v in at):
        raise AhpaError(f"--at needs t values in [0, 1], got {args.at!r}")
    if args.t_points < 2:
        raise AhpaError(f"--t-points must be at least 2, got {args.t_points}")
    path = Path(args.ckpt)
    if (path / "checkpoints").is_dir():
        root = path / "checkpoints"
        ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state.json").is_file())
        if not ckpts:
            raise AhpaError(f"run directory {path} holds no complete checkpoint")
        latest = latest_checkpoint(path)
    else:
        ckpts = [checkpoint_dir(args.ckpt)]
        latest = ckpts[0]
    cfg, last = load_objective(latest)
    if last is None:
        raise AhpaError(f"{latest} is a vanilla SiT run: it has no router to plot")
    shapes = dict(last.group_shapes)
    objectives = {int(p.name): load_objective(p, cfg, shapes)[1] for p in ckpts if p != latest}
    objectives[int(latest.name)] = last
    steps = sorted(objectives)
    out = Path(args.out)
    values = plot_router(last, out / "router.png", t_points=args.t_points)
    t_at = torch.tensor(at)
    over = [objectives[s].router_weights(t_at) for s in steps]
    result = {
        "checkpoint": str(latest), "router": cfg.align.router, "groups": last.groups,
        "trajectory": {k: v.tolist() for k, v in values.items()},
        "training": {"steps": steps, "t": at, "weights": [{k: v.tolist() for k, v in w.items()} for w in over]},
    }
    files = ["router.png"]
    if len(steps) > 1:
        plot_router_training(steps, over, at, last.groups, out / "router_training.png")
        files.append("router_training.png")
    write_json_atomic(out / "router.json", result, indent=1)
    print(f"wrote {', '.join(str(out / f) for f in files + ['router.json'])} ({len(steps)} checkpoint(s): {steps})")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (all its checkpoints)")
    p.add_argument("--out", required=True, help="output directory for router.png, router_training.png, router.json")
    p.add_argument("--at", default="0.1,0.5,0.9", help="t values for the weights over training (default 0.1,0.5,0.9)")
    p.add_argument("--t-points", type=int, default=101, help="points of the t grid of router.png")
