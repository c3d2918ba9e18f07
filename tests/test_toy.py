"""Toy digits set (ahpa/data/toy.py) and the committed tiny VAE (ahpa/data/tiny_vae.py)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from sklearn.datasets import load_digits

from ahpa.data.tiny_vae import ASSET_DIR, latent_statistics, reconstruction_psnr, register, train_tiny_vae
from ahpa.data.toy import ToyDataset, heldout_mask, load_toy, toy_reference_npz, write_image_folder
from ahpa.errors import AhpaError
from ahpa.evaluation.npz import open_npz_images

# Held-out PSNR of the committed weights as reported by `ahpa train-vae` (training.json).
COMMITTED_PSNR_DB = 46.4
PSNR_MARGIN_DB = 0.5


@pytest.fixture(scope="module")
def committed_vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(ASSET_DIR, torch_dtype=torch.float32).eval()


def test_split_sizes_and_partition():
    digits = load_digits()
    train, y_train = load_toy("train", resolution=8)
    held, y_held = load_toy("heldout", resolution=8)
    # ceil(n_c / 10) per class for the class counts 178, 182, 177, 183, 181, 182, 181, 179, 174, 180.
    assert len(held) == len(y_held) == 185
    assert len(train) == len(y_train) == 1797 - 185
    # At native resolution the images are exactly round(grey * 255 / 16); together the
    # two splits are the whole set, each digit once (so they are disjoint).
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)
    mask = heldout_mask(digits.target)
    assert np.array_equal(held[:, 0].numpy(), expected[mask])
    assert np.array_equal(train[:, 0].numpy(), expected[~mask])
    assert np.array_equal(y_held.numpy(), digits.target[mask])


def test_classes_stratified():
    _, y_train = load_toy("train")
    _, y_held = load_toy("heldout")
    assert y_train.dtype == torch.long
    train_counts, held_counts = torch.bincount(y_train), torch.bincount(y_held)
    assert len(train_counts) == len(held_counts) == 10
    assert (held_counts >= 17).all() and (train_counts >= 150).all()
    ratio = held_counts.float() / (held_counts + train_counts).float()
    assert ((ratio > 0.09) & (ratio < 0.11)).all()


def test_images_look_like_digits():
    images, _ = load_toy("train", resolution=32)
    assert images.shape == (1612, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    x = images[:, 0].float()
    assert x.min() == 0 and x.max() == 255
    assert 50 < x.mean() < 120 and x.std() > 60  # white strokes on a black background
    assert 0.35 < (x < 32).float().mean() < 0.65  # background
    assert 0.15 < (x > 128).float().mean() < 0.45  # ink
    assert (x[:, :, :2] < 32).float().mean() > 0.95  # the left edge is background
    # Area-downsampled back to 8x8, the image matches the original digit.
    grey = torch.from_numpy(load_digits().images[~heldout_mask(load_digits().target)]).float() * 255 / 16
    back = F.avg_pool2d(x[:, None], 4)[:, 0]
    corr = np.corrcoef(back.flatten().numpy(), grey.flatten().numpy())[0, 1]
    assert corr > 0.97
    assert (back - grey).abs().mean() < 15


def test_dataset_item_format():
    dataset = ToyDataset("heldout", 16)
    item = dataset[3]
    assert len(dataset) == 185 and dataset.num_classes == 10
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
    assert item["y"].dtype == torch.long and item["y"].item() == load_toy("heldout")[1][3].item()
    with pytest.raises(AhpaError, match="split"):
        load_toy("test")


def test_image_folder_and_reference_npz(tmp_path):
    root = write_image_folder(tmp_path / "toy", "heldout")
    images, labels = load_toy("heldout")
    class_dirs = sorted(p.name for p in root.iterdir())
    assert class_dirs == [str(c) for c in range(10)]
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 185
    first = np.array(Image.open(root / str(labels[0].item()) / "00000.png"))
    assert np.array_equal(first, images[0].permute(1, 2, 0).numpy())
    with pytest.raises(AhpaError, match="not empty"):
        write_image_folder(root, "heldout")

    npz = open_npz_images(toy_reference_npz(tmp_path / "ref.npz", "heldout"))
    assert npz.shape == (185, 32, 32, 3)
    assert np.array_equal(next(npz.batches(185)), images.permute(0, 2, 3, 1).numpy())


def test_committed_vae_shape_and_size(committed_vae):
    files = {p.name: p.stat().st_size for p in ASSET_DIR.iterdir()}
    assert set(files) >= {"config.json", "diffusion_pytorch_model.safetensors", "training.json"}
    assert files["diffusion_pytorch_model.safetensors"] <= 4 * 1024 * 1024
    assert next(committed_vae.parameters()).dtype == torch.float32
    with torch.no_grad():
        z = committed_vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mode()
        assert z.shape == (2, 4, 8, 8)
        assert committed_vae.decode(z).sample.shape == (2, 3, 32, 32)
    # SD-VAE's structure (docs/design.md section 2): two resnets per stage, attention in the mid block.
    assert len(committed_vae.encoder.down_blocks) == 3
    assert all(len(b.resnets) == 2 for b in committed_vae.encoder.down_blocks)
    assert committed_vae.encoder.mid_block.attentions[0] is not None


def test_committed_vae_quality(committed_vae):
    record = json.loads((ASSET_DIR / "training.json").read_text())
    held, _ = load_toy("heldout")
    psnr = reconstruction_psnr(committed_vae, held)
    assert psnr >= COMMITTED_PSNR_DB - PSNR_MARGIN_DB
    assert psnr == pytest.approx(record["heldout_psnr_db"], abs=0.05)
    train, _ = load_toy("train")
    stats = latent_statistics(committed_vae, train[:512])
    assert 0.7 <= stats["std"] * committed_vae.config.scaling_factor <= 1.4
    assert committed_vae.config.scaling_factor == pytest.approx(record["scaling_factor"])


@pytest.mark.slow
def test_train_two_steps_is_loadable_and_far_worse(tmp_path, committed_vae):
    record = train_tiny_vae(tmp_path / "vae", steps=2, batch=4, lr=1e-3, seed=1, kl_weight=1e-3, warmup=1, progress=False)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.float32)
    saved = json.loads((tmp_path / "vae" / "training.json").read_text())
    assert saved == record and saved["steps"] == 2
    assert vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert record["heldout_psnr_db"] < COMMITTED_PSNR_DB - 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(AhpaError, match="steps"):
        train_tiny_vae(tmp_path / "bad", steps=0, progress=False)


def test_cli_defaults_match_committed_record():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train-vae", "--out", "x"])
    record = json.loads((ASSET_DIR / "training.json").read_text())
    for key in ("steps", "batch", "lr", "seed", "kl_weight"):
        assert getattr(args, key) == record[key]
