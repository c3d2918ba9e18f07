"""How predictable the alignment targets are, and from what (issue 13: the router's collapse).

Two measurements on a run config's data (features built exactly as training builds them):

- **Position predictability**: the mean cosine between a token's target and the mean
  target of its grid position over the data set.  Near 1 means a head scores well by
  predicting the position alone (information the backbone gets for free from its
  position embedding).
- **Probe predictability per t** (needs a checkpoint): the EMA SiT's hidden state of the
  aligned block at ``x_t = (1 - t) x_0 + t eps`` predicts each fixed target with a ridge
  regression per token (a linear head, fitted on 80% of the images, scored on the other
  20%): the mean cosine reached is ``-`` the alignment loss a (linear) head reaches for
  that target.  Targets: every single layer, every group's uniform mix, and the paper's
  concatenation ``[gamma_G3 A_G3, gamma_G4 A_G4]`` for a sweep of gamma: the router's
  objective as a function of its inter-group weight.

    python -m ahpa.diagnostics.predictability --config configs/toy-t1.yaml [--ckpt RUN/checkpoints/0000600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from ahpa.align.normalize import normalize_features
from ahpa.build import build_source
from ahpa.config import load_config
from ahpa.data.projection import target_normalization
from ahpa.errors import AhpaError
from ahpa.io import write_text_atomic
from ahpa.runs import load_backbone

T_GRID = (0.05, 0.25, 0.5, 0.75, 0.95)
GAMMA_SWEEP = (0.0, 0.5, 1.0, 1.5, 2.0)  # gamma of the deep group; the mid group gets K - gamma (K = 2)


def group_mix(features: torch.Tensor, normalize: str = "token") -> torch.Tensor:
    """Uniform mix of a group's normalised layers ``[N, L, C, h, w]`` -> ``[N, C, h, w]`` (Eq. 3, uniform alpha)."""
    return normalize_features(features, normalize).mean(1)


def position_predictability(target: torch.Tensor) -> float:
    """Mean over tokens and images of cos(target[n, :, i, j], mean_n target[:, :, i, j])."""
    mean = target.mean(0, keepdim=True)
    return float(F.cosine_similarity(target, mean.expand_as(target), dim=1).mean())


def targets_of(features: dict[str, torch.Tensor], normalize: str = "token") -> dict[str, torch.Tensor]:
    """Fixed targets: each layer ``G3/1``..., each group's uniform mix ``G3``..., and ``G3+G4`` (gamma = 1)."""
    out = {}
    for g, f in features.items():
        norm = normalize_features(f, normalize)
        for layer in range(norm.shape[1]):
            out[f"{g}/{layer + 1}"] = norm[:, layer]
        out[g] = norm.mean(1)
    if len(features) > 1:
        out["+".join(features)] = torch.cat([out[g] for g in features], dim=1)
    return out


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N * h * w, C]``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares weights ``[D + 1, C]`` (last row: bias) of ``y ~ x``, ridge relative to the mean feature variance."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = x1.T @ x1
    reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=x.dtype)
    reg[-1, -1] = 0
    return torch.linalg.solve(gram + reg, x1.T @ y)


def probe_predictability(hidden: torch.Tensor, features: dict[str, torch.Tensor], normalize: str = "token",
                         train_frac: float = 0.8) -> dict[str, float]:
    """Held-out mean cosine of a linear per-token probe from ``hidden [N, D, h, w]`` to every fixed target,
    plus ``position``: the per-position mean of the training images as the prediction (no hidden state),
    and ``sweep/<gamma>``: the concatenated target with the deep group at gamma, the mid at 2 - gamma."""
    targets = targets_of(features, normalize)
    n = hidden.shape[0]
    cut = int(n * train_frac)
    if cut < 2 or n - cut < 1:
        raise AhpaError(f"the probe needs at least 3 images, got {n}")
    layers = [k for k in targets if "/" in k]
    y_all = torch.cat([targets[k] for k in layers], 1).double()  # every layer; mixes are linear in them
    w = ridge_fit(_tokens(hidden[:cut].double()), _tokens(y_all[:cut]))
    x_test = _tokens(hidden[cut:].double())
    pred_all = torch.cat([x_test, torch.ones(len(x_test), 1, dtype=x_test.dtype)], 1) @ w
    pred = dict(zip(layers, pred_all.split([targets[k].shape[1] for k in layers], dim=1)))
    groups = list(features)
    for g in groups:
        pred[g] = torch.stack([pred[k] for k in layers if k.startswith(g + "/")]).mean(0)
    out = {}
    for name, target in targets.items():
        p = torch.cat([pred[g] for g in groups], 1) if "+" in name else pred[name]
        out[name] = float(F.cosine_similarity(p, _tokens(target[cut:].double()), dim=1).mean())
    joint = "+".join(groups)
    if len(groups) == 2:
        mid, deep = sorted(groups)
        for gamma in GAMMA_SWEEP:
            scale = {mid: 2.0 - gamma, deep: gamma}
            # the best prediction of a rescaled target is the rescaled prediction: refit is not needed
            p = torch.cat([scale[g] * pred[g] for g in groups], 1)
            y = torch.cat([scale[g] * _tokens(targets[g][cut:].double()) for g in groups], 1)
            out[f"sweep/{deep}={gamma}"] = float(F.cosine_similarity(p, y, dim=1).mean())
    mean = targets[joint][:cut].double().mean(0, keepdim=True)
    out["position"] = float(F.cosine_similarity(mean.expand_as(targets[joint][cut:]).double(), targets[joint][cut:].double(), dim=1).mean())
    return out


def config_features(cfg, max_images: int | None = None):
    """(latents x0 mean ``[N, C, H, W]``, labels, features ``{g: [N, L, C, h, w]}``, latent scale) of a run config's data."""
    if cfg.data.source != "toy":
        raise AhpaError("the predictability measurement reads the in-memory toy set (data.source=toy)")
    source = build_source(cfg, device="cpu", rank=0, world=1, per_rank=cfg.train.global_batch)
    data = source.data
    n = len(source.labels) if max_images is None else min(max_images, len(source.labels))
    feats = {g: f[:n].float() for g, f in data.features.items()}
    x0 = source.sample_latent({"latent_mean": data.latent_mean[:n], "latent_std": data.latent_std[:n]}, torch.zeros_like(data.latent_mean[:n]))
    return x0, source.labels[:n], feats


@torch.no_grad()
def hidden_states(model, x0: torch.Tensor, y: torch.Tensor, t: float, depth: int, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """The SiT's hidden state after block ``depth`` at ``x_t``, as ``[N, D, grid, grid]``."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    out = []
    for xb, eb, yb in zip(x0.split(batch), eps.split(batch), y.split(batch)):
        xt = (1 - t) * xb + t * eb  # REPA convention, t = 0 data
        tt = torch.full((len(xb),), float(t))
        res = model(xt, tt, yb, hidden_depths=(depth,), force_drop_ids=torch.zeros(len(xb), dtype=torch.bool))
        h = res[1][depth] if isinstance(res, tuple) else res["hidden"][depth]
        out.append(h.transpose(1, 2).reshape(len(xb), h.shape[2], model.grid, model.grid))
    return torch.cat(out)


def measure(config: str, overrides: list[str], ckpt: str | None = None, max_images: int = 800, t_grid=T_GRID) -> dict:
    cfg = load_config(config, overrides)
    x0, y, feats = config_features(cfg, None)
    targets = targets_of(feats, target_normalization(cfg))
    result = {"config": config, "overrides": overrides, "model": cfg.model.name, "normalize": target_normalization(cfg),
              "grid": int(next(iter(feats.values())).shape[-1]), "images": len(y),
              "position": {k: position_predictability(v) for k, v in targets.items()}}
    if ckpt:
        model = load_backbone(ckpt)[0].eval()  # EMA weights
        depth = list(cfg.align.depths)[0] if cfg.align.depths else model.default_alignment_depth
        n = min(max_images, len(y))
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
        result["probe"] = {"ckpt": ckpt, "depth": depth, "images": n, "per_t": {}}
        for t in t_grid:
            h = hidden_states(model, x0[perm], y[perm], t, depth)
            result["probe"]["per_t"][str(t)] = probe_predictability(h, {g: f[perm] for g, f in feats.items()}, target_normalization(cfg))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ahpa.diagnostics.predictability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (data.source=toy)")
    parser.add_argument("--ckpt", help="checkpoint dir for the probe per t (EMA weights)")
    parser.add_argument("--images", type=int, default=800, help="images for the probe (80%% fit, 20%% scored)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        result = measure(args.config, args.overrides, args.ckpt, args.images)
    except AhpaError as err:
        print(f"predictability: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
