"""Checkpoint loading (docs/design.md section 1): published SiT / REPA layouts, ema.safetensors, errors."""

import argparse
import os
import pathlib

import pytest
import torch

from ahpa.errors import AhpaError
from ahpa.models.checkpoints import convert_state_dict, infer_architecture, save_ema_safetensors
from ahpa.runs import load_backbone, read_meta
from ahpa.models.sit import SiT, build_sit
from helpers import randomised


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sit(name: str = "SiT-T/2", seed: int = 0, **kwargs) -> SiT:
    """A model whose every weight (adaLN-Zero and output layer included) is random."""
    return randomised(build_sit(name, **{"input_size": 8, "num_classes": 10, **kwargs}), seed=seed).eval()


def assert_same_outputs(a: SiT, b: SiT) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, a.in_channels, a.input_size, a.input_size, generator=gen)
    t, y = torch.rand(2, generator=gen), torch.tensor([3, a.y_embedder.embedding_table.num_embeddings - 1])
    with torch.no_grad():
        out = a(x, t, y)
        assert out.abs().max() > 0
        assert torch.equal(out, b(x, t, y))


def repa_projectors(hidden: int, z_dim: int = 16) -> dict:
    """REPA's projector MLP keys (Linear, SiLU, Linear, SiLU, Linear)."""
    shapes = {"0": (32, hidden), "2": (32, 32), "4": (z_dim, 32)}
    out = {}
    for i, (o, n) in shapes.items():
        out[f"projectors.0.{i}.weight"], out[f"projectors.0.{i}.bias"] = torch.randn(o, n), torch.randn(o)
    return out


def test_original_sit_layout_loads(tmp_path):
    model = random_sit(learn_sigma=True)
    path = tmp_path / "SiT-T-2-64x64.pt"
    torch.save(model.state_dict(), path)
    loaded, meta = load_backbone(path)
    assert_same_outputs(model, loaded)
    assert not loaded.training and loaded.learn_sigma
    assert meta["model"] == "SiT-T/2" and meta["time_convention"] == "sit"
    assert (meta["input_size"], meta["in_channels"], meta["num_classes"]) == (8, 4, 10)


def test_repa_layout_takes_ema_and_drops_projectors(tmp_path):
    ema, online = random_sit(seed=1), random_sit(seed=2)
    ckpt = {
        "model": {**online.state_dict(), **repa_projectors(192)},
        "ema": {**ema.state_dict(), **repa_projectors(192)},
        "opt": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(model="SiT-T/2", encoder_depth=2, proj_coeff=0.5),
        "steps": 4000,
    }
    path = tmp_path / "0004000.pt"
    torch.save(ckpt, path)
    loaded, meta = load_backbone(path)
    assert_same_outputs(ema, loaded)
    assert meta["time_convention"] == "repa" and not meta["learn_sigma"]


def test_wrapper_prefixes_and_legacy_decoder_blocks():
    model = random_sit()
    sd = model.state_dict()
    legacy = {}
    for key, value in sd.items():  # REPA legacy: blocks 0-1 are encoder, the rest decoder_blocks 0-3
        if key.startswith("blocks.") and int(key.split(".")[1]) >= 2:
            parts = key.split(".")
            key = ".".join(["decoder_blocks", str(int(parts[1]) - 2), *parts[2:]])
        legacy["module._orig_mod." + key] = value
    converted = convert_state_dict({"ema": legacy})
    assert converted.keys() == sd.keys()
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


def test_infer_architecture_from_shapes():
    with torch.device("meta"):
        xl = build_sit("SiT-XL/2", input_size=64, learn_sigma=True).state_dict()
        s4 = build_sit("SiT-S/4", input_size=32, in_channels=16, num_classes=10).state_dict()
    assert infer_architecture(xl) == dict(model="SiT-XL/2", depth=28, hidden_size=1152, patch_size=2, in_channels=4,
                                          input_size=64, num_classes=1000, embedding_rows=1001, learn_sigma=True)
    arch = infer_architecture(s4)
    assert (arch["model"], arch["input_size"], arch["in_channels"], arch["num_classes"]) == ("SiT-S/4", 32, 16, 10)
    assert not arch["learn_sigma"]


def test_name_disagreeing_with_shapes_names_the_tensor(tmp_path):
    path = tmp_path / "sit.pt"
    torch.save(random_sit().state_dict(), path)
    with pytest.raises(AhpaError) as err:
        load_backbone(path, model_name="SiT-T/4")
    msg = str(err.value)
    assert "x_embedder.proj.weight" in msg and "[192, 4, 2, 2]" in msg and "[192, 4, 4, 4]" in msg
    assert "SiT-T/2" in msg and "depth=6" in msg
    with pytest.raises(AhpaError, match="y_embedder.embedding_table.weight"):
        load_backbone(path, num_classes=20)


def test_unknown_shapes_describe_the_checkpoint(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save(SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10).state_dict(), path)
    with pytest.raises(AhpaError, match=r"no known SiT model.*depth=2, hidden_size=64, patch_size=2"):
        load_backbone(path)


def test_not_a_sit_state_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(AhpaError, match="not a SiT state dict.*encoder.weight"):
        load_backbone(path)


def test_pickled_objects_are_refused_with_advice(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"ema": random_sit().state_dict(), "args": pathlib.PurePosixPath("runs/x")}, path)
    with pytest.raises(AhpaError, match="weights_only=True.*re-save"):
        load_backbone(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(AhpaError, match="nothing.pt"):
        load_backbone(tmp_path / "nothing.pt")
    with pytest.raises(AhpaError, match="ema.safetensors"):
        read_meta(tmp_path)


def test_ema_safetensors_roundtrip(tmp_path):
    model = random_sit("SiT-T/4", num_classes=5)
    meta = dict(model="SiT-T/4", input_size=8, in_channels=4, num_classes=5, learn_sigma=False, vae="tiny",
                scaling_factor=0.5, latent_shift=[0.0] * 4, latent_scale=[1.0] * 4, time_convention="repa")
    step_dir = tmp_path / "checkpoints" / "0000100"
    step_dir.mkdir(parents=True)
    compiled_like = torch.nn.ModuleDict({"_orig_mod": model})  # keys as saved from a torch.compile'd model
    save_ema_safetensors(compiled_like, step_dir / "ema.safetensors", meta)
    assert os.listdir(step_dir) == ["ema.safetensors"]  # no temporary left behind
    assert read_meta(step_dir / "ema.safetensors") == meta
    loaded, loaded_meta = load_backbone(step_dir)
    assert loaded_meta == meta
    assert_same_outputs(model, loaded)


def test_meta_num_classes_wins_without_null_class(tmp_path):
    model = random_sit("SiT-T/8", num_classes=5, class_dropout=0.0)
    save_ema_safetensors(model, tmp_path / "ema.safetensors", dict(model="SiT-T/8", num_classes=5))
    loaded, meta = load_backbone(tmp_path / "ema.safetensors")
    assert loaded.num_classes == 5 and loaded.y_embedder.embedding_table.num_embeddings == 5
    assert meta["time_convention"] == "repa"
