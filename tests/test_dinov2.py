"""REPA's DINOv2 teacher: the official architecture's forward, both weight formats, REPA's preprocessing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ahpa.errors import AhpaError
from ahpa.priors.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2Teacher, official_filename


def official_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the official DINOv2 names and shapes (518-px pretraining: 37 x 37 positions)."""
    import timm

    from ahpa.priors.dinov2 import TEACHERS

    with torch.device("meta"):  # shapes only
        ref = timm.create_model(TEACHERS[name], pretrained=False, img_size=518, num_classes=0).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in ref.items():
        if k.endswith("ls1.gamma") or k.endswith("ls2.gamma"):
            state[k] = 0.2 + 0.3 * torch.rand(v.shape, generator=g)  # LayerScale: random, so every block matters
        elif "norm" in k and k.endswith("weight"):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            state[k] = 0.05 * torch.randn(v.shape, generator=g)
    D = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, D)
    if "reg_token" in state:  # official layout: registers apart, pos_embed with the CLS position
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([0.05 * torch.randn(1, 1, D, generator=g), state["pos_embed"]], dim=1)
    return state


def official_forward(state: dict[str, torch.Tensor], images01: torch.Tensor, grid: int, heads: int) -> torch.Tensor:
    """Transcription of DinoVisionTransformer.forward_features(x)["x_norm_patchtokens"] after REPA's
    ``pos_embed = resample_abs_pos_embed(pos_embed, [grid, grid])`` and REPA's preprocessing."""
    from timm.layers import resample_abs_pos_embed

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate((images01 - mean) / std, 14 * grid, mode="bicubic")
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    B, _, D = x.shape
    x = torch.cat([state["cls_token"].expand(B, -1, -1), x], dim=1)
    x = x + resample_abs_pos_embed(state["pos_embed"], [grid, grid])
    regs = state.get("register_tokens")
    if regs is not None:
        x = torch.cat([x[:, :1], regs.expand(B, -1, -1), x[:, 1:]], dim=1)
    ln = lambda t, p: F.layer_norm(t, (D,), state[f"{p}.weight"], state[f"{p}.bias"], eps=1e-6)  # noqa: E731
    lin = lambda t, p: F.linear(t, state[f"{p}.weight"], state[f"{p}.bias"])  # noqa: E731
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        h = ln(x, f"{p}.norm1")
        N = h.shape[1]
        q, k, v = lin(h, f"{p}.attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = lin((attn @ v).transpose(1, 2).reshape(B, N, D), f"{p}.attn.proj")
        x = x + state[f"{p}.ls1.gamma"] * h
        h = lin(F.gelu(lin(ln(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        x = x + state[f"{p}.ls2.gamma"] * h
    x = ln(x, "norm")
    return x[:, 1 + (0 if regs is None else regs.shape[1]) :]


@pytest.mark.parametrize("name, heads", [("dinov2_vitb14", 12), ("dinov2_vits14_reg", 6)])
def test_forward_equals_the_official_architecture_on_official_weights(tmp_path, name, heads):
    """B/14 (REPA's teacher) at 256 px (16x16 tokens at 224 px) and S/14 with registers on a 2x2 grid."""
    grid = 16 if name == "dinov2_vitb14" else 2
    state = official_state(name)
    path = tmp_path / official_filename(name)
    torch.save(state, path)
    teacher = DINOv2Teacher(name, grid=grid, weights=str(path))
    assert teacher.input_size == 14 * grid and not teacher.randomly_initialised
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        want = official_forward(state, images.float() / 255, grid, heads)
    got = teacher(images)
    assert got.shape == (1, grid * grid, teacher.embed_dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if name == "dinov2_vitb14":  # B/14 is proven above; the rest is checked on the small model
        return
    # feature layout of a prior group: [B, 1, D, grid, grid], token i * grid + j at (i, j)
    feats = teacher.grid_features(images)
    assert feats.shape == (1, 1, teacher.embed_dim, grid, grid)
    torch.testing.assert_close(feats[0, 0, :, 1, 0], got[0, grid])
    # the same tensors as timm's file (model.safetensors, timm names) give the same teacher
    timm_state = {k: v.contiguous() for k, v in DINOv2Teacher(name, grid=37, weights=str(path)).model.state_dict().items()}
    save_file(timm_state, tmp_path / "model.safetensors")
    torch.testing.assert_close(DINOv2Teacher(name, grid=grid, weights=str(tmp_path / "model.safetensors"))(images), got, rtol=1e-5, atol=1e-5)


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Rows: output pixels; Keys kernel (a = -0.75), half-pixel centres, border indices clamped (PyTorch's rule)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += _cubic(src - k)
    return m


def test_preprocessing_is_repas_by_hand():
    """uint8 / 255, ImageNet mean/std, then bicubic resize to 14 x grid, computed by hand on a 5x5 image."""
    teacher = DINOv2Teacher("dinov2_vits14", grid=1, weights="random")
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 5, 5), generator=g, dtype=torch.uint8)
    x = image.double() / 255
    x = (x - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    r = _bicubic_matrix(5, 14)
    want = torch.einsum("ih,bchw,jw->bcij", r, x, r)
    got = teacher.preprocess(image)
    assert got.shape == (1, 3, 14, 14)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # the training convention, float in [-1, 1] (uint8 / 127.5 - 1), gives the same input
    torch.testing.assert_close(teacher.preprocess(image.float() / 127.5 - 1), got, rtol=0, atol=1e-5)


def test_weights_missing_or_of_another_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(AhpaError, match=r"dinov2_vitb14_pretrain\.pth.*hub/checkpoints.*hf download timm/vit_base_patch14_dinov2\.lvd142m"):
        DINOv2Teacher("dinov2_vitb14", grid=16)
    with pytest.raises(AhpaError, match="does not exist"):
        DINOv2Teacher("dinov2_vitb14", grid=16, weights=str(tmp_path / "nope.pth"))
    small = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_state("dinov2_vits14"), small)
    with pytest.raises(AhpaError, match="width-384 ViT without registers, not dinov2_vitb14"):
        DINOv2Teacher("dinov2_vitb14", grid=16, weights=str(small))
    with pytest.raises(AhpaError, match="with registers, not dinov2_vits14_reg|without registers, not dinov2_vits14_reg"):
        DINOv2Teacher("dinov2_vits14_reg", grid=2, weights=str(small))
    # found in the torch-hub cache by its official file name
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / small.name).write_bytes(small.read_bytes())
    assert DINOv2Teacher("dinov2_vits14", grid=2).weights == str(hub / small.name)


def test_teacher_grid_must_match_the_token_grid():
    with pytest.raises(AhpaError, match=r"teacher.input_size=224 gives a 16x16 DINOv2 token grid, but the SiT token grid is 32x32"):
        DINOv2Teacher("dinov2_vitb14", grid=32, weights="random", input_size=224)
