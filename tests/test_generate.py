"""``ahpa sample``: part files, resume, rank splitting and assembly into an ADM .npz."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import ahpa.priors.vae
from ahpa.errors import AhpaError
from ahpa.evaluation.npz import open_npz_images
from ahpa.generate.command import register
from ahpa.generate.engine import assemble_samples, generate_samples, latents_to_vae, samples_path
from ahpa.models.checkpoints import save_ema_safetensors
from ahpa.models.sit import build_sit

NUM, BATCH = 13, 4
META = dict(model="SiT-T/4", input_size=8, in_channels=4, num_classes=10, learn_sigma=False, vae="tiny",
            scaling_factor=0.5, latent_shift=None, latent_scale=None, time_convention="repa")
SAMPLER = dict(mode="sde", steps=4, cfg_scale=2.0, guidance_interval=(0.0, 0.6))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = build_sit("SiT-T/4", input_size=8, num_classes=10)
    for p in model.parameters():  # random, not the zero-initialised output of a fresh SiT
        nn.init.normal_(p, std=0.05)
    return model.eval()


def decode(x: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE decoder: latents -> images in [-1, 1]."""
    return torch.tanh(x[:, :3])


def run(model, out, rank=0, world=1, decode_fn=decode, **kwargs):
    return generate_samples(model, META, decode_fn, out, NUM, BATCH, SAMPLER, seed=3, rank=rank, world=world, **kwargs)


def load(path):
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def part_indices(out):
    found = []
    for part in sorted((out / "parts").glob("part_*.npz")):
        with np.load(part) as data:
            found.extend(data["indices"].tolist())
    return found


def test_uninterrupted_run_writes_adm_npz(model, tmp_path):
    path = run(model, tmp_path, write_png=True)
    assert path == samples_path(tmp_path, NUM)
    images = open_npz_images(path)  # C's validating reader: arr_0, uint8, NHWC, RGB
    assert images.shape == (NUM, 8, 8, 3)
    arr, labels = load(path)
    np.testing.assert_array_equal(labels, np.arange(NUM) % 10)
    assert len(np.unique(arr.reshape(NUM, -1), axis=0)) == NUM  # every sample its own noise
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "000005.png")), arr[5])
    assert sorted(part_indices(tmp_path)) == list(range(NUM))


def test_resume_after_crash_and_deletions_matches_uninterrupted(model, tmp_path):
    reference, _ = load(run(model, tmp_path / "ref"))

    out = tmp_path / "resumed"
    calls = []

    def crashing_decode(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return decode(x)

    with pytest.raises(KeyboardInterrupt):
        run(model, out, decode_fn=crashing_decode)
    assert sorted(part_indices(out)) == list(range(8))  # two finished batches survive

    path = run(model, out)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.npz")}
    samples_path(out, NUM).unlink()
    parts = sorted((out / "parts").glob("*.npz"))
    for part in parts[1::2]:  # lose some parts as well
        part.unlink()
        del kept[part.name]
    assert run(model, out) == path
    indices = part_indices(out)
    assert sorted(indices) == list(range(NUM))  # no duplicates, nothing missing
    assert all((out / "parts" / name).stat().st_mtime_ns == t for name, t in kept.items())  # not redone
    np.testing.assert_array_equal(load(path)[0], reference)


def test_two_ranks_equal_one_process(model, tmp_path):
    single, single_labels = load(run(model, tmp_path / "one"))
    out = tmp_path / "two"
    assert run(model, out, rank=0, world=2) is None  # rank 1's half is still missing
    assert run(model, out, rank=1, world=2) is None  # only rank 0 assembles
    assert sorted(part_indices(out)) == list(range(NUM))
    split, split_labels = load(assemble_samples(out, NUM))
    assert split.tobytes() == single.tobytes() and split_labels.tobytes() == single_labels.tobytes()
    # a later run with 3 processes finds everything done and just assembles
    assert run(model, out, rank=0, world=3) == samples_path(out, NUM)


def test_other_settings_in_same_directory_are_refused(model, tmp_path):
    run(model, tmp_path)
    with pytest.raises(AhpaError, match="seed"):
        generate_samples(model, META, decode, tmp_path, NUM, BATCH, SAMPLER, seed=4)
    with pytest.raises(AhpaError, match="sampler"):
        generate_samples(model, META, decode, tmp_path, NUM, BATCH, dict(SAMPLER, steps=5), seed=3)


def test_assemble_reports_missing_samples(model, tmp_path):
    run(model, tmp_path, rank=0, world=2)
    with pytest.raises(AhpaError, match="6 of 13 samples are missing"):
        assemble_samples(tmp_path, NUM)


def test_latents_to_vae_undoes_the_normalisation():
    z = torch.ones(2, 4, 1, 1)
    torch.testing.assert_close(latents_to_vae(z, {"scaling_factor": 0.18215, "latent_shift": None}), z / 0.18215)
    meta = {"scaling_factor": 0.18215, "latent_scale": [1.0, 2.0, 4.0, 0.5], "latent_shift": [0.0, 1.0, -1.0, 2.0]}
    expected = torch.tensor([1.0, 1.5, -0.75, 4.0]).view(1, 4, 1, 1).expand(2, 4, 1, 1)
    torch.testing.assert_close(latents_to_vae(z, meta), expected)


class FakeVAE(nn.Module):
    dtype = torch.float32

    def decode(self, x):
        return SimpleNamespace(sample=decode(x))


def test_cli_samples_from_a_checkpoint(model, tmp_path, monkeypatch):
    save_ema_safetensors(model, tmp_path / "ema.safetensors", META)
    monkeypatch.setattr(ahpa.priors.vae, "load_vae", lambda path, device=None, dtype=torch.float32: FakeVAE())
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out"), "--num", "5",
                              "--batch", "2", "--steps", "3", "--mode", "ode", "--method", "heun", "--seed", "1"])
    assert args.func(args) == 0
    arr, labels = load(samples_path(tmp_path / "out", 5))
    assert arr.shape == (5, 8, 8, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    expected = generate_samples(model, META, decode, tmp_path / "direct", 5, 5,
                                dict(mode="ode", method="heun", steps=3, cfg_scale=1.0, guidance_interval=(0.0, 1.0),
                                     path="linear"), seed=1)
    np.testing.assert_array_equal(arr, load(expected)[0])


def test_assembly_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    """Images are gathered in a memory map and streamed into the archive: peak memory ~ one part file."""
    import tracemalloc

    from ahpa.generate.engine import assemble_samples

    n, per = 1600, 100  # 79 MB of images: well above numpy's 16 MiB write buffer
    rng = np.random.default_rng(0)
    (tmp_path / "parts").mkdir()
    for s in range(0, n, per):
        idx = np.arange(s, s + per)
        np.savez(tmp_path / "parts" / f"part_{s:08d}_{per}.npz", arr_0=rng.integers(0, 255, (per, 128, 128, 3), dtype=np.uint8),
                 indices=idx, labels=idx % 10)
    tracemalloc.start()
    try:
        path = assemble_samples(tmp_path, n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total = n * 128 * 128 * 3
    assert peak < total / 3, (peak, total)  # holding all images would need >= total
    with np.load(path) as data:
        assert data["arr_0"].shape == (n, 128, 128, 3) and (data["arr_1"] == np.arange(n) % 10).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts", f"samples_{n}.npz"]  # no gather file left
