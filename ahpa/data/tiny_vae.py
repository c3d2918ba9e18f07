"""The project's own tiny ``AutoencoderKL``, trained on the toy digits.

It mirrors SD-VAE's layout (docs/design.md section 2): ``DownEncoderBlock2D`` stages with
two resnets each, a mid block with attention, four latent channels; but three
narrow stages instead of four wide ones, so a 32x32 image becomes a 4x8x8
latent (two downsamplers) and the weights fit in about 2.6 MB of float16.  The
same hierarchy code (layer groups, hooks, pooling) runs on it offline.

Training is a beta-VAE: L1 reconstruction plus a small KL term, AdamW with a
cosine learning-rate decay.  Afterwards ``scaling_factor`` = 1 / std of latents
sampled from the posterior over the training split is written into the config,
so ``vae.config.scaling_factor`` is right for diffusion, and the reconstruction
PSNR on the held-out split is recorded in ``training.json``.  The committed
``ahpa/assets/tiny_vae/`` came from ``OMP_NUM_THREADS=1 ahpa train-vae --out
ahpa/assets/tiny_vae`` with the defaults below (7 minutes on one shared CPU core;
on a busy machine one thread avoids OpenMP oversubscription, which was 10x slower).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.evaluation.npz import to_uint8
from ahpa.io import atomic_dir, check_output_dir

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vae"
RESOLUTION = 32
# Hyper-parameters that produced the committed weights (``ahpa train-vae`` defaults).
DEFAULTS = {"steps": 2000, "batch": 16, "lr": 2e-3, "seed": 0, "kl_weight": 1e-2}


def tiny_vae_config(scaling_factor: float = 1.0) -> dict:
    """A diffusers ``AutoencoderKL`` config: 3x32x32 image -> 4x8x8 latent."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": RESOLUTION,
        "scaling_factor": scaling_factor,
    }


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> float:
    """PSNR (dB) of posterior-mean reconstructions, on uint8 images, over the whole set."""
    sq_err, count = 0.0, 0
    for chunk in images.split(batch):
        recon = vae.decode(vae.encode(_to_unit(chunk)).latent_dist.mode()).sample
        diff = torch.from_numpy(to_uint8(recon)).double() - chunk.permute(0, 2, 3, 1).double()
        sq_err += diff.square().sum().item()
        count += diff.numel()
    return 10.0 * math.log10(255.0**2 / (sq_err / count))


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0, batch: int = 256) -> dict[str, float]:
    """Mean/std of posterior samples (unscaled) and the mean KL per latent element, in nats."""
    generator = torch.Generator().manual_seed(seed)
    latents, kl = [], 0.0
    for chunk in images.split(batch):
        posterior = vae.encode(_to_unit(chunk)).latent_dist
        latents.append(posterior.sample(generator))
        kl += posterior.kl().sum().item()
    z = torch.cat(latents)
    return {"mean": z.mean().item(), "std": z.std().item(), "kl": kl / z.numel()}


def previous_output(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds what ``ahpa train-vae`` writes (and nothing else), so replacing it loses nothing."""
    names = {p.name for p in out_dir.iterdir()}
    try:
        record = json.loads((out_dir / "training.json").read_text())
    except (OSError, ValueError):
        return False
    ours = {"config.json", "diffusion_pytorch_model.safetensors", "training.json"}
    return names <= ours and isinstance(record, dict) and str(record.get("command", "")).startswith("ahpa train-vae")


def check_vae_out(out_dir: str | os.PathLike) -> Path:
    """Refuse, before training, an ``--out`` that is a file, unwritable, or a non-empty directory
    that is not a previous train-vae output (the atomic swap would delete its contents)."""
    out_dir = check_output_dir(out_dir, "--out", need_bytes=16 * 2**20)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not previous_output(out_dir):
        raise AhpaError(f"--out {out_dir} is a non-empty directory that is not a previous `ahpa train-vae` output; "
                        "it would be replaced: choose a new or empty directory")
    return out_dir


def _save_atomic(vae: AutoencoderKL, out_dir: Path, record: dict) -> None:
    """Save weights, config and training.json into a temp dir, then rename it into place."""
    with atomic_dir(out_dir, overwrite=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        for path in tmp.iterdir():  # fixed modes for the committed asset, whatever the umask
            path.chmod(0o644)
        tmp.chmod(0o755)


def train_tiny_vae(
    out_dir: str | os.PathLike,
    steps: int = DEFAULTS["steps"],
    batch: int = DEFAULTS["batch"],
    lr: float = DEFAULTS["lr"],
    seed: int = DEFAULTS["seed"],
    kl_weight: float = DEFAULTS["kl_weight"],
    warmup: int = 50,
    progress: bool = True,
) -> dict:
    """Train the tiny VAE on the toy train split and save it (float16) to ``out_dir``.

    Loss per step: mean |x - x_hat| + kl_weight * (KL per latent element), on
    images in [-1, 1] with posterior samples.  Returns the ``training.json`` record.
    """
    if steps < 1 or batch < 1 or lr <= 0 or kl_weight < 0:
        raise AhpaError(f"train-vae needs steps >= 1, batch >= 1, lr > 0, kl_weight >= 0 (got {steps}, {batch}, {lr}, {kl_weight})")
    if not all(math.isfinite(v) for v in (lr, kl_weight)) or warmup < 1:
        raise AhpaError(f"train-vae needs finite --lr and --kl-weight and warmup >= 1 (got {lr}, {kl_weight}, {warmup})")
    check_vae_out(out_dir)
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, _ = load_toy("train", RESOLUTION)
    heldout_images, _ = load_toy("heldout", RESOLUTION)
    data = _to_unit(train_images)

    vae = AutoencoderKL.from_config(tiny_vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    # Linear warm-up, then cosine decay to zero over the remaining steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc="train-vae", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(data), generator=generator)])
        x, order = data[order[:batch]], order[batch:]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.3f}")

    vae = vae.half().float().eval()  # measure exactly the float16 weights that are saved
    stats = latent_statistics(vae, train_images, seed=seed)
    vae.register_to_config(scaling_factor=1.0 / stats["std"])
    record = {
        "command": "ahpa train-vae " + " ".join(
            [f"--out {out_dir}", f"--steps {steps}", f"--batch {batch}", f"--lr {lr}", f"--seed {seed}", f"--kl-weight {kl_weight}"]
        ),
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "kl_weight": kl_weight,
        "heldout_psnr_db": round(reconstruction_psnr(vae, heldout_images), 3),
        "kl_per_latent_element_nats": round(stats["kl"], 4),
        "latent_mean": round(stats["mean"], 4),
        "latent_std": round(stats["std"], 4),
        "scaling_factor": vae.config.scaling_factor,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),  # CPU results depend on it slightly
        "dtype": "float16",
        "wall_time_s": round(time.time() - start, 1),
    }
    check_vae_out(out_dir)  # again: the directory may have been filled while training
    _save_atomic(vae.half(), Path(out_dir), record)
    return record


def run(args: argparse.Namespace) -> int:
    record = train_tiny_vae(args.out, args.steps, args.batch, args.lr, args.seed, args.kl_weight)
    print(json.dumps(record, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-vae",
        help="train the tiny AutoencoderKL on the toy digits (CPU, about 10 minutes)",
        description="Train the project's tiny AutoencoderKL (3x32x32 -> 4x8x8) on the toy train split. "
        "The defaults reproduce ahpa/assets/tiny_vae/.",
    )
    parser.add_argument("--out", required=True, help="output directory (diffusers format; replaced atomically)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--kl-weight", type=float, default=DEFAULTS["kl_weight"], help="beta of the KL term (per latent element)")
    parser.set_defaults(func=run)
