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

from ahpa.errors import AhpaError


def _latent_and_grid(cfg, vae) -> tuple[int, int]:
    from ahpa.data.batches import _patch_size
    from ahpa.priors.vae import vae_downsample_factor

    latent = cfg.data.resolution // vae_downsample_factor(vae)
    return latent, latent // _patch_size(cfg.model.name)


def group_shapes_for(cfg, vae=None) -> dict[str, tuple[int, int]]:
    """(layers, channels) of each ``prior.groups`` entry, from the VAE alone (no data pass)."""
    from ahpa.priors.hierarchy import HierarchicalVAEPrior
    from ahpa.priors.vae import load_vae

    groups = list(cfg.prior.groups)
    if not all(g.startswith("G") and g[1:].isdigit() for g in groups):
        from ahpa.data.batches import build_source  # other feature keys: ask the data source

        return dict(build_source(cfg, device="cpu", rank=0, world=1, per_rank=cfg.train.global_batch).group_shapes)
    vae = vae if vae is not None else load_vae(cfg.vae.path)
    prior = HierarchicalVAEPrior(vae, groups=groups, grid=_latent_and_grid(cfg, vae)[1], grouping=cfg.prior.grouping,
                                 split=cfg.prior.split, resample=cfg.prior.resample)
    return dict(prior.group_shapes)


def objective_from_checkpoint(ckpt: Path, shapes: dict | None = None):
    """(config, trained alignment objective) of a checkpoint directory, without its data."""
    from ahpa.diagnostics.gsnr import load_state, read_config
    from ahpa.models.sit import build_sit
    from ahpa.priors.vae import load_vae
    from ahpa.train import build_objective

    cfg = read_config(ckpt / "config.yaml", [])
    if cfg.align.method == "vanilla":
        raise AhpaError(f"{ckpt} is a vanilla SiT run: it has no router to plot")
    vae = load_vae(cfg.vae.path)
    shapes = shapes or group_shapes_for(cfg, vae)
    with torch.device("meta"):  # only the shapes the objective needs (hidden size, grid, depth)
        sit = build_sit(cfg.model.name, input_size=_latent_and_grid(cfg, vae)[0], num_classes=cfg.model.num_classes)
    objective = build_objective(cfg, sit, shapes)
    if len(objective.state_dict()):
        load_state(objective, ckpt / "objective.safetensors", "alignment objective")
    return cfg, objective.eval()


def run_router(args: argparse.Namespace) -> int:
    from ahpa.checkpointing import latest_checkpoint
    from ahpa.diagnostics.gsnr import checkpoint_dir
    from ahpa.router_plot import plot_router, plot_router_training
    from ahpa.io import write_json_atomic

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
    cfg, last = objective_from_checkpoint(latest)
    shapes = dict(last.group_shapes)
    objectives = {int(p.name): objective_from_checkpoint(p, shapes)[1] for p in ckpts if p != latest}
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
