"""Hierarchical VAE prior (docs/design.md section 2): registry, grouping, one-pass extraction, loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from huggingface_hub import constants as hf_constants

from ahpa.errors import AhpaError
from ahpa.priors import vae as vae_module
from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior, encoder_layers, layer_groups, resolve_grouping
from ahpa.priors.vae import encoder_hash, load_vae, vae_downsample_factor, vae_scaling_factor
from helpers import small_vae

# docs/design.md section 2 table, written out by hand: (module, C, H at a 256 input, group under 4/4).
SPEC_TABLE = [
    ("encoder.conv_in", 128, 256, "G1"),
    ("encoder.down_blocks.0.resnets.0", 128, 256, "G1"),
    ("encoder.down_blocks.0.resnets.1", 128, 256, "G1"),
    ("encoder.down_blocks.0.downsamplers.0", 128, 128, "G1"),
    ("encoder.down_blocks.1.resnets.0", 256, 128, "G2"),
    ("encoder.down_blocks.1.resnets.1", 256, 128, "G2"),
    ("encoder.down_blocks.1.downsamplers.0", 256, 64, "G2"),
    ("encoder.down_blocks.2.resnets.0", 512, 64, "G3"),
    ("encoder.down_blocks.2.resnets.1", 512, 64, "G3"),
    ("encoder.down_blocks.2.downsamplers.0", 512, 32, "G3"),
    ("encoder.down_blocks.3.resnets.0", 512, 32, "G3"),
    ("encoder.down_blocks.3.resnets.1", 512, 32, "G4"),
    ("encoder.mid_block.resnets.0", 512, 32, "G4"),
    ("encoder.mid_block.attentions.0", 512, 32, "G4"),
    ("encoder.mid_block.resnets.1", 512, 32, "G4"),
]


def sd_vae_architecture(device: str | None = None) -> AutoencoderKL:
    """diffusers' sd-vae-ft-ema config, randomly initialised."""
    with torch.device(device or "cpu"):
        return AutoencoderKL(**SD_VAE_CONFIG)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return small_vae()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def capture(vae: AutoencoderKL, paths: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Raw (pre-pooling) outputs of ``paths`` via test-owned hooks."""
    raw: dict[str, torch.Tensor] = {}
    handles = [
        vae.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: raw.__setitem__(p, o)) for p in paths
    ]
    return raw, handles


# --- registry and grouping -------------------------------------------------------------


def test_sd_vae_raw_shapes_match_spec_table():
    sd = sd_vae_architecture("meta")  # shapes only: no compute
    assert [l.path for l in encoder_layers(sd)] == [row[0] for row in SPEC_TABLE]
    raw, handles = capture(sd, [row[0] for row in SPEC_TABLE])
    sd.encode(torch.empty(1, 3, 256, 256, device="meta"))
    for h in handles:
        h.remove()
    for path, c, h, _ in SPEC_TABLE:
        assert tuple(raw[path].shape) == (1, c, h, h), path
    assert resolve_grouping(sd, "auto") == "sd_vae"
    expected = {g: [row[0] for row in SPEC_TABLE if row[3] == g] for g in ("G1", "G2", "G3", "G4")}
    assert layer_groups(sd) == expected


@pytest.mark.parametrize("split,g3,g4", [("4/4", 4, 4), ("2/6", 2, 6), ("6/2", 6, 2)])
@pytest.mark.parametrize("size", [256, 512])
def test_sd_vae_group_shapes_after_pooling(split, g3, g4, size):
    sd = sd_vae_architecture("meta")
    grid = size // 16  # /2 token grid on the /8 latent
    prior = HierarchicalVAEPrior(sd, groups=("G1", "G2", "G3", "G4"), grid=grid, split=split)
    out = prior(torch.empty(2, 3, size, size, device="meta"))
    expected = {"G1": (4, 128), "G2": (3, 256), "G3": (g3, 512), "G4": (g4, 512)}
    assert prior.group_shapes == expected
    assert {g: tuple(f.shape) for g, f in out.features.items()} == {
        g: (2, l, c, grid, grid) for g, (l, c) in expected.items()
    }
    assert out.latent_mean.shape == out.latent_std.shape == (2, 4, size // 8, size // 8)
    # The 512-channel layers: G3 takes the first `g3` of docs/design.md section 2, rows 8-15.
    assert prior.layers["G3"][-1].path == SPEC_TABLE[7 + g3 - 1][0]


def test_resolution_grouping_small_encoder(vae):
    assert resolve_grouping(vae) == "resolution"
    # Levels (2x downsamplings): 0 = 32 px, 1 = 16 px, 2 = 8 px for a 32 px input.  The
    # downsamplers keep the previous stage's width, so they stay with that stage.
    assert layer_groups(vae) == {
        "G2": ["encoder.conv_in", "encoder.down_blocks.0.resnets.0", "encoder.down_blocks.0.downsamplers.0"],
        "G3": ["encoder.down_blocks.1.resnets.0", "encoder.down_blocks.1.downsamplers.0"],
        "G4": [
            "encoder.down_blocks.2.resnets.0",
            "encoder.mid_block.resnets.0",
            "encoder.mid_block.attentions.0",
            "encoder.mid_block.resnets.1",
        ],
    }
    assert HierarchicalVAEPrior(vae, groups=("G2", "G3", "G4")).group_shapes == {
        "G2": (3, 32),
        "G3": (2, 64),
        "G4": (4, 128),
    }
    with pytest.raises(AhpaError, match="G1"):
        HierarchicalVAEPrior(vae, groups=("G1",))
    with pytest.raises(AhpaError, match="sd_vae"):
        layer_groups(vae, grouping="sd_vae")


def test_resolution_grouping_on_sd_vae_is_the_2_6_split():
    sd = sd_vae_architecture("meta")
    assert layer_groups(sd, grouping="resolution") == layer_groups(sd, grouping="sd_vae", split="2/6")


def test_invalid_options(vae):
    for kwargs in ({"split": "3/5"}, {"grouping": "depth"}, {"resample": "nearest"}):
        with pytest.raises(AhpaError, match="choose one of"):
            HierarchicalVAEPrior(vae, **kwargs)


# --- one-pass extraction ---------------------------------------------------------------


def test_moments_equal_plain_encode_and_encoder_runs_once(vae, images):
    prior = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=8)
    calls = []
    handle = vae.encoder.conv_in.register_forward_hook(lambda m, i, o: calls.append(1))
    out = prior(images)
    handle.remove()
    assert len(calls) == 1
    reference = vae.encode(images).latent_dist
    assert torch.equal(out.latent_mean, reference.mean)
    assert torch.equal(out.latent_std, reference.std)
    assert out.latent_mean.dtype == torch.float32


def test_area_pooling_is_block_mean_and_bilinear_is_interpolate(vae, images):
    paths = ["encoder.conv_in", "encoder.down_blocks.1.resnets.0", "encoder.mid_block.resnets.1"]
    raw, handles = capture(vae, paths)
    area = HierarchicalVAEPrior(vae, groups=("G2", "G3", "G4"), grid=8)(images)
    bilinear = HierarchicalVAEPrior(vae, groups=("G2", "G3", "G4"), grid=8, resample="bilinear")(images)
    for h in handles:
        h.remove()
    conv_in = raw["encoder.conv_in"]  # [2, 32, 32, 32]: 4x4 blocks per token
    block_mean = conv_in.reshape(2, 32, 8, 4, 8, 4).mean(dim=(3, 5))
    torch.testing.assert_close(area.features["G2"][:, 0], block_mean, rtol=0, atol=1e-6)
    resnet = raw["encoder.down_blocks.1.resnets.0"]  # [2, 64, 16, 16]: 2x2 blocks
    torch.testing.assert_close(area.features["G3"][:, 0], resnet.reshape(2, 64, 8, 2, 8, 2).mean(dim=(3, 5)))
    assert torch.equal(area.features["G4"][:, 3], raw["encoder.mid_block.resnets.1"])  # 8x8 already
    expected = F.interpolate(conv_in, size=(8, 8), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(bilinear.features["G2"][:, 0], expected, rtol=0, atol=1e-6)
    assert (bilinear.features["G2"][:, 0] - block_mean).abs().max() > 1e-2


def test_hooks_removed_even_on_error(vae, images):
    prior = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=8)
    hooked = [vae.get_submodule(l.path) for g in prior.layers.values() for l in g]

    def fail(module, inputs, output):
        raise RuntimeError("boom")

    handle = vae.encoder.mid_block.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        prior(images)
    handle.remove()
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    prior(images)
    assert all(len(m._forward_hooks) == 0 for m in hooked)


def test_slicing_gives_the_same_features(vae, images):
    prior = HierarchicalVAEPrior(vae, groups=("G2", "G3", "G4"), grid=8)
    whole = prior(images)
    vae.enable_slicing()
    try:
        sliced = prior(images)
    finally:
        vae.disable_slicing()
    for g in whole.features:
        torch.testing.assert_close(sliced.features[g], whole.features[g])


def test_autocast_bf16_returns_float32(vae, images):
    prior = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=8)
    full = prior(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = prior(images)
    assert all(f.dtype == torch.float32 for f in half.features.values())
    assert half.latent_mean.dtype == torch.float32
    for g in full.features:
        scale = full.features[g].abs().max()
        assert (half.features[g] - full.features[g]).abs().max() < 0.05 * scale


def test_real_sd_vae_architecture_one_pass():
    """One small forward of the real architecture (random init): moments and pooled maps."""
    torch.manual_seed(0)
    sd = sd_vae_architecture().requires_grad_(False).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    prior = HierarchicalVAEPrior(sd, groups=("G3", "G4"), grid=2)
    raw, handles = capture(sd, ["encoder.down_blocks.2.resnets.0"])
    out = prior(x)
    for h in handles:
        h.remove()
    reference = sd.encode(x).latent_dist
    assert torch.equal(out.latent_mean, reference.mean) and torch.equal(out.latent_std, reference.std)
    first = raw["encoder.down_blocks.2.resnets.0"]  # [1, 512, 8, 8] -> 4x4 blocks
    torch.testing.assert_close(out.features["G3"][:, 0], first.reshape(1, 512, 2, 4, 2, 4).mean(dim=(3, 5)))


# --- describe / hash -------------------------------------------------------------------


def test_describe_and_encoder_hash(vae):
    prior = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=8, resample="bilinear")
    info = prior.describe()
    json.dumps(info)
    assert info["grouping"] == "resolution" and info["split"] is None
    assert info["groups"] == ["G3", "G4"] and info["channels"] == {"G3": 64, "G4": 128}
    assert info["layers"] == {g: p for g, p in layer_groups(vae).items() if g in ("G3", "G4")}
    assert info["resample"] == "bilinear" and info["grid"] == 8
    before = info["encoder_hash"]
    assert before == encoder_hash(small_vae())  # same weights, same hash
    params = (vae.encoder.down_blocks[1].resnets[0].conv1.weight, vae.quant_conv.bias, vae.decoder.conv_in.weight)
    for param, changes_hash in zip(params, (True, True, False)):  # the decoder is not part of the teacher
        original = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] += 1e-3
        assert (prior.describe()["encoder_hash"] != before) == changes_hash
        with torch.no_grad():
            param.copy_(original)
    assert prior.describe()["encoder_hash"] == before


# --- loading ---------------------------------------------------------------------------


def test_load_vae_local_dir_and_factors(tmp_path, vae):
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        loaded = load_vae(path, dtype=torch.bfloat16)
        assert isinstance(loaded, AutoencoderKL) and not loaded.training
        assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in loaded.parameters())
        assert torch.equal(loaded.encoder.conv_in.weight.float(), vae.encoder.conv_in.weight.bfloat16().float())
    assert vae_downsample_factor(vae) == 4 and vae_scaling_factor(vae) == pytest.approx(0.18215)
    assert vae_downsample_factor(sd_vae_architecture("meta")) == 8


def test_load_vae_missing_weights_errors(tmp_path, vae, monkeypatch):
    vae.save_pretrained(tmp_path / "ok")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(AhpaError, match="lacks diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin"):
        load_vae(tmp_path / "noweights")
    with pytest.raises(AhpaError, match="not found"):
        load_vae(tmp_path / "absent")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AhpaError, match=r"'ahpa-test/no-such-vae' is not in the local Hugging Face cache") as e:
        load_vae("ahpa-test/no-such-vae")
    assert "hf download ahpa-test/no-such-vae" in str(e.value) and str(tmp_path / "hub") in str(e.value)
    monkeypatch.setattr(vae_module, "TINY_VAE_DIR", tmp_path / "no_tiny")
    with pytest.raises(AhpaError, match="ahpa train-vae"):
        load_vae("tiny")
    monkeypatch.setattr(vae_module, "TINY_VAE_DIR", tmp_path / "ok")
    assert isinstance(load_vae("tiny"), AutoencoderKL)


def test_load_vae_from_hub_cache_layout(tmp_path, vae, monkeypatch):
    """A repo id resolves through the (offline) cache layout: refs/main -> snapshots/<sha>/."""
    repo = tmp_path / "hub" / "models--ahpa-test--vae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    vae.save_pretrained(repo / "snapshots" / "abc123")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_vae("ahpa-test/vae")
    assert torch.equal(loaded.quant_conv.weight, vae.quant_conv.weight)
