"""ImageNet-layout image folders, decoded robustly and centre-cropped as ADM does.

``root/<class>/**/<image>``: class folders sorted by name give the labels
0..K-1 (for ImageNet, the standard synset order).  Decisions this module makes,
each visible in the :class:`ImageReport` (never a silent drop, never a crash):

- Listing uses ``os.scandir`` and an extension filter only (1.28M files list in
  seconds); files with other extensions are counted as ``ignored``.  Hidden
  names (``.DS_Store``, ``.ipynb_checkpoints``) are skipped.  Files directly
  under ``root`` are ignored (they belong to no class).
- An empty class folder keeps its class index: dropping it would shift every
  later label and silently break compatibility with the 1000 ImageNet classes
  of published checkpoints.  It is listed in ``report.empty_classes``.
- The header is checked at decode time: PIL may only try the image formats in
  :data:`FORMATS`, so a text file named ``.jpg`` fails in microseconds.
- Truncated or corrupt files fail (no grey-filled half images); so do images
  above PIL's decompression-bomb limit.  Failed files are counted in
  ``report.failed`` with the reason.  :meth:`ImageFolderDataset.load` returns
  the failure (the extractor records every outcome, conversions included);
  ``__getitem__`` records and warns once per file and substitutes the next
  decodable image, so a training batch keeps its size.
- Colour: greyscale, palette, CMYK and YCbCr go through PIL's ``convert("RGB")``
  (what ADM does); alpha (RGBA, LA, palette transparency) is composited on
  white, what an image viewer shows (the colour under transparent pixels is
  arbitrary; ImageNet has no alpha, so parity with ADM is unaffected); 16-bit
  greyscale keeps its high byte, as PIL does for 16-bit RGB.  EXIF orientation
  is not applied (ADM does not).  Conversions are counted by source mode.
- Images smaller than the crop are upsampled by ADM's bicubic resize (counted
  as ``upsampled``), not rejected.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ahpa.errors import AhpaError

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # header check: PIL tries only these
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop, ``[R, R, 3]`` uint8.

    The steps of ``center_crop_arr`` in openai/guided-diffusion,
    ``guided_diffusion/image_datasets.py#L126`` at commit 8fb3ad91 (the
    version DiT, SiT and REPA cite and use): BOX-halve while the short side is
    at least 2R, BICUBIC-resize so the short side is R, crop the centre.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (alpha composited on white; see module doc)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        high = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high, mode="L").convert("RGB")
    return image.convert("RGB")


class ImageDecodeError(Exception):
    """A listed file that cannot be decoded as an image (the reason is the message)."""


def decode_image(path: str, resolution: int) -> tuple[np.ndarray, str | None, bool]:
    """Decode and crop one file: ``(array [R, R, 3] uint8, source mode if converted, upsampled)``."""
    try:
        with Image.open(path, formats=FORMATS) as image:
            image.load()
            mode = image.mode
            upsampled = min(image.size) < resolution
            arr = center_crop_arr(to_rgb(image), resolution)
    except Exception as err:  # PIL's plugins raise many kinds on malformed files (OSError, EOFError, struct.error, ...)
        reason = str(err).replace(path, os.path.basename(path))  # reports independent of where the folder lives
        raise ImageDecodeError(f"{type(err).__name__}: {reason}") from None
    return arr, (None if mode == "RGB" else mode), upsampled


@dataclass
class ImageReport:
    """What happened to the files of an image folder (listing and decoding)."""

    classes: int = 0
    listed: int = 0  # files with an image extension
    ignored: int = 0  # files without one, or directly under root
    empty_classes: list[str] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)  # source mode -> decoded files
    upsampled: int = 0  # short side below the crop resolution
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason

    def record(self, result: "LoadResult") -> None:
        if result.error is not None:
            self.failed[result.path] = result.error
            return
        if result.mode is not None:
            self.converted[result.mode] += 1
        self.upsampled += int(result.upsampled)

    def to_dict(self) -> dict:
        return {
            "classes": self.classes,
            "listed": self.listed,
            "ignored": self.ignored,
            "empty_classes": list(self.empty_classes),
            "converted": dict(sorted(self.converted.items())),
            "upsampled": self.upsampled,
            "failed": dict(sorted(self.failed.items())),
        }

    def summary(self) -> str:
        conv = ", ".join(f"{n} {m}" for m, n in sorted(self.converted.items())) or "none"
        text = (
            f"{self.listed} image files in {self.classes} classes; {self.ignored} other files ignored; "
            f"{len(self.empty_classes)} empty classes; converted to RGB: {conv}; "
            f"{self.upsampled} upsampled; {len(self.failed)} failed to decode"
        )
        if self.failed:
            path, reason = next(iter(sorted(self.failed.items())))
            text += f" (e.g. {path}: {reason})"
        return text


class LoadResult(NamedTuple):
    index: int
    path: str
    item: dict | None  # dict(image uint8 [3, R, R], y long) or None on failure
    mode: str | None  # source mode if converted to RGB
    upsampled: bool
    error: str | None


def _list_files(root: str, folder: str, report: ImageReport) -> list[str]:
    """Image files under ``root/folder`` (recursive), as sorted paths relative to ``root``."""
    found = []
    stack = [folder]
    while stack:
        relative = stack.pop()
        with os.scandir(os.path.join(root, relative)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(f"{relative}/{entry.name}")
                elif os.path.splitext(entry.name)[1].lower() in EXTENSIONS:
                    found.append(f"{relative}/{entry.name}")
                else:
                    report.ignored += 1
    return sorted(found)



def file_list_sha256(files: list[str]) -> str:
    """sha256 of a data set's relative paths in order: identifies the image list (cache manifests, resume)."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()

class ImageList:
    """Image files under ``root`` (``files``: "/"-separated paths relative to it): the length, the list's hash
    (what a feature cache records), and the path of one file."""

    root: str
    files: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def file_list_hash(self) -> str:
        return file_list_sha256(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])


class ImageFolderDataset(ImageList, Dataset):
    """``root/<class>/<image>`` -> ``dict(image=uint8 [3, R, R], y=long)`` (ADM centre crop)."""

    def __init__(self, root: str | os.PathLike, resolution: int, report: ImageReport | None = None):
        self.root = os.fspath(root)
        self.resolution = int(resolution)
        self.report = report if report is not None else ImageReport()
        if not os.path.isdir(self.root):
            raise AhpaError(f"image folder '{self.root}' does not exist; pass an ImageNet-layout folder (one subfolder per class)")
        with os.scandir(self.root) as entries:
            dirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    dirs.append(e.name)
                else:
                    self.report.ignored += 1
        self.classes = sorted(dirs)
        self.files: list[str] = []  # paths relative to root ("/"-separated), class by class
        labels = []
        for y, name in enumerate(self.classes):
            files = _list_files(self.root, name, self.report)
            if not files:
                self.report.empty_classes.append(name)
            self.files += files
            labels += [y] * len(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.report.classes = len(self.classes)
        self.report.listed = len(self.files)
        if not self.files:
            raise AhpaError(
                f"no image files ({', '.join(sorted(EXTENSIONS))}) in class subfolders of '{self.root}'; "
                "expected root/<class>/<image> as in ImageNet's train folder"
            )

    def load(self, index: int) -> LoadResult:
        """Decode one file; failures are returned, not raised (the caller records them)."""
        path = self.path(index)
        try:
            arr, mode, upsampled = decode_image(path, self.resolution)
        except ImageDecodeError as err:
            return LoadResult(index, path, None, None, False, str(err))
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        item = {"image": image, "y": torch.tensor(self.labels[index], dtype=torch.long)}
        return LoadResult(index, path, item, mode, upsampled, None)

    def __getitem__(self, index: int) -> dict:
        for k in range(len(self.files)):
            result = self.load((index + k) % len(self.files))
            if result.item is not None:
                return result.item
            if result.path not in self.report.failed:  # warn once per file and process
                self.report.record(result)
                warnings.warn(f"skipping undecodable image {result.path} ({result.error}); using the next one", stacklevel=2)
        raise AhpaError(
            f"no image under '{self.root}' could be decoded ({self.report.summary()}); "
            "replace or remove the broken files, or point data.path at the right folder"
        )
