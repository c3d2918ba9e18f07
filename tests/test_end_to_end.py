"""End to end on the toy config: zero inference cost of alignment, and train -> sample -> evaluate.

docs/design.md section 4: at inference the head, the router and the VAE encoder are not run
(sampling costs what vanilla SiT costs) and an exported checkpoint omits them.
docs/design.md section 7: ``ahpa sample`` writes an ADM ``.npz`` that ``ahpa evaluate`` reads.
Two 1-step toy runs (AHPA and vanilla) are shared by every test of this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from ahpa import build, cli
from ahpa.checkpointing import latest_checkpoint
from ahpa.config import load_config
from ahpa.data.toy import load_toy, toy_reference_npz
from ahpa.evaluation import command
from ahpa.evaluation.inception import InceptionFeatures, random_state_dict
from ahpa.evaluation.metrics import frechet_distance
from ahpa.evaluation.npz import save_npz_atomic, to_uint8
from ahpa.generate.engine import latents_to_vae
from ahpa.runs import load_backbone as load_model_for_sampling
from ahpa.models.sit import build_sit
from ahpa.priors.vae import load_vae
from ahpa.sampling import noise_for_indices, sample
from ahpa.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Trainer]:
    """One training step of the toy config with AHPA and with ``align.method=vanilla``.

    The data are 8 images per class of the toy train split: the trainer encodes its
    whole in-memory data set once, and 1612 images cost seconds that one step does not need.
    """
    root = tmp_path_factory.mktemp("runs")
    images, labels = load_toy("train")
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in range(10)])
    trainers = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "load_toy", lambda split="train", resolution=32: (images[keep], labels[keep]))
        for method in ("ahpa", "vanilla"):
            cfg = load_config(TOY, [
                f"train.out={root / method}", f"align.method={method}", "train.steps=1", "train.global_batch=8",
                "train.ckpt_every=0", "train.grid_steps=1", "train.max_minutes=0", "train.log_every=1",
            ])
            trainers[method] = Trainer(cfg, show_progress=False)
            assert trainers[method].source.num_classes == 10 and len(trainers[method].source.labels) == 80
            assert trainers[method].run()["steps"] == 1
    assert (trainers["ahpa"].objective is not None) and (trainers["vanilla"].objective is None)
    return trainers


def flops(fn, *args, **kwargs) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_sampling_flops_equal_vanilla_and_alignment_flops_are_visible_in_training(runs):
    # Sampling: the AHPA and the vanilla checkpoints cost exactly what a plain SiT of that size costs.
    models = {m: load_model_for_sampling(latest_checkpoint(t.out)) for m, t in runs.items()}
    meta = models["ahpa"][1]
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    noise, y = noise_for_indices(range(4), 0, shape, "cpu"), torch.arange(4)
    sampled = {m: flops(sample, model, y, noise, steps=2) for m, (model, _) in models.items()}
    plain = build_sit(meta["model"], meta["input_size"], in_channels=meta["in_channels"], num_classes=meta["num_classes"]).eval()
    with torch.no_grad():
        one_forward, _ = flops(plain, noise, torch.full((4,), 0.5), y)
    assert one_forward > 0
    assert sampled["ahpa"] == sampled["vanilla"]
    assert sampled["ahpa"][0] == 2 * one_forward  # two Euler steps, one network evaluation each

    # Training: one forward of the training module; AHPA adds exactly the conv3 head's FLOPs
    # (3x3 conv, hidden width -> summed prior channels) plus the router's matmuls.
    counted = {}
    for method, trainer in runs.items():
        trainer.source.start(0)
        batch = trainer.source.next_batch()
        x0, t, eps, drop = trainer._draws(0, batch)
        with torch.no_grad():
            counted[method] = flops(trainer.module, x0, batch["y"], t, eps, drop, batch.get("features"))
    (ahpa_total, ahpa_ops), (vanilla_total, vanilla_ops) = counted["ahpa"], counted["vanilla"]
    sit = runs["ahpa"].sit
    out_channels = sum(c for _, c in runs["ahpa"].source.group_shapes.values())
    head = 2 * len(x0) * sit.grid**2 * out_channels * sit.hidden_size * 9
    assert ahpa_ops["aten.convolution"] - vanilla_ops["aten.convolution"] == head
    assert ahpa_total > vanilla_total + head  # the router's matmuls on top of the head
    assert vanilla_total > 0


def test_exported_ema_holds_plain_sit_weights_only(runs):
    for method, trainer in runs.items():
        ckpt = latest_checkpoint(trainer.out)
        ema = load_file(ckpt / "ema.safetensors")
        meta = load_model_for_sampling(ckpt)[1]
        plain = build_sit(meta["model"], meta["input_size"], in_channels=meta["in_channels"], num_classes=meta["num_classes"])
        assert set(ema) == set(plain.state_dict()), method
        plain.load_state_dict(ema, strict=True)
        torch.testing.assert_close(plain.state_dict(), trainer.ema.state_dict(), rtol=0, atol=0)
    objective = load_file(latest_checkpoint(runs["ahpa"].out) / "objective.safetensors")
    assert objective and not set(objective) & set(ema)  # the alignment weights live beside, not inside
    assert not (latest_checkpoint(runs["vanilla"].out) / "objective.safetensors").exists()


def test_sample_then_evaluate(runs, tmp_path, monkeypatch):
    ckpt = latest_checkpoint(runs["ahpa"].out)
    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(ckpt), "--out", str(out), "--num", "12", "--batch", "6", "--steps", "2", "--seed", "5"]
    assert cli.main(argv) == 0
    npz = out / "samples_12.npz"
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(labels, np.arange(12) % 10)  # class i % num_classes: balanced
    assert images.std() > 1  # not a constant image

    # The same pipeline by hand: noise from (seed, index), the sampler, the latent de-normalisation, the tiny VAE.
    model, meta = load_model_for_sampling(ckpt)
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    latents = sample(model, torch.arange(12) % 10, noise_for_indices(range(12), 5, shape, "cpu"), steps=2)
    with torch.no_grad():
        expected = to_uint8(load_vae("tiny").decode(latents_to_vae(latents, meta)).sample)
    diff = np.abs(expected.astype(int) - images.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # batch 12 vs 6: at most float rounding at a uint8 boundary

    # Rerunning the same command does no work and leaves the output untouched.
    before = (npz.stat().st_mtime_ns, npz.read_bytes(), sorted(p.name for p in (out / "parts").iterdir()))
    monkeypatch.setattr("ahpa.generate.engine.sample", lambda *a, **k: pytest.fail("a finished run sampled again"))
    assert cli.main(argv) == 0
    assert (npz.stat().st_mtime_ns, npz.read_bytes(), sorted(p.name for p in (out / "parts").iterdir())) == before
    monkeypatch.undo()

    # Evaluate against toy reference images: 2 per class of the held-out split (Inception on CPU is slow).
    with np.load(toy_reference_npz(tmp_path / "toy_heldout.npz")) as data:
        held_images = data["arr_0"]
    held_labels = load_toy("heldout")[1].numpy()
    assert held_images.shape == (len(held_labels), 32, 32, 3)
    keep = np.concatenate([np.flatnonzero(held_labels == c)[:2] for c in range(10)])
    ref = save_npz_atomic(tmp_path / "ref.npz", held_images[keep])
    calls = []

    def low_dim_frechet(mu1, sigma1, mu2, sigma2):  # a 2048-d sqrtm costs minutes on a loaded core
        calls.append(mu1.shape[0])
        return frechet_distance(mu1[:8], sigma1[:8, :8], mu2[:8], sigma2[:8, :8])

    monkeypatch.setattr(command, "frechet_distance", low_dim_frechet)
    extractor = InceptionFeatures(random_state_dict(seed=0), source="random init (test)")
    result = command.evaluate(npz, ref, extractor=extractor, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [2048, 2023]  # FID on pool3, sFID on the spatial features
    assert result["num_samples"] == 12 and result["num_reference"] == 20 and result["resolution"] == [32, 32]
    for key in ("fid", "sfid", "precision", "recall", "inception_score"):
        assert math.isfinite(result[key]), key
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["weights_source"] == "random init (test)" and "50000" in result["warnings"][0]

