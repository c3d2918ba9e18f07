"""data.source=repa (issue 18 item 5): a folder in REPA's preprocessed layout, written here with the tiny VAE, trains
one step with the latents of its .npy files and features equal to a direct encoder pass; a count, name, shape or
label mismatch is refused with one line naming the first offending file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ahpa.build import build_source
from ahpa.config import load_config
from ahpa.data.repa import pairing_key
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.priors.hierarchy import HierarchicalVAEPrior
from ahpa.priors.vae import load_vae
from ahpa.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"
N = 12  # images; image k gets class k, so a batch's labels say which files it holds


@pytest.fixture(scope="module")
def repa_data(tmp_path_factory) -> Path:
    """DATA/images/00000/img0000000k.png, DATA/vae-sd/00000/img-mean-std-0000000k.npy (the tiny VAE's [mean, std],
    float32 [8, 8, 8] at 32 px) and DATA/vae-sd/dataset.json, as REPA's convert and encode steps name them."""
    root = tmp_path_factory.mktemp("repa") / "DATA"
    digits, _ = load_toy("train", resolution=32)
    vae = load_vae("tiny")
    labels = []
    for k in range(N):
        (root / "images" / "00000").mkdir(parents=True, exist_ok=True)
        (root / "vae-sd" / "00000").mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits[k].permute(1, 2, 0).numpy()).save(root / "images" / "00000" / f"img{k:08d}.png")
        with torch.no_grad():
            posterior = vae.encode(digits[k : k + 1].float() / 127.5 - 1).latent_dist
        np.save(root / "vae-sd" / "00000" / f"img-mean-std-{k:08d}.npy", torch.cat([posterior.mean, posterior.std], 1)[0].numpy())
        labels.append([f"00000/img-mean-std-{k:08d}.npy", k])
    (root / "images" / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img{k:08d}.png", k] for k in range(N)]}))
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def cfg(data: Path, out: Path, *extra: str):
    return load_config(TOY, [f"train.out={out}", "data.source=repa", f"data.path={data}", "data.hflip=false", "data.num_workers=0",
                             "train.global_batch=4", f"model.num_classes={N}", "train.log_every=1", "train.ckpt_every=0",
                             "train.grid_steps=2", "train.max_minutes=0", *extra])


def test_batch_latents_are_the_npy_files_and_features_a_direct_pass(repa_data, tmp_path):
    source = build_source(cfg(repa_data, tmp_path), device="cpu")
    assert source.latent_shape == (4, 8, 8) and source.num_classes == N
    source.start(0)
    batch = source.next_batch()
    ids = batch["y"].tolist()
    assert len(ids) == 4 and len(set(ids)) == 4
    files = [np.load(repa_data / "vae-sd" / "00000" / f"img-mean-std-{k:08d}.npy") for k in ids]
    assert torch.equal(batch["latent_mean"], torch.from_numpy(np.stack([f[:4] for f in files])))
    assert torch.equal(batch["latent_std"], torch.from_numpy(np.stack([f[4:] for f in files])))
    pngs = torch.stack([torch.from_numpy(np.array(Image.open(repa_data / "images" / "00000" / f"img{k:08d}.png"))).permute(2, 0, 1)
                        for k in ids])
    direct = HierarchicalVAEPrior(load_vae("tiny"), groups=("G3", "G4"), grid=source.grid)(pngs.float() / 127.5 - 1)
    assert set(batch["features"]) == {"G3", "G4"}
    for g in ("G3", "G4"):
        torch.testing.assert_close(batch["features"][g], direct.features[g], rtol=1e-6, atol=1e-6)
    # REPA's training latent: (mean + std * eps) * 0.18215-style scale, here the tiny VAE's own scale
    eps = torch.randn_like(batch["latent_mean"])
    expected = (batch["latent_mean"] + batch["latent_std"] * eps) * source.scale
    torch.testing.assert_close(source.sample_latent(batch, eps), expected, rtol=0, atol=0)


def test_trains_one_step(repa_data, tmp_path):
    metrics = Trainer(cfg(repa_data, tmp_path, "train.steps=1"), show_progress=False).run()
    assert metrics["steps"] == 1 and np.isfinite(metrics["history"][-1]["loss"])
    assert metrics["history"][-1]["loss_align"] < 0  # the alignment branch ran on the on-the-fly features


def refusal(data: Path, tmp_path: Path) -> str:
    with pytest.raises(AhpaError) as err:
        build_source(cfg(data, tmp_path / "run"), device="cpu")
    message = str(err.value)
    assert "\n" not in message
    return message


def broken_copy(repa_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "DATA"
    shutil.copytree(repa_data, copy)
    return copy


def test_count_mismatch_names_the_file_without_a_partner(repa_data, tmp_path):
    data = broken_copy(repa_data, tmp_path)
    (data / "vae-sd" / "00000" / f"img-mean-std-{N - 1:08d}.npy").unlink()
    message = refusal(data, tmp_path)
    assert f"images/00000/img{N - 1:08d}.png has no partner" in message and f"{N} images but {N - 1} .npy" in message


def test_name_mismatch_names_the_first_unpaired_image(repa_data, tmp_path):
    data = broken_copy(repa_data, tmp_path)
    (data / "vae-sd" / "00000" / "img-mean-std-00000005.npy").unlink()
    (data / "images" / "00000" / f"img{N - 1:08d}.png").unlink()  # same counts, but 5 is paired with 6's .npy
    message = refusal(data, tmp_path)
    assert message.startswith("images/00000/img00000005.png is paired by sorted order with vae-sd/00000/img-mean-std-00000006.npy")


def test_shape_mismatch_names_the_file(repa_data, tmp_path):
    data = broken_copy(repa_data, tmp_path)
    np.save(data / "vae-sd" / "00000" / "img-mean-std-00000003.npy", np.zeros((8, 4, 4), np.float32))
    message = refusal(data, tmp_path)
    assert message.startswith("vae-sd/00000/img-mean-std-00000003.npy holds float32 (8, 4, 4), not the float (8, 8, 8)")
    # the same folder read at another resolution: the first file already has the wrong latent shape
    with pytest.raises(AhpaError, match=r"vae-sd/00000/img-mean-std-00000000.npy holds float32 \(8, 8, 8\), not the float \(8, 16, 16\)"):
        build_source(cfg(repa_data, tmp_path / "r", "data.resolution=64"), device="cpu")


def test_missing_label_names_the_file(repa_data, tmp_path):
    data = broken_copy(repa_data, tmp_path)
    labels = json.loads((data / "vae-sd" / "dataset.json").read_text())
    labels["labels"] = labels["labels"][:2] + labels["labels"][3:]
    (data / "vae-sd" / "dataset.json").write_text(json.dumps(labels))
    assert refusal(data, tmp_path).startswith("vae-sd/00000/img-mean-std-00000002.npy has no label")


def test_flips_are_refused_and_pairing_keys():
    with pytest.raises(AhpaError, match="data.hflip=false"):
        load_config(TOY, ["data.source=repa", "data.path=/x", "data.hflip=true"])
    assert pairing_key("00001/img00001234.png") == pairing_key("00001/img-mean-std-00001234.npy") == ("00001", "00001234")
    assert pairing_key("00001/img00001234.png") != pairing_key("00000/img-mean-std-00001234.npy")
