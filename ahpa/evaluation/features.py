"""Streamed Inception features of an ``.npz`` image batch, cached on disk.

Images are read in uint8 batches (never the whole array as float); features go
straight into ``.npy`` files opened as memory maps.  The cache entry is keyed by
the sha256 of the images in the ``.npz`` and the hash of the Inception weights, and
appears atomically (a temporary directory renamed into place), so an
interrupted run leaves nothing that a later run would trust.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ahpa.evaluation.inception import InceptionFeatures
from ahpa.evaluation.npz import NpzImages
from ahpa.io import atomic_dir, remove_stale_temps

FEATURE_DIMS = {"pool": 2048, "spatial": 2023, "logits": 1008}
# Bump when what a feature means changes (layer, flatten order, resize): old cache entries are then ignored.
FEATURES_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ahpa/inception-features`` (``~/.cache/...`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ahpa" / "inception-features"


def images_sha256(images: NpzImages, batch_size: int = 256) -> str:
    """sha256 of the image array (shape and pixels), so labels or statistics stored beside it do not matter."""
    digest = hashlib.sha256(repr(images.shape).encode())
    for batch in images.batches(batch_size):
        digest.update(batch.tobytes())
    return digest.hexdigest()


def extract_features(
    images: NpzImages, extractor: InceptionFeatures, out_dir: Path, batch_size: int = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """Run ``extractor`` over all images, writing ``<kind>.npy`` files into ``out_dir``."""
    kinds = [k for k in FEATURE_DIMS if k != "logits" or extractor.has_logits]
    arrays = {
        k: np.lib.format.open_memmap(out_dir / f"{k}.npy", mode="w+", dtype=np.float32, shape=(len(images), FEATURE_DIMS[k])) for k in kinds
    }
    start = 0
    with tqdm(total=len(images), unit="img", desc=f"Inception features {images.path.name}", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            pixels = torch.from_numpy(batch).to(extractor.device).permute(0, 3, 1, 2)  # NHWC -> NCHW, still uint8
            outputs = extractor(pixels)
            for k in kinds:
                arrays[k][start : start + len(batch)] = outputs[k].cpu().numpy()
            start += len(batch)
            bar.update(len(batch))
    for array in arrays.values():
        array.flush()
    return arrays


class _entry_lock:
    """Blocking exclusive flock on ``CACHE/.<entry>.lock``: a second evaluator of the same file waits, then reuses."""

    def __init__(self, cache_dir: Path, name: str):
        self.path = cache_dir / f".{name}.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: one writer is assumed (as before)
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # the lock file stays: unlinking it could let two writers in


def cached_features(
    images: NpzImages, extractor: InceptionFeatures, cache_dir: Path | None = None, batch_size: int = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """Features of ``images`` (read-only memory maps), computed once per file content and weights."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cache_dir / f"{images_sha256(images)[:24]}-{extractor.weights_id}-v{FEATURES_VERSION}"
    if not (entry / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _entry_lock(cache_dir, entry.name):  # one writer per entry: its stale temporaries can go
            if not (entry / "meta.json").is_file():
                remove_stale_temps(entry)  # a partial entry of a killed run
                with atomic_dir(entry, overwrite=entry.exists()) as tmp:
                    extract_features(images, extractor, tmp, batch_size, progress)
                    meta = {"file": str(images.path), "shape": list(images.shape), "weights": extractor.source}
                    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(entry.glob("*.npy"))}
