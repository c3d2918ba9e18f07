"""The offline toy set: scikit-learn's handwritten digits as 10-class RGB images.

``sklearn.datasets.load_digits`` ships inside the scikit-learn wheel (1797 real
8x8 scans, 10 classes, grey levels 0..16), so ``ahpa demo`` and the tests need
no download.  Each digit is drawn white on black (the MNIST convention: ink is
the signal, the background is zero), its grey levels are mapped linearly to
0..255 and it is upsampled with bicubic interpolation to ``resolution`` (smooth
strokes instead of 4x4 blocks), then repeated over three channels so that it
passes through the same RGB pipeline as ImageNet.

The held-out split is fixed and needs no seed: within each class, in the order
sklearn stores the digits, every tenth digit (positions 0, 10, 20, ...) is
held out; the other 90% are the training split.  It is stratified, disjoint
from train, and identical on every machine and library version.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ahpa.errors import AhpaError
from ahpa.evaluation.npz import save_npz_atomic
from ahpa.io import atomic_dir

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10  # one digit in ten per class is held out (10%)
MAX_GREY = 16.0  # load_digits grey levels are 0..16


def _check(split: str, resolution: int) -> None:
    if split not in SPLITS:
        raise AhpaError(f"unknown toy split {split!r}; use one of {', '.join(SPLITS)}")
    if resolution < 8:
        raise AhpaError(f"toy resolution {resolution} is below the digits' native 8x8; use 8 or more (32 is the default)")


def heldout_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the held-out digits: every tenth one within each class."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[::HELDOUT_EVERY]] = True
    return mask


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # scikit-learn: slow to import, only its bundled digits are read

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def load_toy(split: str = "train", resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 [N, 3, R, R], labels long [N])`` of one toy split."""
    _check(split, resolution)
    grey, labels = _digits()
    keep = heldout_mask(labels) == (split == "heldout")
    x = torch.from_numpy(grey[keep])[:, None] * (255.0 / MAX_GREY)  # [N, 1, 8, 8] in 0..255
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(labels[keep])


class ToyDataset(Dataset):
    """The toy split as a dataset; items match ``ImageFolderDataset``'s."""

    def __init__(self, split: str = "train", resolution: int = 32) -> None:
        self.images, self.labels = load_toy(split, resolution)
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "y": self.labels[index]}


def write_image_folder(root: str | os.PathLike, split: str = "train", resolution: int = 32) -> Path:
    """Export a split as an ImageNet-layout folder: ``root/<class>/<index>.png``."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise AhpaError(f"{root} already exists and is not empty; remove it or choose another folder")
    images, labels = load_toy(split, resolution)
    with atomic_dir(root) as tmp:  # an existing root is empty (checked above) and gets replaced
        for i, (image, y) in enumerate(zip(images, labels.tolist())):
            class_dir = tmp / f"{y}"
            class_dir.mkdir(exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(class_dir / f"{i:05d}.png")
    return root


def toy_reference_npz(path: str | os.PathLike, split: str = "heldout", resolution: int = 32) -> Path:
    """Write a split as an ADM-style reference batch (``arr_0``: uint8 NHWC)."""
    images, _ = load_toy(split, resolution)
    save_npz_atomic(path, images.permute(0, 2, 3, 1).numpy())
    return Path(path)
