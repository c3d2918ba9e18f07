"""ADM-compatible ``.npz`` image batches (docs/design.md section 7).

The ADM evaluation suite (openai/guided-diffusion, ``evaluations/evaluator.py``)
reads ``arr_0`` of an ``.npz`` as uint8 images in NHWC layout, streaming it from
the zip member in batches.  Samples are written in that format by
``scripts/image_sample.py``, which quantises a model output ``x`` in [-1, 1] as
``((x + 1) * 127.5).clamp(0, 255).to(uint8)`` (truncation, no rounding) and then
permutes NCHW -> NHWC.  This module writes and reads exactly that format.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ahpa.errors import AhpaError
from ahpa.io import atomic_open

IMAGES_KEY = "arr_0"
# A text-to-image sample file also holds each image's prompt under this name (a unicode array, read
# without pickle): ``ahpa sample --prompts`` writes it, PickScore reads it (paper App. C).
PROMPTS_KEY = "prompts"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float NCHW images in [-1, 1] -> uint8 NHWC numpy, as ADM's image_sample.py.

    Values are truncated toward zero after clamping (``.to(uint8)``), not rounded,
    so 0.999 -> 254 and 1.0 -> 255, matching the published samples bit for bit.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise AhpaError(f"to_uint8 expects float images [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _layout_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an array is not uint8 NHWC RGB images (with the fix), or None."""
    if len(shape) != 4:
        return f"expected 4 dimensions [N, H, W, 3], got shape {shape}; stack the images into one [N, H, W, 3] array"
    if shape[-1] != 3:
        if shape[1] == 3:
            return (
                f"array has shape {shape}, which is NCHW (channels first); ADM's format is NHWC: "
                "save arr.transpose(0, 2, 3, 1) instead"
            )
        return f"expected 3 (RGB) channels in the last axis, got shape {shape}; convert grayscale/RGBA images to RGB"
    if dtype != np.uint8:
        return (
            f"expected dtype uint8, got {dtype}; quantise float images in [-1, 1] with "
            "ahpa.evaluation.npz.to_uint8 (ADM: ((x + 1) * 127.5).clamp(0, 255).to(uint8))"
        )
    return None


def save_npz_atomic(path: str | os.PathLike, arr: np.ndarray, **extra: np.ndarray) -> Path:
    """Write ``arr`` (uint8 NHWC RGB) as ``arr_0`` plus ``extra`` arrays to ``path``.

    The file appears only when complete: it is written to a temporary name in the
    same directory and moved into place with ``os.replace``.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise AhpaError(f"sample file {path} must end in .npz (ADM's evaluator reads .npz archives)")
    arr = np.asarray(arr)
    problem = _layout_problem(arr.shape, arr.dtype)
    if problem:
        raise AhpaError(f"cannot save {path}: {problem}")
    if IMAGES_KEY in extra:
        raise AhpaError(f"extra array name {IMAGES_KEY!r} is reserved for the images")
    with atomic_open(path, "wb") as f:
        np.savez(f, **{IMAGES_KEY: arr}, **extra)
    return path


class NpzImages:
    """Validated, streaming view of the images in an ADM ``.npz`` (see :func:`open_npz_images`).

    Nothing but the header is read on construction; :meth:`batches` streams the
    ``arr_0`` member in uint8 batches, so memory stays at one batch.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], keys: list[str], fortran: bool):
        self.path = path
        self.shape = shape
        self.keys = keys
        self._fortran = fortran

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return self.shape[1], self.shape[2]

    def load(self, key: str) -> np.ndarray:
        """Another array stored in the file (e.g. labels ``arr_1`` or reference ``mu``)."""
        if key not in self.keys:
            raise AhpaError(f"{self.path} has no array {key!r} (it holds {', '.join(self.keys)})")
        try:
            with np.load(self.path) as data:
                return data[key]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise AhpaError(f"{self.path}: array {key!r} is unreadable ({err}); the file is damaged, rewrite it") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive uint8 [b, H, W, 3] batches in file order; AhpaError for damaged data (bad CRC, zlib errors)."""
        try:
            yield from self._batches(batch_size)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise AhpaError(f"{self.path} is damaged ({err}); rewrite it (e.g. rerun `ahpa sample`) or fetch it again") from None

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._fortran:  # cannot stream column-major data; ADM loads it whole too
            images = self.load(IMAGES_KEY)
            for start in range(0, len(images), batch_size):
                yield np.ascontiguousarray(images[start : start + batch_size])
            return
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGES_KEY}.npy") as member:
            _read_npy_header(member)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                buffer = bytearray(count * per_image)
                view = memoryview(buffer)
                filled = 0
                while filled < len(buffer):
                    got = member.readinto(view[filled:])
                    if not got:
                        raise AhpaError(f"{self.path} is truncated (ran out of data at image {start + filled // per_image}); rewrite it")
                    filled += got
                yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])


def _read_npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` stream, leaving it at the data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"unsupported .npy format version {version}")


def open_npz_images(path: str | os.PathLike) -> NpzImages:
    """Open an ADM ``.npz`` and validate ``arr_0`` (uint8, NHWC, 3 channels) from its header.

    Raises AhpaError naming the problem and the fix: missing file, not an npz,
    missing ``arr_0``, wrong dtype, NCHW layout, wrong channel count.
    """
    path = Path(path)
    if not path.is_file():
        raise AhpaError(f"image batch {path} does not exist; pass the .npz written by `ahpa sample` or ADM's reference batch")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            keys = [n[: -len(".npy")] for n in names if n.endswith(".npy")]
            if f"{IMAGES_KEY}.npy" not in names:
                raise AhpaError(
                    f"{path} has no {IMAGES_KEY!r} array (found: {', '.join(keys) or 'nothing'}); "
                    f"ADM's format stores the images as the first positional array: np.savez(path, images)"
                )
            with archive.open(f"{IMAGES_KEY}.npy") as member:
                shape, fortran, dtype = _read_npy_header(member)
    except (zipfile.BadZipFile, ValueError) as err:
        raise AhpaError(f"{path} is not a readable .npz archive ({err}); write it with numpy.savez") from err
    problem = _layout_problem(tuple(shape), dtype)
    if problem:
        raise AhpaError(f"{path}: {problem}")
    return NpzImages(path, tuple(shape), keys, fortran)
