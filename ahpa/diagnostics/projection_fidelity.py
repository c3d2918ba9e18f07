"""What a projected cache costs the method (issue 18 item 2; docs/projected-caches.md): ``ahpa diagnose projection``.

For a run with an alignment objective (a checkpoint, or a config at its fresh initialisation) and for each K:

- the explained variance of every VAE group: the top-K eigenvalues / trace of the uncentred second moment of the
  normalised tokens, on the same seeded image subset ``ahpa extract --project pca:K --pca-images N`` fits on
  (:func:`ahpa.data.projection.pca_subset`, :func:`~ahpa.data.projection.group_moments`,
  :func:`~ahpa.data.projection.pca_from_moment`);
- per t of a grid, the cosine, per sample, between the alignment gradient at the aligned hidden state h with the
  full target and with the projected one::

      g_full = d/dh L(head(h), Y)          g_K = d/dh L(P head(h), P Y)

  ``Y``: the router's mixed target (paper Eqs. 3-4) of the checkpoint's trained objective; ``P``: block-diagonal,
  the group's ``[K, C_g]`` matrix on the group's channels.  A projected run's head outputs K channels per group and
  its target is ``P Y`` (the router's mix commutes with P); taking its head to be ``P head`` measures what the
  projection alone removes from the gradient the trained head sends into the backbone.  Also per t: the mean
  ``||g_K|| / ||g_full||`` and the fraction ``||P Y||^2 / ||Y||^2`` of the target's energy P keeps.

``--save-projection K`` writes ``OUT/projection-pca{K}.safetensors`` (the file format of a projected cache), for an
on-the-fly run with ``prior.project=`` that file.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from ahpa.align.losses import alignment_loss
from ahpa.build import build_backbone, build_objective, build_source, build_transport, vae_groups
from ahpa.config import load_config
from ahpa.data.images import ImageFolderDataset
from ahpa.data.projection import Projection, group_moments, load_projection, pca_from_moment, pca_subset, save_projection, subset_features
from ahpa.diagnostics.gsnr import source_config, t_grid, trajectory_batch
from ahpa.errors import AhpaError
from ahpa.io import write_json_atomic
from ahpa.runs import checkpoint_dir, load_backbone, load_objective, read_config

DEFAULT_K = "2,4,8,16,32,64"


# ---------------------------------------------------------------------- the algebra
def project_channels(x: torch.Tensor, matrices: dict[str, torch.Tensor], group_shapes: dict[str, tuple[int, int]]) -> torch.Tensor:
    """``[B, sum C_g, H, W]`` (groups concatenated in ``group_shapes``' order, as the objective's target) ->
    ``[B, sum K_g, H, W]``: each group's channels through its ``[K, C_g]`` matrix; groups without one pass through."""
    parts, start = [], 0
    for g, (_, c) in group_shapes.items():
        part = x[:, start : start + c]
        parts.append(torch.einsum("kc,bchw->bkhw", matrices[g].to(part), part) if g in matrices else part)
        start += c
    if start != x.shape[1]:
        raise AhpaError(f"{x.shape[1]} channels, the groups {dict(group_shapes)} have {start}")
    return torch.cat(parts, dim=1)


def alignment_gradient(objective: nn.Module, hidden: dict[int, torch.Tensor], target: torch.Tensor,
                       matrices: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per sample, ``d/dh`` of the alignment loss of ``objective``'s heads against ``target`` at the aligned hidden
    states (all depths, flattened and concatenated): ``[B, sum_d N * D]``.  With ``matrices``, the head's output and
    the target are first projected (:func:`project_channels`).  Every sample's loss depends on its own hidden state
    only, so the gradient of the batch sum is the per-sample gradient."""
    grads = []
    for d in objective.depths:
        with torch.enable_grad():
            h = hidden[d].detach().float().requires_grad_(True)
            pred, y = objective.predict(h, d), target
            if matrices is not None:
                pred, y = project_channels(pred, matrices, objective.group_shapes), project_channels(y, matrices, objective.group_shapes)
            grads.append(torch.autograd.grad(alignment_loss(pred, y, objective.loss_kind).sum(), h)[0].flatten(1))
    return torch.cat(grads, dim=1)


def gradient_fidelity(objective: nn.Module, hidden: dict[int, torch.Tensor], features: dict[str, torch.Tensor],
                      t: torch.Tensor, projections: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """For each K of ``projections`` (``{K: {group: [K, C_g]}}``), per sample ``[B]``: ``cos`` (g_full, g_K),
    ``norm_ratio`` ||g_K|| / ||g_full|| and ``target_kept`` ||P Y||^2 / ||Y||^2."""
    with torch.no_grad():
        target, _ = objective.alignment_target(features, t, objective.router_content(hidden))
    g_full = alignment_gradient(objective, hidden, target)
    out = {}
    for k, matrices in projections.items():
        g_k = alignment_gradient(objective, hidden, target, matrices)
        kept = project_channels(target, matrices, objective.group_shapes).flatten(1).square().sum(1) / target.flatten(1).square().sum(1).clamp_min(1e-30)
        out[k] = {"cos": torch.nn.functional.cosine_similarity(g_full, g_k, dim=1, eps=1e-12),
                  "norm_ratio": g_k.norm(dim=1) / g_full.norm(dim=1).clamp_min(1e-30), "target_kept": kept}
    return out


# ---------------------------------------------------------------------- the PCA, as `ahpa extract --project` fits it
def fit_moments(cfg, source, images: int, seed: int, progress: bool = False):
    """The moments of the PCA subset of ``cfg``'s training images, per VAE group: the first ``images`` of the seeded
    permutation :func:`~ahpa.data.projection.pca_subset` picks (``--pca-images``, ``--project-seed``)."""
    groups = list(vae_groups(cfg))
    if not groups:
        raise AhpaError("the run aligns to no VAE group; a projection applies to the VAE groups only")
    data = getattr(source, "data", None)
    if data is not None:  # in memory (the toy): the features the source computed once, same prior, same image order
        subset = torch.as_tensor(pca_subset(len(source.labels), images, seed))
        batches = ({g: data.features[g][chunk] for g in groups} for chunk in subset.split(256))
    elif cfg.data.source == "images":  # an image folder: the extractor's own loop
        dataset = ImageFolderDataset(cfg.data.path, cfg.data.resolution)
        batches = subset_features(dataset, pca_subset(len(dataset), images, seed), source.prior, 32, progress)
    else:
        raise AhpaError(f"the PCA needs the training images (data.source=toy or images), not data.source={cfg.data.source}; "
                        "pass the image folder's config with --config or data.source=images data.path=IMAGE_DIR")
    return group_moments(batches, groups, cfg.prior.normalize, cfg.prior.normalize_alpha)


def fit_projections(moments, ks: list[int]) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, dict[int, float]]]:
    """``{K: {group: P [K, C]}}`` and the explained variance ``{group: {K: value}}``; K above a group's width refused."""
    matrices: dict[int, dict[str, torch.Tensor]] = {k: {} for k in ks}
    explained: dict[str, dict[int, float]] = {}
    for g, moment in moments.sums.items():
        for k in ks:
            if k > moment.shape[0]:
                raise AhpaError(f"--k {k} exceeds the {moment.shape[0]} channels of group {g}; choose K <= {moment.shape[0]}")
            matrices[k][g], value = pca_from_moment(moment, k)
            explained.setdefault(g, {})[k] = value
    return matrices, explained


# ---------------------------------------------------------------------- command
def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise AhpaError(f"--k takes comma-separated integers, e.g. {DEFAULT_K}; got {text!r}") from None
    if not ks or ks[0] < 1:
        raise AhpaError(f"--k values must be at least 1, got {text!r}")
    return ks


def load_run(args) -> tuple:
    """(cfg, sit, objective, checkpoint or None) through the project's reader (:mod:`ahpa.runs`), or a config's
    fresh initialisation (seeded by ``train.seed``, the training run's step 0)."""
    if bool(args.ckpt) == bool(args.config):
        raise AhpaError("pass exactly one of --ckpt (a checkpoint or run directory) and --config (a fresh initialisation)")
    overrides = list(args.overrides or [])
    if args.ckpt:
        ckpt = checkpoint_dir(args.ckpt)
        cfg = read_config(ckpt, overrides)
        if cfg.align.method == "vanilla" and not args.explained_only:
            raise AhpaError("this checkpoint is vanilla SiT (no alignment objective): its alignment gradient is undefined; "
                            "pass --explained-only for the explained variance alone")
        if cfg.prior.project:
            raise AhpaError(f"this run trained on projected targets (prior.project={cfg.prior.project}); pass a run on the full features")
        if args.explained_only:
            return cfg, None, None, ckpt
        sit, _ = load_backbone(ckpt, args.weights)
        _, objective = load_objective(ckpt, cfg)
        return cfg, sit, objective, ckpt
    cfg = load_config(args.config, overrides)
    if cfg.prior.project:
        raise AhpaError(f"prior.project={cfg.prior.project}: measure the full features' run (drop prior.project)")
    if cfg.align.method == "vanilla" and not args.explained_only:
        raise AhpaError("this config trains no alignment objective (align.method=vanilla); pass --explained-only")
    return cfg, None, None, None  # the fresh initialisation is built once the data source gives the latent shape


def run_projection(args: argparse.Namespace) -> int:
    ks = _ks(args.k)
    cfg, sit, objective, ckpt = load_run(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ts = [] if args.explained_only else t_grid(args.num_t, args.t)
    if args.n < 1 or args.pca_images < 1:
        raise AhpaError(f"--n and --pca-images must be at least 1, got {args.n} and {args.pca_images}")
    if args.save_projection and args.save_projection not in ks:
        raise AhpaError(f"--save-projection {args.save_projection} is not one of --k {args.k}")
    src_cfg = source_config(cfg, set(cfg.prior.groups), args.n, args.seed)
    source = build_source(src_cfg, device=device, rank=0, world=1, per_rank=args.n)
    if sit is None and not args.explained_only:  # --config: the fresh initialisation, as training's step 0
        torch.manual_seed(cfg.train.seed)
        sit = build_backbone(cfg, source.latent_shape)
        objective = build_objective(cfg, sit, {g: source.group_shapes[g] for g in cfg.prior.groups})
    moments = fit_moments(src_cfg, source, args.pca_images, args.project_seed, progress=not args.quiet)
    matrices, explained = fit_projections(moments, ks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.save_projection:
        k = args.save_projection
        file = out / f"projection-pca{k}.safetensors"
        if file.exists():  # never replaced: a run may train on it; the same fit again is fine
            old = load_projection(file)
            if old.matrices.keys() != matrices[k].keys() or any(not torch.allclose(old.matrices[g], matrices[k][g], atol=1e-5) for g in old.matrices):
                raise AhpaError(f"{file} exists and holds another projection; remove it or choose another --out")
        save_projection(file, Projection(matrices[k], "pca", cfg.prior.normalize, cfg.prior.normalize_alpha,
                                         {g: explained[g][k] for g in explained}))
        print(f"wrote {file} (prior.project={file} trains on it on the fly)")
    records = []
    if ts:
        sit = sit.eval().to(device)
        objective = objective.eval().to(device)
        transport = build_transport(cfg)
        for i, t in enumerate(ts):
            batch = trajectory_batch(source, cfg, args.n, args.seed, i, t, device)
            with torch.no_grad():
                hidden = transport.training_losses(sit, batch["x0"], batch["y"], hidden_depths=tuple(objective.depths), t=batch["t"],
                                                   eps=batch["eps"], model_kwargs={"force_drop_ids": batch["drop"]})["hidden"]
            per_k = gradient_fidelity(objective, hidden, batch["features"], batch["t"], matrices)
            for k, v in per_k.items():
                records.append({"t": t, "k": k, "cos_mean": float(v["cos"].mean()), "cos_min": float(v["cos"].min()),
                                "cos_std": float(v["cos"].std()) if len(v["cos"]) > 1 else 0.0,
                                "norm_ratio": float(v["norm_ratio"].mean()), "target_kept": float(v["target_kept"].mean())})
    widths = {g: moments.sums[g].shape[0] for g in moments.sums}
    result = {"checkpoint": str(ckpt) if ckpt else None, "config": args.config, "weights": args.weights if ckpt else "fresh init",
              "model": cfg.model.name, "vae": cfg.vae.path, "normalize": cfg.prior.normalize, "channels": widths,
              "pca_images": args.pca_images, "project_seed": args.project_seed,
              "pca_tokens": moments.tokens, "n": args.n, "seed": args.seed, "t": ts, "k": ks,
              "explained_variance": {g: {str(k): v for k, v in e.items()} for g, e in explained.items()},
              "gradient": "cos(d/dh L(head(h), Y), d/dh L(P head(h), P Y)) per sample, mean over the batch per t",
              "records": records}
    write_json_atomic(out / "projection_fidelity.json", result, indent=1)
    print(format_tables(result))
    print(f"wrote {out / 'projection_fidelity.json'}")
    return 0


def format_tables(result: dict) -> str:
    ks = result["k"]
    lines = ["explained variance (top-K eigenvalues / trace):", f"{'group':<8}" + "".join(f"{'K=' + str(k):>9}" for k in ks)]
    for g, e in result["explained_variance"].items():
        lines.append(f"{g:<8}" + "".join(f"{e[str(k)]:>9.4f}" for k in ks))
    recs = result["records"]
    if recs:
        for key, label in (("cos_mean", "cos(g_full, g_K), mean over samples"), ("cos_min", "cos(g_full, g_K), worst sample"),
                           ("norm_ratio", "||g_K|| / ||g_full||, mean"), ("target_kept", "||P Y||^2 / ||Y||^2, mean")):
            lines += ["", f"{label}:", f"{'t':<8}" + "".join(f"{'K=' + str(k):>9}" for k in ks)]
            for t in result["t"]:
                row = {r["k"]: r[key] for r in recs if r["t"] == t}
                lines.append(f"{t:<8.3f}" + "".join(f"{row[k]:>9.4f}" if math.isfinite(row[k]) else f"{'nan':>9}" for k in ks))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="checkpoint directory (RUN/checkpoints/STEP) or run directory (its latest) of a run on the full features")
    p.add_argument("--config", help="instead of --ckpt: a config, measured at its fresh initialisation")
    p.add_argument("--out", required=True, help="output directory for projection_fidelity.json (and --save-projection's file)")
    p.add_argument("--k", default=DEFAULT_K, help=f"comma-separated K per group (default {DEFAULT_K}; the tiny VAE has 64 channels per group)")
    p.add_argument("--pca-images", type=int, default=1024, help="PCA subset size, as ahpa extract --pca-images (default 1024)")
    p.add_argument("--project-seed", type=int, default=0, help="PCA subset permutation, as ahpa extract --project-seed (default 0)")
    p.add_argument("--n", type=int, default=64, help="samples per t (default 64)")
    p.add_argument("--num-t", type=int, default=10, help="t grid: bin centres of (0, 1) (default 10)")
    p.add_argument("--t", help="explicit comma-separated t values instead of --num-t")
    p.add_argument("--weights", choices=("online", "ema"), default="online", help="SiT weights of the checkpoint (default: online, the trained ones)")
    p.add_argument("--explained-only", action="store_true", help="the explained variance alone (no model, no gradients)")
    p.add_argument("--save-projection", type=int, metavar="K", help="also write OUT/projection-pcaK.safetensors (K one of --k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value on the checkpoint's config")
