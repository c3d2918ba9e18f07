"""Feature-cache loader throughput vs. what training consumes, and cache sizes.

1. Bytes per image for each storage option (float16 / bfloat16 / int8 x
   latents only / G3+G4 / all groups, SD-VAE 4/4 split, /2 token grid) at 256
   and 512 px, and the ImageNet-1k total (the README table).
2. Builds a cache of ``--images`` images with the real writer (``extract_cache``)
   and a stand-in prior that returns random tensors of SD-VAE's shapes (the
   encoder is not what is measured here), then reads it memory-mapped in random
   order through a ``DataLoader`` (default collate) with 0 and ``--workers``
   worker processes.
3. Times a SiT-B/2 training step (forward + backward + AdamW) at
   ``--train-batch`` on this machine (CUDA when present) and prints
   loader samples/s divided by training samples/s.  SiT-XL/2 is scaled from it
   by the parameter ratio unless ``--xl-rate`` gives a measured rate.

The cache is freshly written, so reads come from the page cache: this is the
loader's CPU cost (decode of safetensors slices, dequantisation, collation),
not the disk's.  Run: ``python benchmarks/cache_throughput.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import DataLoader

from ahpa.data.cache import CacheDataset, bytes_per_image
from ahpa.data.extract import extract_cache
from ahpa.data.sampler import ResumableSampler
from ahpa.models.sit import build_sit, count_parameters
from ahpa.priors.base import PriorOutput
from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior

IMAGENET_TRAIN = 1_281_167


def sd_vae_group_shapes() -> dict[str, tuple[int, int]]:
    """(layers, channels) per group of SD-VAE's encoder (4/4 split), from a randomly initialised copy."""
    with torch.device("meta"):  # shapes only
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return HierarchicalVAEPrior(vae, groups=("G1", "G2", "G3", "G4"), grouping="sd_vae").group_shapes


def size_table(shapes: dict[str, tuple[int, int]]) -> None:
    options = {"latents only": (), "G3+G4": ("G3", "G4"), "all groups": ("G1", "G2", "G3", "G4")}
    print("bytes per image (SD-VAE, 4/4 split, /2 token grid; latents float16, bfloat16 for the bfloat16 cache)")
    print(f"{'dtype':<9} {'features':<13} {'256 px':>12} {'ImageNet':>10} {'512 px':>12} {'ImageNet':>10}")
    for dtype in ("float16", "bfloat16", "int8"):
        for name, groups in options.items():
            row = f"{dtype:<9} {name:<13}"
            for res in (256, 512):
                b = bytes_per_image(dtype, {g: shapes[g] for g in groups}, res // 16, (4, res // 8, res // 8))
                row += f" {b / 2**20:>8.3f} MiB {b * IMAGENET_TRAIN / 2**40:>6.2f} TiB"
            print(row)


class RandomPrior:
    """Stands in for HierarchicalVAEPrior with SD-VAE's output shapes (random values, no encoder)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], resolution: int):
        self.grid, self.latent = resolution // 16, resolution // 8
        self.group_shapes = shapes
        self.vae = SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(latent_channels=4, block_out_channels=(1, 1, 1, 1)))
        self.generator = torch.Generator().manual_seed(0)

    def describe(self) -> dict:
        return {"encoder_hash": "random", "groups": list(self.group_shapes), "grid": self.grid}

    def __call__(self, x: torch.Tensor) -> PriorOutput:
        b, g = x.shape[0], self.generator
        return PriorOutput(
            torch.randn(b, 4, self.latent, self.latent, generator=g),
            torch.rand(b, 4, self.latent, self.latent, generator=g) * 0.1,
            {k: torch.randn(b, l, c, self.grid, self.grid, generator=g) for k, (l, c) in self.group_shapes.items()},
        )


def build_cache(root: Path, n: int, resolution: int, dtype: str, shapes: dict) -> Path:
    images = root / "images" / "class0"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, resolution, dtype=np.float32)
    for i in range(n):
        arr = (base[None, :, None] + rng.normal(0, 20, (resolution, resolution, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / f"{i:05d}.jpg", quality=90)
    out = root / "cache"
    start = time.perf_counter()
    extract_cache(root / "images", out, RandomPrior(shapes, resolution), resolution, dtype=dtype, shard_size=128, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (out / "shards").iterdir())
    print(f"wrote {n} images ({size / 2**20:.0f} MiB) in {seconds:.1f} s: {n / seconds:.0f} img/s through decode + writer (no encoder)")
    return out


def loader_rate(cache: Path, batch: int, workers: int, batches: int, windowed: bool, dtype: torch.dtype) -> float:
    dataset = CacheDataset(cache, dtype=dtype)
    sampler = ResumableSampler(len(dataset), batch, seed=0, shard_sizes=dataset.shard_sizes if windowed else None)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    for _ in range(2):  # warm-up: worker start, first shard opens
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def train_rate(name: str, resolution: int, batch: int, device: torch.device, steps: int = 2) -> tuple[float, int]:
    model = build_sit(name, input_size=resolution // 8).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        t = torch.rand(batch, device=device)
        v = model(x, t, y)
        loss = (v - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start), count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=384, help="images in the benchmark cache")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "int8"))
    parser.add_argument("--batch", type=int, default=32, help="loader batch per rank")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second measurement")
    parser.add_argument("--train-batch", type=int, default=0, help="SiT-B/2 batch for the step timing (default: 2 on CPU, 256 on CUDA)")
    parser.add_argument("--b-rate", type=float, default=0.0, help="measured SiT-B/2 training samples/s per device (skips the timing)")
    parser.add_argument("--xl-rate", type=float, default=0.0, help="measured SiT-XL/2 training samples/s per device, if known")
    parser.add_argument("--dir", default=None, help="where to build the cache (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default; 1 on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    shapes = sd_vae_group_shapes()
    size_table(shapes)
    print()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = build_cache(Path(tmp), args.images, args.resolution, args.dtype, {g: shapes[g] for g in ("G3", "G4")})
        rates = {}
        for workers in sorted({0, args.workers}):
            for windowed in (False, True):
                for out_dtype in (torch.float32, torch.float16):
                    rate = loader_rate(cache, args.batch, workers, args.batches, windowed, out_dtype)
                    rates[(workers, windowed, out_dtype)] = rate
                    order = "shard windows" if windowed else "full random"
                    print(
                        f"loader: {args.dtype} G3+G4 @{args.resolution}px -> {str(out_dtype)[6:]}, batch {args.batch}, "
                        f"{workers} workers, {order}: {rate:.0f} samples/s"
                    )
    best = max(rates.values())

    print()
    if args.b_rate:
        b_rate, b_params, source = args.b_rate, 130_000_000, "given"
    else:
        batch = args.train_batch or (256 if device.type == "cuda" else 2)
        b_rate, b_params = train_rate("SiT-B/2", args.resolution, batch, device)
        source = f"measured on {device.type}, batch {batch}, fp32, no alignment branch"
    print(f"SiT-B/2 training: {b_rate:.2f} samples/s ({source})")
    xl_rate = args.xl_rate or b_rate * b_params / 675_000_000
    source = "given" if args.xl_rate else f"B/2 scaled by parameters ({b_params / 1e6:.0f}M / 675M)"
    print(f"SiT-XL/2 training: {xl_rate:.2f} samples/s ({source})")
    per_image = bytes_per_image(args.dtype, {g: shapes[g] for g in ("G3", "G4")}, args.resolution // 16, (4, args.resolution // 8, args.resolution // 8))
    for name, rate in (("SiT-B/2", b_rate), ("SiT-XL/2", xl_rate)):
        print(
            f"ratio loader / training, {name}: {best / rate:.1f}x (best loader setting, one process); "
            f"a cache larger than RAM must then stream {rate * per_image / 2**20:.1f} MiB/s per device from disk"
        )


if __name__ == "__main__":
    main()
