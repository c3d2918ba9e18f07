"""Issue 19 item 3: every weights file says what sampling needs (and a full disk while saving one keeps the previous
checkpoint); the other tracebacks and silent inputs of item 4 are in tests/test_silent_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from test_reliability import error_line

from ahpa import checkpointing
from ahpa.build import weights_meta
from ahpa.checkpointing import latest_checkpoint, verify_checkpoint
from ahpa.cli import main as cli_main
from ahpa.config import load_config
from ahpa.errors import AhpaError
from ahpa.generate.command import sampling_vae
from ahpa.generate.engine import latents_to_vae
from ahpa.models.sit import SIT_CONFIGS
from ahpa.priors.vae import vae_weights_sha256
from ahpa.runs import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy.yaml"
MICRO = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}
TRAIN = ["model.name=SiT-Micro/2", "train.global_batch=4", "train.grid_steps=1", "train.max_minutes=0", "train.log_every=1",
         "train.ckpt_every=1", "train.sample_every=0"]


@pytest.fixture(scope="module", autouse=True)
def micro_sit():
    SIT_CONFIGS["SiT-Micro/2"] = dict(MICRO)
    yield
    del SIT_CONFIGS["SiT-Micro/2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main(["train", "--config", str(TOY), "--out", str(out), *TRAIN, "train.steps=1"]) == 0
    return out


def meta_of(path: Path) -> dict | None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["ahpa_meta"]) if "ahpa_meta" in metadata else None


# ---------------------------------------------------------------------- 3. self-describing weights
def test_every_weights_file_carries_what_sampling_needs(run):
    ckpt = latest_checkpoint(run)
    model, ema = meta_of(ckpt / "model.safetensors"), meta_of(ckpt / "ema.safetensors")
    assert model == ema
    assert model["model"] == "SiT-Micro/2" and model["input_size"] == 8 and model["in_channels"] == 4
    assert model["vae"] == "tiny" and model["vae_sha256"] == vae_weights_sha256("tiny") and model["latent_norm"] == "scale"
    assert model["num_classes"] == 10 and model["scaling_factor"] != 0.18215  # the tiny VAE's own scale


def test_online_weights_sample_with_the_runs_scale_not_sd_vae(run):
    """Before: model.safetensors had no meta, so `sample` decoded its latents with 0.18215 and SD-VAE."""
    _, meta = load_backbone(latest_checkpoint(run) / "model.safetensors")
    assert meta["vae"] == "tiny" and meta["scaling_factor"] == pytest.approx(meta_of(latest_checkpoint(run) / "ema.safetensors")["scaling_factor"])
    z = torch.ones(1, 4, 8, 8)
    assert torch.allclose(latents_to_vae(z, meta), z / meta["scaling_factor"])


def test_channel_stats_meta_carries_the_per_channel_shift_and_scale():
    cfg = load_config(TOY, ["vae.latent_norm=channel_stats"])
    meta = weights_meta(cfg, (4, 8, 8), (torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.5, 0, 0, 0])))
    assert meta["latent_scale"] == [1.0, 2, 3, 4] and meta["latent_shift"] == [0.5, 0, 0, 0] and meta["scaling_factor"] is None
    z = torch.ones(1, 4, 2, 2)
    assert torch.allclose(latents_to_vae(z, meta)[0, :, 0, 0], torch.tensor([1.5, 0.5, 1 / 3, 0.25]))


def test_sample_refuses_a_contradicting_vae(run, tmp_path, capsys):
    vae = tmp_path / "other_vae"
    from helpers import small_vae

    small_vae().save_pretrained(vae)
    line = error_line(capsys, "sample", "--ckpt", latest_checkpoint(run), "--out", tmp_path / "s", "--num", "2",
                      "--steps", "1", "--vae", vae)
    assert f"--vae {vae} contradicts" in line and "tiny" in line and not (tmp_path / "s").exists()


def test_vae_rule_same_weights_and_old_files():
    meta = {"vae": "tiny", "vae_sha256": vae_weights_sha256("tiny"), "latent_norm": "scale"}
    assert sampling_vae(None, meta, "x") == "tiny"
    assert sampling_vae(str(ROOT / "ahpa" / "assets" / "tiny_vae"), meta, "x").endswith("tiny_vae")  # same weights
    old = {"vae": "tiny", "scaling_factor": 0.9}  # written before issue 19: --vae wins as before
    assert sampling_vae("stabilityai/sd-vae-ft-mse", old, "x") == "stabilityai/sd-vae-ft-mse"
    with pytest.raises(AhpaError, match="contradicts"):
        sampling_vae("stabilityai/sd-vae-ft-mse", meta, "x")


# ---------------------------------------------------------------------- a full disk while saving weights
def test_disk_full_as_a_library_error_is_one_line_and_the_previous_checkpoint_loads(run, tmp_path, capsys, monkeypatch):
    import shutil

    out = shutil.copytree(run, tmp_path / "run")
    before = latest_checkpoint(out)

    def full(*a, **k):  # what safetensors raises on a full disk: not an OSError
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(checkpointing, "save_file", full)
    line = error_line(capsys, "train", "--config", TOY, "--out", out, *TRAIN, "train.steps=2")
    assert "No space left on device" in line and str(before) in line
    assert latest_checkpoint(out) == before and verify_checkpoint(before) == (True, None)
    assert not list((out / "checkpoints").glob(".*.tmp"))
    load_backbone(before)  # loads


def test_metadata_roundtrip_keeps_old_files_working(run, tmp_path):
    """A weights file without meta (an older ahpa's model.safetensors) still loads as before."""
    ckpt = latest_checkpoint(run)
    plain = tmp_path / "model.safetensors"
    save_file(load_file(ckpt / "model.safetensors"), plain)
    model, meta = load_backbone(plain, model_name="SiT-Micro/2")
    assert meta["model"] == "SiT-Micro/2" and "vae" not in meta
