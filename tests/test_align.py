"""Alignment branch: normalisation, routers, heads, losses, objective, router plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ahpa.align.heads import HEAD_KINDS, build_head
from ahpa.align.losses import alignment_loss
from ahpa.align.normalize import normalize_features
from ahpa.align.objective import AlignmentObjective, extra_parameters
from ahpa.align.router import ROUTER_KINDS, build_router
from ahpa.router_plot import plot_router, router_deviation
from ahpa.errors import AhpaError

GROUPS = {"G3": (3, 8), "G4": (2, 6)}  # small but unequal L and C, to catch mix-ups
GRID, D = 4, 16


def _objective(router="dynamic", **kw) -> AlignmentObjective:
    kw.setdefault("depths", [2])
    return AlignmentObjective(D, GRID, GROUPS, router=router, time_dim=8, router_hidden=16, lut_bins=5, prototypes=3, **kw)


def _features(B=3, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # layers at very different scales and offsets, as VAE layers are
    return {g: torch.randn(B, L, C, GRID, GRID, generator=gen) * 10 ** torch.arange(L).view(1, L, 1, 1, 1) + 3.0
            for g, (L, C) in GROUPS.items()}


def _perturb(module: nn.Module, seed=1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------- normalisation

def test_token_normalisation_hand_value_and_statistics():
    f = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1, 1)
    expected = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2.0 / 3.0 + 1e-6)
    assert torch.allclose(normalize_features(f, "token").flatten(), expected, atol=1e-6)
    out = normalize_features(_features()["G3"], "token")
    assert torch.allclose(out.mean(2), torch.zeros(()), atol=1e-5)
    assert torch.allclose(out.var(2, correction=0), torch.ones(()), atol=1e-4)


def test_spatial_and_none_normalisation():
    f = _features()["G3"].half()
    out = normalize_features(f, "spatial")
    assert out.dtype == torch.float32
    assert torch.allclose(out.mean((3, 4)), torch.zeros(()), atol=1e-4)
    assert torch.allclose(out.var((3, 4), correction=0), torch.ones(()), atol=1e-3)
    none = normalize_features(f, "none")
    assert none.dtype == torch.float32 and torch.equal(none, f.float())
    with pytest.raises(AhpaError):
        normalize_features(f, "layer")


# ---------------------------------------------------------------- routers

@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_router_weights_are_distributions(kind):
    router = build_router(kind, {"G3": 3, "G4": 2}, time_dim=8, hidden=16, lut_bins=5, prototypes=3, content_dim=D)
    _perturb(router)
    t = torch.rand(7, generator=torch.Generator().manual_seed(0))
    intra, gamma = router(t, torch.randn(7, D))
    assert set(intra) == {"G3", "G4"} and intra["G3"].shape == (7, 3) and intra["G4"].shape == (7, 2)
    for w in intra.values():
        assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(7), atol=1e-6)
    assert gamma.shape == (7, 2) and (gamma >= 0).all()
    assert torch.allclose(gamma.sum(1), torch.full((7,), 2.0), atol=1e-6)


@pytest.mark.parametrize("encoding", ["linear", "sinusoidal", "fourier"])
@pytest.mark.parametrize("depth", [3, 4, 8])
def test_dynamic_router_starts_uniform_and_depth_counts_layers(encoding, depth):
    router = build_router("dynamic", {"G3": 4, "G4": 4}, time_encoding=encoding, depth=depth)
    assert sum(isinstance(m, nn.Linear) for m in router.mlp) == depth
    assert router.mlp[0].in_features == 128 and router.mlp[0].out_features == 256
    intra, gamma = router(torch.tensor([0.0, 0.37, 1.0]))
    assert torch.equal(gamma, torch.ones(3, 2))
    assert torch.equal(intra["G3"], torch.full((3, 4), 0.25))


def test_fourier_encoding_is_a_fixed_seeded_buffer():
    a = build_router("dynamic", {"G4": 2}, time_encoding="fourier")
    b = build_router("dynamic", {"G4": 2}, time_encoding="fourier")
    assert torch.equal(a.time_embed.freqs, b.time_embed.freqs)
    assert "time_embed.freqs" in dict(a.named_buffers())
    assert all("freqs" not in name for name, _ in a.named_parameters())


@pytest.mark.parametrize("order", [("G3", "G4"), ("G4", "G3")])
def test_linear_heuristic_gives_deep_group_weight_t(order):
    router = build_router("linear", {g: 4 for g in order})
    deep = order.index("G4")
    t = torch.tensor([0.0, 0.3, 1.0])
    intra, gamma = router(t)
    assert torch.allclose(gamma[:, deep] / 2, t)
    assert torch.allclose(gamma[:, 1 - deep] / 2, 1 - t)
    assert torch.equal(intra["G3"], torch.full((3, 4), 0.25))
    assert sum(p.numel() for p in router.parameters()) == 0


def test_lut_router_is_piecewise_constant_over_bins():
    router = build_router("lut", {"G3": 2, "G4": 2}, lut_bins=4)
    with torch.no_grad():
        router.inter_table.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    _, gamma = router(torch.tensor([0.0, 0.24, 0.26, 0.74, 0.76, 1.0]))
    share = torch.sigmoid(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 3.0]))  # bin index = floor(4 t), t = 1 -> last bin
    assert torch.allclose(gamma[:, 0] / 2, share, atol=1e-6)


def test_unknown_router_and_bad_options_raise():
    with pytest.raises(AhpaError):
        build_router("softmax", {"G4": 4})
    with pytest.raises(AhpaError):
        build_router("content", {"G4": 4})  # content_dim missing
    with pytest.raises(AhpaError):
        build_router("linear", {"G2": 1, "G3": 1, "G4": 1})
    with pytest.raises(AhpaError):
        build_router("dynamic", {"G4": 4}, depth=1)


# ---------------------------------------------------------------- objective target

def _uniform_mix_by_hand(features, normalize="token"):
    return torch.cat([normalize_features(features[g], normalize).mean(1) for g in GROUPS], dim=1)


@pytest.mark.parametrize("kind", ["dynamic", "lut", "attention", "content"])
def test_target_at_initialisation_is_the_static_uniform_mix(kind):
    feats, t = _features(), torch.tensor([0.05, 0.5, 0.95])
    content = torch.randn(3, D)
    target, gamma = _objective(kind).alignment_target(feats, t, content)
    uniform, _ = _objective("uniform").alignment_target(feats, t)
    assert torch.equal(gamma, torch.ones(3, 2))
    assert torch.equal(target, uniform)
    assert target.shape == (3, 8 + 6, GRID, GRID) and target.dtype == torch.float32
    assert torch.allclose(uniform, _uniform_mix_by_hand(feats), atol=1e-5)


def test_target_applies_gamma_and_intra_weights_per_group():
    obj = _objective("lut", normalize="none")
    with torch.no_grad():
        obj.router.inter_table.fill_(0.0)
        obj.router.inter_table[:, 1] = math.log(3.0)  # gamma = 2 * (1/4, 3/4)
        obj.router.intra_table.fill_(0.0)
        obj.router.intra_table[:, 0] = 50.0  # G3: all weight on its first layer
    feats = _features()
    target, _ = obj.alignment_target(feats, torch.full((3,), 0.5))
    assert torch.allclose(target[:, :8], 0.5 * feats["G3"][:, 0], atol=1e-5)
    assert torch.allclose(target[:, 8:], 1.5 * feats["G4"].mean(1), atol=1e-4)


def test_wrong_feature_shape_or_missing_group_raises():
    obj, feats, t = _objective(), _features(), torch.rand(3)
    hidden = {2: torch.randn(3, GRID * GRID, D)}
    with pytest.raises(AhpaError):
        obj(hidden, {"G3": feats["G3"]}, t)
    with pytest.raises(AhpaError):
        obj(hidden, {**feats, "G4": feats["G4"][..., :2, :2]}, t)
    with pytest.raises(AhpaError):
        obj({3: hidden[2]}, feats, t)


# ---------------------------------------------------------------- losses

def _tokens(*vectors):
    """Vectors as tokens of one sample: [1, C, 1, n]."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, -1, 1, len(vectors))


def test_cosine_loss_hand_values():
    a = _tokens([1.0, 0.0, 0.0])
    cases = {(0.0, 2.0, 0.0): 0.0, (3.0, 0.0, 0.0): -1.0, (-0.5, 0.0, 0.0): 1.0, (1.0, 1.0, 0.0): -math.sqrt(0.5)}
    for b, value in cases.items():
        assert alignment_loss(a, _tokens(list(b)), "cosine").item() == pytest.approx(value, abs=1e-6)
    two = alignment_loss(_tokens([1.0, 0.0], [1.0, 0.0]), _tokens([2.0, 0.0], [0.0, 1.0]), "cosine")
    assert two.shape == (1,) and two.item() == pytest.approx(-0.5, abs=1e-6)


def test_l1_and_smooth_l1_hand_values():
    pred, target = _tokens([0.0, 0.0]), _tokens([0.5, 3.0])
    assert alignment_loss(pred, target, "l1").item() == pytest.approx(1.75)
    assert alignment_loss(pred, target, "smooth_l1").item() == pytest.approx((0.5 * 0.25 + 2.5) / 2)
    with pytest.raises(AhpaError):
        alignment_loss(pred, target, "mse")


def test_cosine_loss_with_fp16_inputs_is_finite_float32():
    pred = torch.full((2, 1024, 4, 4), 300.0, dtype=torch.float16)  # squared norm overflows fp16
    for target in (pred.clone(), pred.to(torch.bfloat16)):
        loss = alignment_loss(pred.clone(), target, "cosine")
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        assert torch.allclose(loss, torch.full((2,), -1.0), atol=1e-5)


# ---------------------------------------------------------------- gradients and heads

@pytest.mark.parametrize("kind", ["dynamic", "content"])
def test_gradients_reach_router_and_head_but_not_features(kind):
    torch.manual_seed(0)
    obj = _objective(kind)
    feats = {g: f.requires_grad_(True) for g, f in _features().items()}
    hidden = {2: torch.randn(3, GRID * GRID, D, requires_grad=True)}
    loss, stats = obj(hidden, feats, torch.tensor([0.1, 0.5, 0.9]))
    assert loss.shape == (3,) and set(stats) == {"align_loss", "gamma_G3", "gamma_G4"}
    assert float(stats["gamma_G3"]) == pytest.approx(1.0) and float(stats["align_loss"]) == pytest.approx(loss.mean().item())
    optimizer = torch.optim.AdamW(obj.parameters(), lr=1e-2)
    loss.mean().backward()
    assert all(f.grad is None for f in feats.values())
    assert hidden[2].grad is not None and hidden[2].grad.abs().sum() > 0
    head = obj.heads["2"]
    assert head.weight.grad.abs().sum() > 0
    last = obj.router.mlp[-1]
    assert last.weight.grad.abs().sum() > 0 and torch.count_nonzero(last.weight) == 0
    optimizer.step()
    assert torch.count_nonzero(last.weight) > 0


def test_hidden_tokens_are_laid_out_row_major():
    # identity 1x1 head, target = the single layer itself: loss is exactly -1 only
    # if token i * grid + j lands on row i, column j of the target map.
    groups = {"G4": (1, D)}
    obj = AlignmentObjective(D, GRID, groups, depths=[1], router="uniform", head="linear", normalize="none")
    with torch.no_grad():
        obj.heads["1"].weight.copy_(torch.eye(D).view(D, D, 1, 1))
        obj.heads["1"].bias.zero_()
    f = torch.randn(2, 1, D, GRID, GRID)
    hidden = f[:, 0].permute(0, 2, 3, 1).reshape(2, GRID * GRID, D)
    loss, _ = obj({1: hidden}, {"G4": f}, torch.rand(2))
    assert torch.allclose(loss, torch.full((2,), -1.0), atol=1e-6)
    transposed = f[:, 0].permute(0, 3, 2, 1).reshape(2, GRID * GRID, D)
    assert (obj({1: transposed}, {"G4": f}, torch.rand(2))[0] > -0.9).all()


def test_several_depths_average_and_weight_scales():
    torch.manual_seed(0)
    obj = _objective("dynamic", depths=[1, 3], weight=0.5, loss="smooth_l1")
    feats, t = _features(), torch.rand(3)
    hidden = {d: torch.randn(3, GRID * GRID, D) for d in (1, 2, 3)}
    loss, _ = obj(hidden, feats, t)
    target, _ = obj.alignment_target(feats, t)
    per_depth = [alignment_loss(obj.heads[str(d)](hidden[d].transpose(1, 2).reshape(3, D, GRID, GRID)), target, "smooth_l1")
                 for d in (1, 3)]
    assert not torch.allclose(per_depth[0], per_depth[1])
    assert torch.allclose(loss, 0.5 * (per_depth[0] + per_depth[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_output_shapes(kind):
    head = build_head(kind, 24, 40)
    assert head(torch.randn(2, 24, 4, 4)).shape == (2, 40, 4, 4)


def test_head_parameter_counts():
    assert sum(p.numel() for p in build_head("conv3", 768, 1024).parameters()) == 768 * 1024 * 9 + 1024
    assert sum(p.numel() for p in build_head("linear", 64, 32).parameters()) == 64 * 32 + 32
    mlp3 = 64 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 32 + 32
    assert sum(p.numel() for p in build_head("mlp3", 64, 32).parameters()) == mlp3
    block2 = (64 * 32 * 9 + 32) + 2 * 32 + (32 * 32 * 9 + 32)
    assert sum(p.numel() for p in build_head("convblock2", 64, 32).parameters()) == block2
    with pytest.raises(AhpaError):
        build_head("conv7", 64, 32)


def test_extra_parameters_counts_router_and_heads():
    uniform = _objective("uniform", depths=[1, 2])
    assert extra_parameters(uniform) == 2 * (D * 14 * 9 + 14)
    dynamic = _objective("dynamic")
    router = (1 * 8 + 8) + (8 * 16 + 16) + 2 * (16 * 16 + 16) + (16 * (3 + 2 + 2) + 7)
    assert extra_parameters(dynamic) == D * 14 * 9 + 14 + router


# ---------------------------------------------------------------- router plot

def test_router_plot_writes_png_and_deviation(tmp_path):
    obj = _objective("dynamic")
    assert router_deviation(obj) == 0.0
    _perturb(obj.router)
    assert router_deviation(obj) > 0.0
    path = tmp_path / "plots" / "router.png"
    values = plot_router(obj, path, t_points=11)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["router.png"]
    assert values["t"][0] == 1.0 and values["t"][-1] == 0.0
    assert values["intra/G3"].shape == (11, 3) and values["gamma/G4"].shape == (11,)
    weights = obj.router_weights(torch.tensor([0.25, 0.75]))
    assert list(weights) == ["gamma/G3", "gamma/G4", "intra/G3", "intra/G4"]
    assert torch.allclose(weights["gamma/G3"] + weights["gamma/G4"], torch.tensor([2.0, 2.0]), atol=1e-6)
    assert torch.allclose(weights["intra/G4"].sum(1), torch.ones(2), atol=1e-6)
