"""``ahpa diagnose features``: the hierarchical VAE features as pictures (paper Fig. 4, Sec. 4.2).

For a few images (the toy digits by default, or an image folder), every
selected encoder layer's feature map, pooled to the token grid exactly as the
alignment target is (``HierarchicalVAEPrior``), is projected on its first three
principal components; the three scores, min-max scaled over all images, are the
RGB channels.  One row per image, one column per layer, group boundaries marked.
PCA is fitted per layer on the tokens of all shown images together, so colours
are comparable along a column; the sign of each component is fixed (largest
loading positive), so reruns give the same colours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ahpa.build import build_prior, build_vae, latent_geometry
from ahpa.config import load_config
from ahpa.data.images import EXTENSIONS, ImageDecodeError, decode_image
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.io import atomic_open, write_json_atomic
from ahpa.priors.hierarchy import GROUPS, grouped_layers
from ahpa.runs import checkpoint_dir, read_config


def pca_rgb(features: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """``[B, C, H, W]`` -> (``[B, H, W, 3]`` in [0, 1], explained-variance ratio of the 3 components)."""
    B, C, H, W = features.shape
    x = features.permute(0, 2, 3, 1).reshape(-1, C).double()
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(3, vh.shape[0])
    comps = vh[:k]
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))  # deterministic signs
    scores = x @ comps.T
    if k < 3:
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 3 - k)], 1)
    lo, hi = scores.min(0).values, scores.max(0).values
    rgb = (scores - lo) / (hi - lo).clamp_min(1e-12)
    var = s.pow(2)
    ratio = (var[:k] / var.sum().clamp_min(1e-30)).tolist()
    return rgb.reshape(B, H, W, 3).float(), ratio


def _images(args, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 ``[N, 3, R, R]`` and one label per image."""
    if args.images:
        root = Path(args.images)
        if not root.is_dir():
            raise AhpaError(f"--images {root} is not a folder of images")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)[: args.num]
        if not files:
            raise AhpaError(f"--images {root} holds no image files ({', '.join(sorted(EXTENSIONS))})")
        arrays = []
        for f in files:
            try:
                arr, _, _ = decode_image(str(f), resolution)
            except ImageDecodeError as err:
                raise AhpaError(f"cannot decode {f}: {err}") from None
            arrays.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        return torch.stack(arrays), [f.name for f in files]

    images, labels = load_toy("heldout", resolution=resolution)
    picks = [int((labels == c).nonzero()[0]) for c in range(int(labels.max()) + 1)][: args.num]  # one per class
    return images[picks], [f"digit {int(labels[i])}" for i in picks]


def run_features(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise AhpaError(f"--num must be at least 1, got {args.num}")
    if args.ckpt:
        cfg = read_config(checkpoint_dir(args.ckpt), list(args.overrides))
    else:
        cfg = load_config(args.config, list(args.overrides))
    vae = build_vae(cfg)
    available = grouped_layers(vae, cfg.prior.grouping, cfg.prior.split)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else [g for g in GROUPS if g in available]
    grid = args.grid or latent_geometry(cfg, vae)[1]
    if grid < 1:
        raise AhpaError(f"--grid must be at least 1, got {grid}")
    prior = build_prior(cfg, vae, grid, groups)  # refuses unknown groups with one line
    images, names = _images(args, cfg.data.resolution)
    with torch.no_grad():
        feats = prior(images.float() / 127.5 - 1.0).features
    columns = [(g, i, layer.path) for g in prior.layers for i, layer in enumerate(prior.layers[g])]
    n = len(images)
    fig = Figure(figsize=(1.3 * (len(columns) + 1), 1.35 * n + 0.9))
    axes = fig.subplots(n, len(columns) + 1, squeeze=False)
    info = {"config": args.ckpt or args.config, "vae": cfg.vae.path, "grid": grid, "images": names, "layers": []}
    for r in range(n):
        axes[r][0].imshow(images[r].permute(1, 2, 0).numpy())
        axes[r][0].set_ylabel(names[r], fontsize=7)
    axes[0][0].set_title("image", fontsize=8)
    for c, (g, i, path) in enumerate(columns, start=1):
        rgb, ratio = pca_rgb(feats[g][:, i])
        info["layers"].append({"group": g, "layer": i + 1, "module": path, "channels": feats[g].shape[2],
                               "explained_variance_ratio": ratio})
        for r in range(n):
            axes[r][c].imshow(rgb[r].numpy(), interpolation="nearest")
        axes[0][c].set_title(f"{g} L{i + 1}", fontsize=8, color=f"C{GROUPS.index(g)}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    # group boundaries: a vertical rule between the last column of a group and the first of the next
    for c in range(1, len(columns) + 1):
        if c == 1 or columns[c - 1][0] != columns[c - 2][0]:
            x = axes[0][c].get_position().x0 - 0.004
            fig.add_artist(Line2D([x, x], [0.01, 0.95], color="k", lw=1.5, transform=fig.transFigure))
    fig.suptitle(f"PCA (3 components as RGB) of pooled VAE features, {grid}x{grid} token grid", fontsize=9)
    out = Path(args.out)
    with atomic_open(out / "features.png") as fh:
        fig.savefig(fh, format="png", dpi=120)
    write_json_atomic(out / "features.json", info, indent=1)
    print(f"wrote {out / 'features.png'}, {out / 'features.json'} ({n} images x {len(columns)} layers)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory for features.png and features.json")
    p.add_argument("--ckpt", help="take the VAE and prior settings from this checkpoint's config")
    p.add_argument("--config", default="configs/toy.yaml", help="or from this config (default configs/toy.yaml)")
    p.add_argument("--images", help="folder of images (default: one toy digit per class)")
    p.add_argument("--num", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--groups", help="comma-separated groups (default: all the encoder has, G1..G4)")
    p.add_argument("--grid", type=int, default=0, help="pooling grid side (default: the model's token grid)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. vae.path=/path/to/vae")
