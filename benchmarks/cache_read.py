"""Can this disk keep a GPU fed?  Feature-cache reading through the training reader, against the rate a run needs.

For each cache (``--cache DIR``, repeatable; without it a synthetic one is written here by ``ahpa extract`` on a
generated image folder with the tiny VAE, and a projected one too when ``ahpa extract`` has ``--project``):

1. bytes per image from the cache manifest (shard bytes / items) and whether it is projected (its manifest's
   ``projection`` entry);
2. images/s and bytes/s read through the training reader (and again without the shards' checksums, ``verify="size"``,
   for the time ratio of verified reads): ``CacheDataset`` with training's arguments (float16,
   flips as stored, every stored group) and ``ahpa.data.batches._loader`` (training's DataLoader: persistent
   workers, prefetch 4, pinned memory on CUDA) over training's shard-windowed ``ResumableSampler``, for each
   worker count in ``--workers``.  Before each count the cache's pages are dropped from the page cache
   (``posix_fadvise(DONTNEED)`` on its shard files only; no root, nothing else evicted), so the reads come from
   the disk; ``--warm`` keeps them (the loader's CPU cost alone);
3. the rate a SiT-XL/2 run at the paper's speed needs (computed, not measured): 7.4 it/s (AHPA) to 8.1 it/s
   (vanilla) at global batch 256 (paper Table 6 / I.21, docs/training-cost.md) is 1,894-2,074 images/s whatever
   the number of GPUs, times this cache's bytes per image, and times an SD-VAE float16 G3+G4 cache's at 256 px
   (docs/scale.md, "Disk for the feature cache"); and the measured rate as a fraction of the need.

    python benchmarks/cache_read.py --cache /data/in256-cache --workers 1,2,4,8,16 --batches 50
    python benchmarks/cache_read.py                      # synthetic cache in a temporary folder (about a minute)
    python benchmarks/cache_read.py --images 64 --resolution 64 --workers 0,1 --batches 3 --batch 8   # seconds

Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ahpa.config import Config
from ahpa.data.batches import _loader
from ahpa.data.cache import CacheDataset, bytes_per_image, read_manifest
from ahpa.data.sampler import ResumableSampler

PAPER_IT_PER_S = {"ahpa": 7.4, "vanilla": 8.1}  # SiT-XL/2, precomputed features (paper Table 6 / I.21)
GLOBAL_BATCH = 256
SD_VAE_G3G4_SHAPES = {"G3": (4, 512), "G4": (4, 512)}  # SD-VAE 4/4 split (ahpa/priors/hierarchy.py)


def write_images(root: Path, n: int, resolution: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.png")
    return root


def extract_supports_projection() -> bool:
    text = subprocess.run([sys.executable, "-m", "ahpa.cli", "extract", "--help"], capture_output=True, text=True).stdout
    return "--project" in text


def ahpa_extract(images: Path, out: Path, resolution: int, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "ahpa.cli", "extract", str(images), "--out", str(out), "--vae", "tiny",
                    "--resolution", str(resolution), "--groups", "G3,G4", "--shard-size", "256", *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def cache_bytes_per_image(manifest: dict) -> float:
    return sum(s["bytes"] for s in manifest["shards"]) / sum(s["count"] for s in manifest["shards"])


def drop_from_page_cache(cache: Path, manifest: dict) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for shard in manifest["shards"]:
        fd = os.open(cache / shard["file"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_rate(cache: Path, workers: int, batch: int, batches: int, cold: bool, verify: str = "fast") -> dict:
    """Images/s through training's dataset, sampler and DataLoader with ``workers`` worker processes; ``verify``:
    ``"fast"`` (training's default: each shard's xxh3_64 checked at its first read) or ``"size"`` (no checksum)."""
    manifest = read_manifest(cache)
    dropped = drop_from_page_cache(cache, manifest) if cold else False
    cfg = Config()
    cfg.data.num_workers = workers
    dataset = CacheDataset(cache, flip=None, dtype=torch.float16, verify=verify)
    sampler = ResumableSampler(len(dataset), batch, seed=0, shard_sizes=dataset.shard_sizes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = iter(_loader(dataset, sampler, cfg, device))
    next(loader)  # worker start-up and the first shard opens are not reading speed
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(loader)["y"])
        except StopIteration:
            break
    seconds = time.perf_counter() - start
    del loader
    return {"workers": workers, "images": n, "seconds": seconds, "images_per_s": n / seconds, "from_disk": dropped}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", action="append", default=[], help="a feature cache directory (repeatable); none: a synthetic one")
    p.add_argument("--workers", default="1,2,4", help="comma-separated loader worker counts")
    p.add_argument("--batch", type=int, default=64, help="images per loader batch (one rank's share of the global batch)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--warm", action="store_true", help="keep the cache in the page cache (the loader's CPU cost, not the disk)")
    p.add_argument("--images", type=int, default=2048, help="synthetic cache: images")
    p.add_argument("--resolution", type=int, default=256, help="synthetic cache: image side")
    p.add_argument("--project", default="pca:64", help="synthetic cache: the projection of the projected copy, when supported")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        caches = [Path(c) for c in args.cache]
        notes = []
        if not caches:
            images = write_images(Path(tmp) / "images", args.images, args.resolution)
            caches.append(ahpa_extract(images, Path(tmp) / "full", args.resolution))
            if extract_supports_projection():
                caches.append(ahpa_extract(images, Path(tmp) / "projected", args.resolution, "--project", args.project))
            else:
                notes.append("projected: not measured (this ahpa extract has no --project)")
        needed_images = {k: v * GLOBAL_BATCH for k, v in PAPER_IT_PER_S.items()}
        sd_bytes = bytes_per_image("float16", SD_VAE_G3G4_SHAPES, 16, (4, 32, 32))
        results = []
        for cache in caches:
            manifest = read_manifest(cache)
            per_image = cache_bytes_per_image(manifest)
            rows = [read_rate(cache, w, args.batch, args.batches, not args.warm) for w in workers]
            for r, w in zip(rows, workers):  # the verified reads' cost (issue 19): the same reads without checksums
                plain = read_rate(cache, w, args.batch, args.batches, not args.warm, verify="size")
                r["images_per_s_without_checksums"] = plain["images_per_s"]
                r["checksum_time_ratio"] = plain["images_per_s"] / r["images_per_s"]
            for r in rows:
                r["bytes_per_s"] = r["images_per_s"] * per_image
                r["fraction_of_need_at_8_1_it_s"] = r["images_per_s"] / needed_images["vanilla"]
            results.append({"cache": str(cache), "projection": manifest.get("projection"), "count": manifest["count"],
                            "bytes_per_image": per_image, "rates": rows,
                            "needed_bytes_per_s": {k: v * per_image for k, v in needed_images.items()}})
            for r in rows:
                print(f"{cache.name}: {r['workers']} workers {r['images_per_s']:.0f} img/s, {r['bytes_per_s'] / 2**20:.0f} MiB/s "
                      f"({r['fraction_of_need_at_8_1_it_s']:.2f} of 2,074 img/s); time ratio with / without checksums "
                      f"{r['checksum_time_ratio']:.3f}", flush=True)
    result = {"caches": results, "needed_images_per_s": needed_images,
              "sd_vae_g3g4_float16_bytes_per_image_256px": sd_bytes,
              "sd_vae_g3g4_needed_gib_per_s": {k: v * sd_bytes / 2**30 for k, v in needed_images.items()}, "notes": notes}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
