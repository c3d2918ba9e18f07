"""MMDiT (Appendix C): forward = a hand-written SD3 joint-attention transcription; SiT's contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from ahpa.errors import AhpaError
from ahpa.models.mmdit import MMDIT_CONFIGS, MMDiT, build_mmdit
from ahpa.models.sit import sincos_pos_embed_2d


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (adaLN-Zero would hide the attention and the gates)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.null_context.copy_(torch.randn(model.null_context.shape, generator=g))


def _lin(x, layer):
    return x @ layer.weight.T + layer.bias


def _ln(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _attention(q, k, v, heads):
    """Softmax(q k^T / sqrt(d)) v per head, by hand. q, k, v: [B, N, D]."""
    B, N, D = q.shape
    d = D // heads
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, N, D)


def _reference(model: MMDiT, x, t, y):
    """SD3 / REPA MMDiT forward, transcribed from the paper's block diagram without using the model's modules."""
    p, D, H = model.patch_size, model.hidden_size, model.num_heads
    B, C, S, _ = x.shape
    g = S // p
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    w = model.x_embedder.proj.weight.reshape(D, -1)
    h = patches @ w.T + model.x_embedder.proj.bias + sincos_pos_embed_2d(D, g)[None]
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs  # the frequency embedding is float32 (DiT), then the model's dtype
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1).to(t.dtype)
    m = model.t_embedder.mlp
    c = _lin(F.silu(_lin(tf, m[0])), m[2])
    ctx = _lin(y, model.context_embedder)
    for block in model.joint_blocks:
        cb, xb = block.context_block, block.x_block
        mc = _lin(F.silu(c), cb.adaLN_modulation[1]).chunk(2 if cb.pre_only else 6, -1)
        mx = _lin(F.silu(c), xb.adaLN_modulation[1]).chunk(6, -1)
        hc = _ln(ctx) * (1 + mc[1][:, None]) + mc[0][:, None]
        hx = _ln(h) * (1 + mx[1][:, None]) + mx[0][:, None]
        qc, kc, vc = _lin(hc, cb.qkv).chunk(3, -1)
        qx, kx, vx = _lin(hx, xb.qkv).chunk(3, -1)
        n = ctx.shape[1]
        a = _attention(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1), H)
        ac, ax = a[:, :n], a[:, n:]

        def post(z, att, mods, stream):
            z = z + mods[2][:, None] * _lin(att, stream.proj)
            zz = _ln(z) * (1 + mods[4][:, None]) + mods[3][:, None]
            return z + mods[5][:, None] * _lin(_gelu_tanh(_lin(zz, stream.mlp.fc1)), stream.mlp.fc2)

        h = post(h, ax, mx, xb)
        ctx = None if cb.pre_only else post(ctx, ac, mc, cb)
    fl = model.final_layer
    shift, scale = _lin(F.silu(c), fl.adaLN_modulation[1]).chunk(2, -1)
    out = _lin(_ln(h) * (1 + scale[:, None]) + shift[:, None], fl.linear)  # [B, N, p*p*C]
    return out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, S, S)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2,
                  context_tokens=7, context_dim=24).double()
    _randomize(model)
    return model.eval()


def test_forward_equals_hand_written_joint_attention(small):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = small(x, t, y)
        ref = _reference(small, x, t, y)
    assert ref.abs().max() > 1e-3  # random weights: a non-trivial output
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_hidden_tokens_are_those_entering_the_next_block(small):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[1].clone()))
             for i, blk in enumerate(small.joint_blocks)]
    try:
        with torch.no_grad():
            v, hidden = small(x, t, y, hidden_depths=(1, 2))
    finally:
        for hk in hooks:
            hk.remove()
    assert set(hidden) == {1, 2}
    torch.testing.assert_close(hidden[1], seen[1], rtol=0, atol=0)  # output of block 1 = input (image) of block 2
    torch.testing.assert_close(hidden[2], seen[2], rtol=0, atol=0)
    torch.testing.assert_close(v, small(x, t, y), rtol=0, atol=0)  # same pass, same velocity


def test_null_condition_and_force_drop(small):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 7, 24, generator=g, dtype=torch.float64)
    drop = torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = small(x, t, y, force_drop_ids=drop)
        manual = small(x, t, torch.where(drop.view(-1, 1, 1) == 1, small.null_context.expand(3, -1, -1), y))
    torch.testing.assert_close(out, manual, rtol=0, atol=0)
    assert not torch.allclose(out[0], small(x, t, y)[0])
    torch.testing.assert_close(small.null_condition(y), small.null_context.expand(3, -1, -1))


def test_registry_adaln_zero_and_reference_size():
    with torch.device("meta"):
        big = build_mmdit("MMDiT-B/2", input_size=32)
    n = sum(p.numel() for p in big.parameters())
    per_block = sum(p.numel() for p in big.joint_blocks[0].parameters())
    assert (big.depth, big.hidden_size, big.num_heads, big.hidden_size // big.num_heads) == (24, 768, 24, 32)
    assert 0.50e9 < n < 0.51e9 and 21.2e6 < per_block < 21.3e6  # docs/baselines.md: ~21.2M per block, ~0.5B
    assert big.joint_blocks[-1].context_block.pre_only and not big.joint_blocks[-2].context_block.pre_only
    tiny = build_mmdit("MMDiT-T/2", input_size=8)
    for blk in tiny.joint_blocks:  # adaLN-Zero: every residual branch starts closed
        for stream in (blk.context_block, blk.x_block):
            assert stream.adaLN_modulation[-1].weight.abs().sum() == 0
    assert tiny.default_alignment_depth == 2 and tiny.name == "MMDiT-T/2" and "MMDiT-B/2" in MMDIT_CONFIGS
    with pytest.raises(AhpaError, match="outside the 6 blocks"):
        tiny(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 768), hidden_depths=(7,))
    with pytest.raises(AhpaError, match="text context"):
        tiny(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 5, 768))


def test_activation_checkpointing_keeps_hidden_tokens_and_gradients(small):
    """train.activation_checkpointing recomputes the joint blocks: same velocity, hidden tokens and gradients."""
    import copy

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(small).train()
        model.activation_checkpointing = checkpointing
        v, hidden = model(x, t, y, hidden_depths=(2,), force_drop_ids=torch.zeros(2))
        (v.square().sum() + hidden[2].sin().sum()).backward()  # an alignment-like loss on the block-2 tokens
        results.append((v.detach(), hidden[2].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (v0, h0, g0), (v1, h1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    torch.testing.assert_close(h1, h0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and any(k.startswith("joint_blocks.0.") for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-12, atol=1e-12, msg=k)
