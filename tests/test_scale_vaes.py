"""Other VAEs (App. B): SDXL-VAE, SD3/FLUX 16-channel VAEs, OpenAI's consistency decoder.

Grouping and shapes use randomly initialised copies of the real architectures on the meta
device (shapes only).  The real consistency decoder (655M parameters) takes minutes to
initialise on 2 CPU cores, so the compute tests (one pass, one training step, a decode) use
small-width copies of each class with the same block structure.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, ConsistencyDecoderVAE

from ahpa.align.objective import AlignmentObjective
from ahpa.errors import AhpaError
from ahpa.models.sit import build_sit
from ahpa.priors.base import denormalize_latent, normalize_latent
from ahpa.priors.hierarchy import (
    CONSISTENCY_DECODER_CONFIG,
    FLUX_VAE_CONFIG,
    SD3_VAE_CONFIG,
    SDXL_VAE_CONFIG,
    HierarchicalVAEPrior,
    resolve_grouping,
)
from ahpa.priors.vae import load_vae, vae_downsample_factor, vae_scaling_factor, vae_shift_factor
from ahpa.training_module import TrainingModule
from ahpa.transport import Transport

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {
    "sdxl": (AutoencoderKL, SDXL_VAE_CONFIG, 4, 0.13025, 0.0),
    "sd3": (AutoencoderKL, SD3_VAE_CONFIG, 16, 1.5305, 0.0609),
    "flux": (AutoencoderKL, FLUX_VAE_CONFIG, 16, 0.3611, 0.1159),
    "consistency": (ConsistencyDecoderVAE, CONSISTENCY_DECODER_CONFIG, 4, 0.18215, 0.0),
}


def meta_vae(name):
    cls, config, *_ = ARCHS[name]
    with torch.device("meta"):
        return cls(**config)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("size", [256, 512])
def test_real_architectures_group_widths_and_resolutions(name, size):
    vae = meta_vae(name)
    _, _, latent_channels, scale, shift = ARCHS[name]
    assert vae_scaling_factor(vae) == scale and vae_shift_factor(vae) == shift
    assert vae_downsample_factor(vae) == 8 and resolve_grouping(vae) == "sd_vae"  # SD-VAE's 15-layer encoder
    grid = size // 16
    # (layers, channels, raw side of the first layer, raw side of the last layer) for a size x size image
    expected = {
        "sd_vae": {"G3": (4, 512, size // 4, size // 8), "G4": (4, 512, size // 8, size // 8)},  # 4/4 (Table A.8)
        "resolution": {"G3": (2, 512, size // 4, size // 4), "G4": (6, 512, size // 8, size // 8)},  # App. B
    }
    for grouping, groups in expected.items():
        prior = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=grid, grouping=grouping)
        raw = {}
        handles = [vae.get_submodule(l.path).register_forward_hook(lambda m, i, o, p=l.path: raw.__setitem__(p, o))
                   for members in prior.layers.values() for l in members]
        out = prior(torch.empty(2, 3, size, size, device="meta"))
        for h in handles:
            h.remove()
        assert prior.group_shapes == {g: (L, C) for g, (L, C, _, _) in groups.items()}
        for g, (L, C, first, last) in groups.items():
            sides = [raw[l.path].shape[-1] for l in prior.layers[g]]
            assert (sides[0], sides[-1]) == (first, last), (grouping, g, sides)
            assert {raw[l.path].shape[1] for l in prior.layers[g]} == {C}
            assert tuple(out.features[g].shape) == (2, L, C, grid, grid)
        assert tuple(out.latent_mean.shape) == (2, latent_channels, size // 8, size // 8)


def small(name, seed=0):
    """The class of ``name`` at small widths (same block types, latent width and factors)."""
    torch.manual_seed(seed)
    cls, config, *_ = ARCHS[name]
    if cls is ConsistencyDecoderVAE:
        kw = dict(config, encoder_block_out_channels=(32, 64, 64, 64), encoder_norm_num_groups=8,
                  decoder_block_out_channels=(32, 64, 64, 64), decoder_norm_num_groups=8, decoder_layers_per_block=1)
    else:
        kw = dict(config, block_out_channels=(32, 64, 64, 64), norm_num_groups=8)
    return cls(**kw).requires_grad_(False).eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_one_training_step_and_a_decoded_sample(name, tmp_path):
    vae = small(name)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")  # dispatch on config.json's _class_name
    assert type(loaded) is type(vae)
    _, _, latent_channels, scale, shift = ARCHS[name]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    prior = HierarchicalVAEPrior(loaded, groups=("G3", "G4"), grid=4, grouping="resolution")
    out = prior(images)
    assert out.latent_mean.shape == (2, latent_channels, 8, 8)
    torch.manual_seed(1)
    sit = build_sit("SiT-T/2", input_size=8, in_channels=latent_channels, num_classes=10)
    objective = AlignmentObjective(sit.hidden_size, sit.grid, prior.group_shapes, depths=[2])
    module = TrainingModule(sit, objective, Transport())
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    x0 = normalize_latent(out.latent_mean + out.latent_std * torch.randn_like(out.latent_std), scale, shift)
    before = objective.heads["2"].weight.clone()
    loss, _, align = module(x0, torch.tensor([1, 2]), torch.rand(2), torch.randn_like(x0), torch.zeros(2, dtype=torch.bool), out.features)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and align.abs() > 0 and not torch.equal(before, objective.heads["2"].weight)
    with torch.no_grad():
        decoded = loaded.decode(denormalize_latent(x0, scale, shift)).sample
    assert decoded.shape == (2, 3, 64, 64) and torch.isfinite(decoded).all()


def test_sdxl_float16_is_upcast_and_fp16_fix_is_not(tmp_path):
    vae = small("sdxl")
    vae.save_pretrained(tmp_path / "sdxl")
    assert load_vae(tmp_path / "sdxl", dtype=torch.float16).dtype == torch.float32  # force_upcast
    cfg = json.loads((tmp_path / "sdxl" / "config.json").read_text())
    (tmp_path / "sdxl" / "config.json").write_text(json.dumps(dict(cfg, force_upcast=False)))  # sdxl-vae-fp16-fix
    assert load_vae(tmp_path / "sdxl", dtype=torch.float16).dtype == torch.float16
    # under float16 autocast a force_upcast encoder still runs in float32
    seen = []
    vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prior = HierarchicalVAEPrior(vae, groups=("G4",), grid=2, grouping="resolution")
    with torch.autocast("cpu", dtype=torch.float16):
        prior(torch.rand(1, 3, 32, 32))
    assert seen == [torch.float32]


def test_batch_source_uses_the_vae_shift(tmp_path):
    from ahpa.build import latent_normalisation
    from ahpa.config import Config
    from ahpa.data.batches import BatchSource

    vae = small("flux")
    prior = HierarchicalVAEPrior(vae, groups=(), grid=2)
    source = BatchSource(Config(), "cpu", 0, 1, 1, vae=vae, prior=prior, normalisation=latent_normalisation(Config(), vae))
    assert source.latent_scale_scalar == pytest.approx(0.3611)
    assert source.latent_shift_list == pytest.approx([0.1159] * 16)  # recorded in the checkpoint meta


def test_non_encoder_class_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"_class_name": "NoSuchVAE"}))
    (tmp_path / "x" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(AhpaError, match="NoSuchVAE"):
        load_vae(tmp_path / "x")
