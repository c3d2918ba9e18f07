"""REPA's preprocessed data as a training source: latents from its ``.npy`` files, features on the fly.

The layout (docs/baselines.md, "REPA's preprocessed data"), under one folder ``DATA``:

- ``DATA/images/``: the centre-cropped training images as PNGs (``00000/img00000000.png``, a folder per
  thousand images), plus a ``dataset.json`` this source does not read;
- ``DATA/vae-sd/``: one float32 ``.npy`` per image (``00000/img-mean-std-00000000.npy``) holding the VAE
  posterior's mean and standard deviation concatenated on the channel axis, ``[2C, h, w]`` (8 x 32 x 32 for
  SD-VAE at 256 px; the std is already ``exp(logvar / 2)``, not the log-variance);
- ``DATA/vae-sd/dataset.json``: ``{"labels": [[npy path relative to vae-sd, class], ...]}``.

Images and ``.npy`` files are paired by sorted relative path, as REPA pairs them; here the pair must also
agree in its folder and its trailing image number, and every ``.npy`` must have the latent shape of the
configured VAE at ``data.resolution``.  Anything else is refused before training starts, one line naming the
first offending file.  All ``.npy`` sizes are compared from the directory listing (no file is opened but the
first); each file's shape is checked again when it is read.

The training latent is REPA's: ``(mean + std * eps) * scale`` (:meth:`BatchSource.sample_latent`), so the
encoder runs only for the hierarchical features (and a teacher, when the run has one): no second latent pass.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ahpa.data.batches import BatchSource, _loader
from ahpa.data.images import EXTENSIONS, to_rgb
from ahpa.errors import AhpaError

IMAGES, LATENTS, LABELS = "images", "vae-sd", "dataset.json"
_NUMBER = re.compile(r"(\d+)$")


def _listing(root: str, keep) -> list[tuple[str, int]]:
    """(path relative to ``root``, "/"-separated; size in bytes) of the files ``keep(name)`` accepts, sorted."""
    found, stack = [], [""]
    while stack:
        relative = stack.pop()
        with os.scandir(os.path.join(root, relative)) as entries:
            for entry in entries:
                if entry.name.startswith("."):  # .DS_Store, .ipynb_checkpoints
                    continue
                name = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    stack.append(name)
                elif keep(entry.name):
                    found.append((name, entry.stat().st_size))
    return sorted(found)


def pairing_key(relative: str) -> tuple[str, str]:
    """(folder, trailing number of the file stem): ``00000/img00000007.png`` and ``00000/img-mean-std-00000007.npy``
    agree; a stem without a trailing number is its own key."""
    folder, _, name = relative.rpartition("/")
    stem = os.path.splitext(name)[0]
    number = _NUMBER.search(stem)
    return folder, number.group(1) if number else stem


class RepaDataset(Dataset):
    """``DATA`` in REPA's layout -> ``dict(image=uint8 [3, R, R], y=long, moments=float32 [2C, h, w])``."""

    def __init__(self, root: str | os.PathLike, resolution: int, moments_shape: tuple[int, int, int]):
        self.root, self.resolution, self.moments_shape = os.fspath(root), int(resolution), tuple(moments_shape)
        self.images_dir, self.latents_dir = os.path.join(self.root, IMAGES), os.path.join(self.root, LATENTS)
        for folder in (self.images_dir, self.latents_dir):
            if not os.path.isdir(folder):
                raise AhpaError(f"{folder} does not exist; data.source=repa reads REPA's preprocessed DATA folder "
                                "(DATA/images/ and DATA/vae-sd/ from its preprocessing/dataset_tools.py convert and encode)")
        images = _listing(self.images_dir, lambda n: os.path.splitext(n)[1].lower() in EXTENSIONS)
        latents = _listing(self.latents_dir, lambda n: n.endswith(".npy"))
        self.images, self.latents = [p for p, _ in images], [p for p, _ in latents]
        self._check_pairs()
        self.labels = self._read_labels()
        self._check_shapes([s for _, s in latents])
        self.num_classes = int(self.labels.max()) + 1

    def _image(self, i: int) -> str:
        return f"{IMAGES}/{self.images[i]}"

    def _latent(self, i: int) -> str:
        return f"{LATENTS}/{self.latents[i]}"

    def _check_pairs(self) -> None:
        if not self.images or not self.latents:
            empty = self.images_dir if not self.images else self.latents_dir
            raise AhpaError(f"{empty} holds no {'image' if not self.images else '.npy'} files; point data.path at REPA's DATA folder")
        for i, (image, latent) in enumerate(zip(self.images, self.latents)):
            if pairing_key(image) != pairing_key(latent):
                raise AhpaError(f"{self._image(i)} is paired by sorted order with {self._latent(i)}, another image number; "
                                f"the .npy of {self._image(i)} is missing or misnamed in {self.root} (REPA pairs by sorted order)")
        n, m = len(self.images), len(self.latents)
        if n != m:
            extra = self._image(m) if n > m else self._latent(n)
            raise AhpaError(f"{self.root} has {n} images but {m} .npy files: {extra} has no partner; "
                            "rerun REPA's encode step on the same images/ folder")

    def _read_labels(self) -> np.ndarray:
        path = os.path.join(self.latents_dir, LABELS)
        try:
            with open(path) as f:
                labels = json.load(f).get("labels")
        except (OSError, ValueError, AttributeError) as e:
            raise AhpaError(f"cannot read the class labels {path} ({e}); REPA's encode step writes it beside the .npy files") from None
        if not isinstance(labels, list):
            raise AhpaError(f"{path} has no class labels (\"labels\" is {labels!r}); class-conditional training needs them")
        table = {str(name).replace("\\", "/"): label for name, label in labels}
        missing = next((p for p in self.latents if p not in table), None)
        if missing is not None:
            raise AhpaError(f"{LATENTS}/{missing} has no label in {path}; rerun REPA's encode step or add its label")
        return np.asarray([table[p] for p in self.latents], dtype=np.int64)

    def _check_shapes(self, sizes: list[int]) -> None:
        first = os.path.join(self.latents_dir, self.latents[0])
        self._load_moments(first)  # its header: shape and dtype
        odd = next((i for i, s in enumerate(sizes) if s != sizes[0]), None)
        if odd is not None:  # another size is another shape or dtype: say which
            self._load_moments(os.path.join(self.latents_dir, self.latents[odd]))
            raise AhpaError(f"{self._latent(odd)} has {sizes[odd]} bytes, {self._latent(0)} {sizes[0]}; every .npy must hold the same array")

    def _load_moments(self, path: str) -> np.ndarray:
        array = np.load(path, mmap_mode="r")
        if array.shape != self.moments_shape or array.dtype.kind != "f":
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            raise AhpaError(f"{rel} holds {array.dtype} {tuple(array.shape)}, not the float {self.moments_shape} (mean and std of "
                            f"the VAE's latent at data.resolution={self.resolution}); use the VAE and resolution REPA's encode step used")
        return array

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = os.path.join(self.images_dir, self.images[index])
        with Image.open(path) as image:
            if image.size != (self.resolution, self.resolution):
                raise AhpaError(f"{self._image(index)} is {image.size[0]}x{image.size[1]}, not {self.resolution}x{self.resolution} "
                                "(REPA's images are centre-cropped to the training resolution); set data.resolution to match")
            arr = np.asarray(to_rgb(image))
        moments = np.array(self._load_moments(os.path.join(self.latents_dir, self.latents[index])), dtype=np.float32)
        return {"image": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), "y": torch.tensor(self.labels[index]),
                "moments": torch.from_numpy(moments)}


class RepaSource(BatchSource):
    """REPA's layout: latent moments read from the ``.npy`` files, the prior's features (and a teacher's) computed on the
    device from the images at every step; no flips (REPA's latents are of the unflipped images)."""

    def __init__(self, cfg, device, rank, world, per_rank, dataset: RepaDataset, *, latent_shape, **encoders):
        super().__init__(cfg, device, rank, world, per_rank, **encoders)
        self.dataset = dataset
        self.latent_shape = tuple(latent_shape)
        self.num_classes = dataset.num_classes

    def start(self, step: int) -> None:
        self._batches = iter(_loader(self.dataset, self._stream(len(self.dataset), step), self.cfg, self.device))

    def next_batch(self) -> dict:
        batch = next(self._batches)
        d = self.device
        images = batch["image"].to(d, non_blocking=True).float() / 127.5 - 1.0
        moments = batch["moments"].to(d, torch.float32, non_blocking=True)
        channels = moments.shape[1] // 2
        features = self.prior(images).features if self.prior.layers else {}  # vanilla: no encoder pass at all
        return self._finish({"y": batch["y"].to(d), "latent_mean": moments[:, :channels].contiguous(),
                             "latent_std": moments[:, channels:].contiguous(), "features": features}, images)
