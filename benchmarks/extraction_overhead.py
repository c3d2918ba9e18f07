"""Cost of the one-pass hierarchical extractor over a plain latent-only ``vae.encode``.

docs/design.md section 2: moments and features come from ONE encoder pass, so the only
extra work is the hooks' pooling and stacking.  Times both on the same batch of
the real SD-VAE architecture (random init), alternating runs, and prints
images/second and the ratio (target <= 1.10).

    python benchmarks/extraction_overhead.py                     # CPU: batch 2, 256 px
    python benchmarks/extraction_overhead.py --batch 64 --bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from diffusers import AutoencoderKL

from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior


def sd_vae(device: torch.device) -> AutoencoderKL:
    """sd-vae-ft-ema's architecture, randomly initialised (no weights needed)."""
    return AutoencoderKL(**SD_VAE_CONFIG).requires_grad_(False).eval().to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="G3,G4", help="comma-separated groups to extract")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--grid", type=int, default=None, help="token grid (default resolution / 16)")
    parser.add_argument("--split", default="4/4")
    parser.add_argument("--resample", default="area")
    parser.add_argument("--reps", type=int, default=4, help="timed runs of each, alternating")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = sd_vae(device)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    grid = args.grid or args.resolution // 16
    prior = HierarchicalVAEPrior(vae, groups=groups, grid=grid, split=args.split, resample=args.resample)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    @torch.no_grad()
    def plain() -> None:
        posterior = vae.encode(images).latent_dist
        posterior.mean.float(), posterior.std.float()

    def hierarchical() -> None:
        prior(images)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(plain), timed(hierarchical)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "hierarchical": []}
    for _ in range(args.reps):
        times["plain"].append(timed(plain))
        times["hierarchical"].append(timed(hierarchical))

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {args.batch}, {args.resolution} px, groups {','.join(groups)} "
          f"{prior.group_shapes}, grid {grid}, {args.resample}, bf16 {args.bf16}, {args.reps} reps")
    # Best-of-reps is the least noisy estimate on a shared machine; the median is shown beside it.
    best = {k: min(v) for k, v in times.items()}
    for k, t in best.items():
        median = statistics.median(times[k])
        print(f"  {k:<13} {args.batch / t:8.2f} images/s  (best {t * 1e3:.1f} ms/batch, median {median * 1e3:.1f} ms)")
    ratio = best["hierarchical"] / best["plain"]
    median_ratio = statistics.median(times["hierarchical"]) / statistics.median(times["plain"])
    verdict = "ok" if ratio <= 1.10 else "MISSED"
    print(f"  time ratio hierarchical / plain = {ratio:.3f} best, {median_ratio:.3f} median  (target <= 1.10: {verdict})")


if __name__ == "__main__":
    main()
