"""MS-COCO 2014 for text-to-image (paper Appendix C) and the captioned toy digits.

Layout (the 2014 release)::

    COCO/train2014/COCO_train2014_000000000009.jpg ...
    COCO/val2014/...
    COCO/annotations/captions_train2014.json, captions_val2014.json

The image list of a split is the annotation file's ``images`` sorted by id
(82,783 train / 40,504 val images); each keeps its captions in the order of the
annotation file (about five).  Preprocessing is U-ViT's
(``scripts/extract_mscoco_feature.py``): the centred square crop of side
min(H, W), then a LANCZOS resize to the resolution.

Per training step, one caption of each image is drawn from the step's own
generator (:func:`ahpa.data.batches.step_generator`, stream 2), so a resumed
run draws the captions an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ahpa.data.images import FORMATS, ImageList, ImageReport, LoadResult, to_rgb
from ahpa.data.sampler import step_generator
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError

SPLITS = ("train2014", "val2014")
CAPTION_STREAM = 2  # step_generator stream of the caption draw (0: trainer, 1: flips)


def center_crop_lanczos(image: Image.Image, resolution: int) -> np.ndarray:
    """U-ViT's COCO preprocessing: centred square crop of side min(H, W), LANCZOS to ``resolution``; [R, R, 3] uint8."""
    arr = np.asarray(to_rgb(image))
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    square = Image.fromarray(np.ascontiguousarray(arr[top : top + side, left : left + side]))
    return np.asarray(square.resize((resolution, resolution), Image.LANCZOS), dtype=np.uint8)


class CocoCaptions:
    """The images and captions of one split, from ``annotations/captions_<split>.json``."""

    def __init__(self, root: str | os.PathLike, split: str = "train2014"):
        if split not in SPLITS:
            raise AhpaError(f"unknown COCO split {split!r}; use one of {', '.join(SPLITS)}")
        self.root, self.split = Path(root), split
        file = self.root / "annotations" / f"captions_{split}.json"
        if not file.is_file():
            raise AhpaError(f"COCO folder {self.root} has no {file.relative_to(self.root)}; expected the 2014 layout "
                            f"({split}/ and annotations/captions_{split}.json from cocodataset.org)")
        try:
            data = json.loads(file.read_text())
            images = sorted(data["images"], key=lambda im: im["id"])
            annotations = data["annotations"]
        except (ValueError, KeyError, TypeError) as err:
            raise AhpaError(f"{file} is not a COCO captions file ({type(err).__name__}: {err})") from None
        captions: dict[int, list[str]] = {}
        for ann in annotations:
            captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
        self.image_ids = [int(im["id"]) for im in images]
        self.files = [f"{split}/{im['file_name']}" for im in images]
        known = set(self.image_ids)
        orphans = sorted(set(captions) - known)
        if orphans:
            raise AhpaError(f"{file}: captions refer to image id {orphans[0]} that the file's images list lacks "
                            f"({len(orphans)} such ids); the annotation file is damaged, download it again")
        empty = [i for i in self.image_ids if not captions.get(i)]
        if empty:
            raise AhpaError(f"{file}: image id {empty[0]} has no caption ({len(empty)} such images); "
                            "the annotation file is damaged or not a captions file")
        self.captions = [captions[i] for i in self.image_ids]
        # All captions flattened: image k owns rows offsets[k] .. offsets[k+1]-1.
        self.flat = [c for caps in self.captions for c in caps]
        self.offsets = np.cumsum([0] + [len(c) for c in self.captions]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def first_captions(self) -> list[str]:
        """One prompt per image, in image order: each image's first caption (REPA's 40K protocol)."""
        return [caps[0] for caps in self.captions]

    def random_captions(self, num: int, seed: int = 0) -> list[str]:
        """``num`` captions drawn uniformly without replacement from all captions (U-ViT's 30K protocol)."""
        if num > len(self.flat):
            raise AhpaError(f"{self.split} has {len(self.flat)} captions, fewer than the {num} asked")
        order = np.random.Generator(np.random.PCG64(seed)).permutation(len(self.flat))[:num]
        return [self.flat[i] for i in order]


def draw_caption_rows(image_index: Tensor, offsets: Tensor, seed: int, step: int, global_batch: int,
                      rank: int = 0, per_rank: int | None = None) -> Tensor:
    """Rows of the flat caption table: one caption per image of step ``step``'s batch.

    ``image_index`` ``[b]``: this rank's images of the step (the global batch sliced at
    ``rank * per_rank``).  One uniform draw per global-batch position from the step's
    generator picks caption ``floor(u * n_captions)`` of each image.
    """

    per_rank = len(image_index) if per_rank is None else per_rank
    device = image_index.device
    g = step_generator(seed, step, device, stream=CAPTION_STREAM)
    u = torch.rand(global_batch, generator=g, device=device, dtype=torch.float64)
    u = u[rank * per_rank : rank * per_rank + len(image_index)]
    offsets = offsets.to(device)
    start, count = offsets[image_index], offsets[image_index + 1] - offsets[image_index]
    return start + torch.minimum((u * count).long(), count - 1)


class CocoImages(ImageList):
    """The images of a split in the interface of ``ImageFolderDataset`` (for ``ahpa extract``).

    ``y`` is the image's index in the split (its position in id order), so the caption
    table can be joined with a feature cache; the cache's single "class" is ``mscoco``.
    """

    def __init__(self, root: str | os.PathLike, split: str, resolution: int, report: ImageReport | None = None):
        self.coco = CocoCaptions(root, split)
        self.root = os.fspath(root)
        self.resolution = int(resolution)
        self.report = report if report is not None else ImageReport()
        self.classes = ["mscoco"]
        self.y_is_image_index = True  # the cache records it (manifest images.y = "image_index")
        self.files = self.coco.files
        self.report.classes, self.report.listed = 1, len(self.files)
        if not (Path(root) / split).is_dir():
            raise AhpaError(f"COCO folder {root} has no {split}/ image folder; expected the 2014 layout")

    def load(self, index: int) -> LoadResult:
        path = self.path(index)
        try:
            with Image.open(path, formats=FORMATS) as image:
                image.load()
                mode, upsampled = image.mode, min(image.size) < self.resolution
                arr = center_crop_lanczos(image, self.resolution)
        except Exception as err:  # PIL raises many kinds on malformed files
            return LoadResult(index, path, None, None, False, f"{type(err).__name__}: {err}")
        item = {"image": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))),
                "y": torch.tensor(index, dtype=torch.long)}
        return LoadResult(index, path, item, None if mode == "RGB" else mode, upsampled, None)

    def __getitem__(self, index: int) -> dict:
        result = self.load(index)
        if result.item is None:
            raise AhpaError(f"cannot decode COCO image {result.path} ({result.error}); replace the file")
        return result.item


# ----------------------------------------------------------------- captioned toy digits (offline demo)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS = ("thin", "bold")  # the stroke weight: the original scan, or dilated by a 3x3 maximum
TEMPLATES = ("a {w} {name}", "the digit {d} written in {w} strokes")


def toy_caption_classes() -> list[tuple[int, int]]:
    """(digit, weight) pairs in caption-class order: class = 2 * digit + weight."""
    return [(d, w) for d in range(10) for w in range(len(WEIGHTS))]


def toy_captions(digit: int, weight: int) -> list[str]:
    return [t.format(w=WEIGHTS[weight], name=DIGIT_NAMES[digit], d=digit) for t in TEMPLATES]


def load_captioned_toy(split: str = "train", resolution: int = 32) -> tuple[Tensor, Tensor, list[list[str]]]:
    """Every toy digit twice, thin and bold: ``(images uint8 [2N, 3, R, R], class [2N], captions per class)``.

    Class ``2 * digit + weight``; each class has the captions of :data:`TEMPLATES`.
    """

    images, labels = load_toy(split, resolution)
    bold = F.max_pool2d(images.float(), 3, stride=1, padding=1).to(torch.uint8)
    both = torch.cat([images, bold])
    classes = torch.cat([labels * 2, labels * 2 + 1])
    return both, classes, [toy_captions(d, w) for d, w in toy_caption_classes()]
