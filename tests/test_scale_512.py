"""512 px (App. F) with real compute: ``ahpa extract`` with the 512 config, then one training step
from that cache, on a randomly initialised SD-VAE of the real block structure at reduced width.

The real-width SD-VAE encoder costs about 1.08 TFLOPs (21 s of one CPU core) per 512 px image,
so the widths here are (32, 64, 128, 128) instead of (128, 256, 512, 512): the same 4 down blocks,
2 resnets per block, mid-block attention at 64x64 and GroupNorm(32), 1/16 of the FLOPs.
Reduced widths make ``prior.grouping=auto`` take the resolution grouping (SD-VAE's 4/4 split
needs its widths; that split at 512 px is checked on the meta device in test_priors.py and
test_scale_vaes.py).  Full-size cost: ``benchmarks/resolution_cost.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ahpa.cli import main as cli_main
from ahpa.config import load_config
from ahpa.data.cache import CacheDataset, read_manifest
from ahpa.priors.hierarchy import SD_VAE_CONFIG
from ahpa.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sit-xl2-ahpa-512.yaml"
WIDTHS = (32, 64, 128, 128)


def test_extract_and_train_one_step_at_512px(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(SD_VAE_CONFIG, block_out_channels=WIDTHS)).requires_grad_(False).eval()
    vae.save_pretrained(tmp_path / "vae")
    folder = tmp_path / "images"
    for c, size in enumerate([(600, 540), (512, 512)]):  # one is resized and centre-cropped
        (folder / f"n0{c}").mkdir(parents=True)
        pixels = np.random.default_rng(c).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"n0{c}" / "a.png")
    cache = tmp_path / "cache"
    assert cli_main(["extract", str(folder), "--out", str(cache), "--config", str(CONFIG), "--vae", str(tmp_path / "vae"),
                     "--workers", "0", "--batch", "2", "--shard-size", "2"]) == 0

    manifest = read_manifest(cache)
    assert manifest["count"] == 2
    item = CacheDataset(cache)[0]
    assert tuple(item["latent_mean"].shape) == tuple(item["latent_std"].shape) == (4, 64, 64)
    # resolution grouping (App. B): G3 = the 2 widest layers at 128x128 (SD-VAE's 512-channel pair at size / 4),
    # G4 = the 6 at 64x64, both area-pooled to SiT-XL/2's 32x32 token grid
    assert {g: tuple(f.shape) for g, f in item["features"].items()} == {"G3": (2, 128, 32, 32), "G4": (6, 128, 32, 32)}
    assert all(torch.isfinite(f).all() and f.std() > 0 for f in item["features"].values())
    assert manifest["bytes_per_image"] == 2 * 2 * 4 * 64 * 64 + 8 * 128 * 32 * 32 * 2 + 16  # float16 moments and features

    cfg = load_config(CONFIG, ["model.name=SiT-T/2", "model.num_classes=2", f"vae.path={tmp_path / 'vae'}",
                               f"data.path={cache}", "data.num_workers=0", "train.steps=1", "train.global_batch=2",
                               f"train.out={tmp_path / 'run'}", "train.log_every=1", "train.ckpt_every=0",
                               "train.sample_every=0", "train.max_minutes=0"])
    trainer = Trainer(cfg, show_progress=False)
    # the EMA grids (16 images, ODE, decoded at 512 px) before and after the step would cost ~20x the step itself
    trainer.save_sample_grid = lambda path: None
    assert trainer.source.latent_shape == (4, 64, 64) and trainer.sit.grid == 32  # 1024 tokens
    metrics = trainer.run()
    assert metrics["steps"] == 1 and np.isfinite(metrics["history"][-1]["loss"])
    assert metrics["history"][-1]["loss_align"] < 0  # negative cosine: the 512 px features reached the loss
