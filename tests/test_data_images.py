"""Image folders (ADM centre crop, robust decoding, report) and the resumable sampler."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ahpa.data.images import ImageFolderDataset, ImageReport, center_crop_arr
from ahpa.data.sampler import ResumableSampler
from ahpa.errors import AhpaError

# Images per generated class folder; raise it (e.g. AHPA_TEST_IMAGES=1000) for a large run.
N_PER_CLASS = int(os.environ.get("AHPA_TEST_IMAGES", "100"))


def write_png16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_image_folder(root: Path, n_per_class: int = N_PER_CLASS, seed: int = 0) -> dict:
    """Three classes of mixed formats plus an empty class; returns the expected report counts.

    Class ``a_rgb``: RGB JPEG and PNG.  Class ``b_mixed``: cycles through
    greyscale JPEG, CMYK JPEG, RGBA PNG, transparent palette PNG, 16-bit grey
    PNG, 16-bit RGB PNG and a tiny 5x7 image, plus one truncated JPEG, one text
    file named ``.jpg``, one ``notes.txt`` and a hidden ``.DS_Store``.
    Class ``c_empty``: no files.  Class ``d_nested``: JPEGs in a subfolder.
    """
    rng = np.random.default_rng(seed)
    size = lambda: (int(rng.integers(36, 60)), int(rng.integers(36, 60)))  # noqa: E731  (>= 32 px crop)
    pixels = lambda w, h, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    for name in ("a_rgb", "b_mixed", "c_empty", "d_nested/sub"):
        (root / name).mkdir(parents=True)
    expected = {"listed": 0, "ignored": 1, "failed": 2, "upsampled": 0, "converted": {}}
    for i in range(n_per_class):
        w, h = size()
        Image.fromarray(pixels(w, h)).save(root / "a_rgb" / f"{i:04d}.{'JPEG' if i % 2 else 'png'}")
        Image.fromarray(pixels(w, h)).save(root / "d_nested" / "sub" / f"{i:04d}.jpg")
        kind = i % 7
        path = root / "b_mixed" / f"{i:04d}"
        if kind == 0:
            Image.fromarray(pixels(w, h, 1)[..., 0], "L").save(f"{path}.jpg")
            mode = "L"
        elif kind == 1:
            Image.fromarray(pixels(w, h, 4), "CMYK").save(f"{path}.jpg")
            mode = "CMYK"
        elif kind == 2:
            Image.fromarray(pixels(w, h, 4), "RGBA").save(f"{path}.png")
            mode = "RGBA"
        elif kind == 3:
            image = Image.fromarray(pixels(w, h)).convert("P")
            image.info["transparency"] = 0
            image.save(f"{path}.png", transparency=0)
            mode = "P"
        elif kind == 4:
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(f"{path}.png")
            mode = "I;16"
        elif kind == 5:
            write_png16(Path(f"{path}.png"), rng.integers(0, 65536, (h, w, 3), dtype=np.uint16))
            mode = None  # PIL opens 48-bit PNG as RGB
        else:
            Image.fromarray(pixels(5, 7)).save(f"{path}.png")
            mode = None
            expected["upsampled"] += 1
        if mode:
            expected["converted"][mode] = expected["converted"].get(mode, 0) + 1
    jpeg = (root / "d_nested" / "sub" / "0000.jpg").read_bytes()
    (root / "b_mixed" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "b_mixed" / "text.jpg").write_text("not an image\n")
    (root / "b_mixed" / "notes.txt").write_text("ignored\n")
    (root / "b_mixed" / ".DS_Store").write_bytes(b"\0\0")
    expected["listed"] = 3 * n_per_class + 2
    return expected


# ----------------------------------------------------------------------------- ADM crop


def test_center_crop_box_halving_is_exact_block_mean():
    # 256x256 at R=64: two BOX halvings (256 -> 128 -> 64) average 4x4 blocks exactly,
    # the bicubic resize to the same size is the identity, and the crop is everything.
    blocks = np.random.default_rng(0).integers(0, 64, (64, 64, 3)).astype(np.uint8) * 4
    image = Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8)))
    np.testing.assert_array_equal(center_crop_arr(image, 64), blocks)


def test_center_crop_takes_the_centre_of_the_long_side():
    arr = np.random.default_rng(1).integers(0, 256, (64, 100, 3), dtype=np.uint8)
    # Short side 64 = R: no halving, no-op resize, columns (100 - 64) // 2 = 18 .. 82.
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr), 64), arr[:, 18:82])
    # 300x200 at R=64: one halving (200 >= 128) to 150x100, bicubic to 96x64, crop cols 16..80.
    big = Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    half = big.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    np.testing.assert_array_equal(center_crop_arr(big, 64), np.asarray(half)[:, 16:80])


# ----------------------------------------------------------------------------- folders


def test_mixed_folder_report_and_decoding(tmp_path):
    expected = make_image_folder(tmp_path)
    report = ImageReport()
    ds = ImageFolderDataset(tmp_path, 32, report=report)
    assert ds.classes == ["a_rgb", "b_mixed", "c_empty", "d_nested"]  # sorted; empty class keeps index 2
    assert report.empty_classes == ["c_empty"]
    assert (report.listed, report.ignored) == (expected["listed"], expected["ignored"])
    assert len(ds) == expected["listed"]
    assert sorted(set(ds.labels.tolist())) == [0, 1, 3]
    for i in range(len(ds)):
        result = ds.load(i)
        report.record(result)
        if result.item is not None:
            assert result.item["image"].shape == (3, 32, 32) and result.item["image"].dtype == torch.uint8
            assert int(result.item["y"]) == ds.labels[i]
    assert len(report.failed) == expected["failed"]
    assert {Path(p).name for p in report.failed} == {"truncated.jpg", "text.jpg"}
    assert dict(report.converted) == expected["converted"]
    assert report.upsampled == expected["upsampled"]
    assert "2 failed to decode" in report.summary()


def test_colour_conversions(tmp_path):
    (tmp_path / "x").mkdir()
    # Fully transparent black RGBA -> white (composited), not black (alpha dropped).
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "x" / "a.png")
    # 16-bit greyscale keeps the high byte: 0x8040 -> 0x80.
    Image.fromarray(np.full((32, 32), 0x8040, dtype=np.uint16)).save(tmp_path / "x" / "b.png")
    # 16-bit RGB: PIL keeps the high byte too.
    write_png16(tmp_path / "x" / "c.png", np.full((32, 32, 3), [0x1234, 0xFF00, 0x00FF], dtype=np.uint16))
    ds = ImageFolderDataset(tmp_path, 32)
    images = [ds.load(i).item["image"] for i in range(3)]
    assert torch.all(images[0] == 255)
    assert torch.all(images[1] == 0x80)
    assert images[2][:, 0, 0].tolist() == [0x12, 0xFF, 0x00]


def test_getitem_substitutes_and_reports_undecodable(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "0.jpg").write_text("not an image")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "x" / "1.png")
    ds = ImageFolderDataset(tmp_path, 32)
    with pytest.warns(UserWarning, match="0.jpg"):
        item = ds[0]
    assert item["image"][:, 0, 0].tolist() == [10, 20, 30]
    assert list(ds.report.failed) == [str(tmp_path / "x" / "0.jpg")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]  # warned once per file


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("x")
    with pytest.raises(AhpaError, match="no image files"):
        ImageFolderDataset(tmp_path, 32)
    with pytest.raises(AhpaError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 32)


# ----------------------------------------------------------------------------- sampler


def take(sampler: ResumableSampler, k: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_sampler_resume_is_exact():
    full = take(ResumableSampler(37, 4, seed=3, rank=1, world=2), 25)  # batches straddle epochs
    first = ResumableSampler(37, 4, seed=3, rank=1, world=2)
    head = take(first, 11)
    state = first.state_dict()
    assert state == {"epoch": (11 * 8) // 37, "position": (11 * 8) % 37}
    resumed = ResumableSampler(37, 4, seed=3, rank=1, world=2)
    resumed.load_state_dict(state)
    assert head + take(resumed, 14) == full
    # state_dict(consumed=k) gives the same point when a DataLoader drew ahead.
    ahead = ResumableSampler(37, 4, seed=3, rank=1, world=2)
    take(ahead, 20)
    assert ahead.state_dict(consumed=11) == state
    with pytest.raises(AhpaError):
        resumed.load_state_dict({"epoch": 0, "position": 37})


def test_sampler_epochs_are_permutations_and_ranks_split_the_global_batch():
    n, b, world = 24, 3, 2
    single = take(ResumableSampler(n, b * world, seed=5), 3 * n // (b * world))
    ranks = [take(ResumableSampler(n, b, seed=5, rank=r, world=world), 3 * n // (b * world)) for r in range(world)]
    assert [ranks[0][i] + ranks[1][i] for i in range(len(single))] == single
    stream = np.concatenate(single)
    epochs = stream.reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert take(ResumableSampler(n, 4, seed=5, shuffle=False), 1) == [[0, 1, 2, 3]]
    assert take(ResumableSampler(n, 4, seed=6), 2) != take(ResumableSampler(n, 4, seed=5), 2)


def test_sampler_shard_windows_keep_reads_local():
    sizes = [5, 7, 3, 6, 4, 5]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    sampler = ResumableSampler(sum(sizes), 2, seed=1, shard_sizes=sizes, shard_window=2)
    orders = [sampler.epoch_order(e) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(sum(sizes)))
        pos = 0
        while pos < len(order):  # consecutive windows, each exactly two whole shards
            window = list(dict.fromkeys(shard_of[order[pos:]].tolist()))[:2]
            width = sum(sizes[s] for s in window)
            members = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in window])
            assert set(order[pos : pos + width].tolist()) == set(members.tolist())
            pos += width
    assert not np.array_equal(orders[0], orders[1])
    with pytest.raises(AhpaError, match="sum to n"):
        ResumableSampler(10, 2, seed=0, shard_sizes=[3, 3])
