"""Training reads the same batches from raw images, from the feature cache and from memory,
refuses a cache made with another prior, and `ahpa demo` writes what the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ahpa.config import load_config
from ahpa.build import build_source
from ahpa.data.extract import extract_cache
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.priors.hierarchy import HierarchicalVAEPrior
from ahpa.priors.vae import load_vae
from ahpa.demo import demo_config, run_demo
from ahpa.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """40 toy digits (4 per class) as an ImageNet-layout PNG folder."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = load_toy("train", resolution=32)
    for c in range(10):
        (root / f"class_{c}").mkdir()
        for k, i in enumerate(torch.nonzero(labels == c).flatten()[:4].tolist()):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / f"class_{c}" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def cache(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    prior = HierarchicalVAEPrior(load_vae("tiny"), groups=("G3", "G4"), grid=4)
    extract_cache(image_folder, out, prior, 32, shard_size=16, batch_size=16, progress=False)
    return out


def cfg_for(out: Path, *extra: str):
    return load_config(TOY, [f"train.out={out}", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=0",
                             "train.grid_steps=2", "train.max_minutes=0", "data.num_workers=0", "data.hflip=false", *extra])


def test_cache_and_raw_images_give_the_same_batch(cache, image_folder, tmp_path):
    """The cache holds exactly what the on-the-fly prior computes (float16 storage aside)."""
    cached = build_source(cfg_for(tmp_path, "data.source=cache", f"data.path={cache}"), device="cpu", rank=0, world=1, per_rank=8)
    raw = build_source(cfg_for(tmp_path, "data.source=images", f"data.path={image_folder}"), device="cpu", rank=0, world=1, per_rank=8)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert cached.num_classes == raw.num_classes == 10
    assert cached.group_shapes == raw.group_shapes and cached.latent_shape == raw.latent_shape == (4, 8, 8)
    # item k of the cache is image manifest-order k; fetch the same images from the folder
    item = cached.dataset[0]
    idx = int(cached.dataset._open(0).get_slice("index")[0:1][0])
    image = raw.dataset[idx]["image"].float().unsqueeze(0) / 127.5 - 1
    out = raw.prior(image)
    assert int(item["y"]) == int(raw.dataset[idx]["y"])
    torch.testing.assert_close(item["latent_mean"].float(), out.latent_mean[0], atol=2e-3, rtol=2e-3)
    for g in ("G3", "G4"):
        torch.testing.assert_close(item["features"][g].float(), out.features[g][0], atol=5e-3, rtol=5e-3)
    assert manifest["count"] == 40


@pytest.mark.parametrize("source", ["cache", "images"])
def test_training_runs_from_each_source(source, cache, image_folder, tmp_path):
    path = cache if source == "cache" else image_folder
    metrics = Trainer(cfg_for(tmp_path, f"data.source={source}", f"data.path={path}", "train.steps=2"), show_progress=False).run()
    assert metrics["steps"] == 2 and all(np.isfinite(h["loss"]) for h in metrics["history"])
    assert metrics["history"][-1]["loss_align"] < 0  # negative cosine: the alignment branch ran


def test_training_refuses_a_cache_of_another_prior(cache, tmp_path):
    with pytest.raises(AhpaError, match="'resample' differs"):
        Trainer(cfg_for(tmp_path, "data.source=cache", f"data.path={cache}", "prior.resample=bilinear"), show_progress=False)
    with pytest.raises(AhpaError, match=r"holds groups \['G3', 'G4'\], not \['G2', 'G4'\]"):
        Trainer(cfg_for(tmp_path, "data.source=cache", f"data.path={cache}", "prior.groups=G2,G4"), show_progress=False)
    other = load_vae("tiny")
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(AhpaError, match="'encoder_hash' differs"):  # vanilla needs the same encoder, nothing more
        Trainer(cfg_for(tmp_path, "data.source=cache", f"data.path={cache}", "align.method=vanilla",
                        f"vae.path={tmp_path / 'other_vae'}"), show_progress=False)


def test_a_subset_of_the_cached_groups_and_vanilla_train_from_the_cache(cache, tmp_path):
    single = Trainer(cfg_for(tmp_path / "g4", "data.source=cache", f"data.path={cache}", "prior.groups=G4", "train.steps=1"), show_progress=False)
    assert set(single.source.group_shapes) == {"G4"} and set(single.source.next_batch()["features"]) == {"G4"}
    vanilla = Trainer(cfg_for(tmp_path / "v", "data.source=cache", f"data.path={cache}", "align.method=vanilla",
                              "prior.resample=bilinear", "train.steps=1"), show_progress=False)  # features unused: no refusal
    assert "features" not in vanilla.source.next_batch()


def test_channel_stats_normalisation_comes_from_the_cache(cache, tmp_path):
    src = build_source(cfg_for(tmp_path, "data.source=cache", f"data.path={cache}", "vae.latent_norm=channel_stats"),
                       device="cpu", rank=0, world=1, per_rank=8)
    stats = json.loads((cache / "manifest.json").read_text())["latent_stats"]
    torch.testing.assert_close(src.scale, 1 / torch.tensor(stats["std"]))
    torch.testing.assert_close(src.shift, torch.tensor(stats["mean"]))
    with pytest.raises(AhpaError, match="channel_stats needs"):
        Trainer(cfg_for(tmp_path, "vae.latent_norm=channel_stats"), show_progress=False)


def test_demo_writes_its_outputs(tmp_path):
    import argparse

    args = argparse.Namespace(out=str(tmp_path / "demo"), method="ahpa", no_resume=False,
                              overrides=["train.steps=3", "train.global_batch=8", "train.grid_steps=2"])
    assert run_demo(args) == 0
    out = tmp_path / "demo"
    for name in ("config.yaml", "samples_step0.png", "samples.png", "router.png", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["method"] == "ahpa" and metrics["alignment_parameters"] > 0
    assert 0 <= metrics["router_max_deviation_from_uniform"] < 2
    assert len(list((out / "checkpoints").glob("[0-9]*"))) == 1
    # the demo's default really is AHPA on the toy set, and --method vanilla switches alignment off
    assert demo_config(str(out), "ahpa", []).align.method == "ahpa"
    assert demo_config(str(out), "vanilla", []).align.method == "vanilla"
    assert metrics["stop_reason"].startswith("trained 3 steps") and "reached the step cap train.steps=3" in metrics["stop_reason"]


def test_demo_trains_to_its_budget_with_a_step_cap(tmp_path, capsys):
    """The demo's defaults: the time budget and the step cap of ahpa/demo.py; an override of either wins;
    a run stopped by the budget says so and how far it got."""
    from ahpa.demo import BUDGET_MINUTES, STEP_CAP, stop_reason

    cfg = demo_config(str(tmp_path), "ahpa", [])
    assert (cfg.train.max_minutes, cfg.train.steps) == (BUDGET_MINUTES["class"], STEP_CAP["class"])
    t2i = demo_config(str(tmp_path), "ahpa", [], task="t2i", minutes=1.5)
    assert (t2i.train.max_minutes, t2i.train.steps) == (1.5, STEP_CAP["t2i"])
    mine = demo_config(str(tmp_path), "ahpa", ["train.max_minutes=0.5", "train.steps=7"], minutes=9)
    assert (mine.train.max_minutes, mine.train.steps) == (0.5, 7)
    line = stop_reason({"steps": 1234, "stopped_early": True, "train_seconds": 180.2}, cfg, start_step=1000)
    assert line.startswith("trained 234 steps (to step 1234 of the cap train.steps=5000) in 180 s")
    assert "time budget train.max_minutes=3" in line and "rerun" in line


def test_latent_normalisation_round_trip():
    from ahpa.priors.base import denormalize_latent, normalize_latent

    x = torch.randn(2, 4, 3, 3)
    z = normalize_latent(x, 0.18215)
    torch.testing.assert_close(z, x * 0.18215)
    scale, shift = [1.0, 2.0, 0.5, 4.0], [0.1, -0.2, 0.3, 0.0]
    z = normalize_latent(x, scale, shift)
    torch.testing.assert_close(z[:, 1], (x[:, 1] + 0.2) * 2.0)  # channel 1 uses its own statistics
    torch.testing.assert_close(denormalize_latent(z, scale, shift), x)
