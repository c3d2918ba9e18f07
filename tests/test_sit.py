"""SiT backbone (docs/design.md section 1): shapes, parameter counts, hidden states, DiT conventions."""

import math

import pytest
import torch
import torch.nn.functional as F

from ahpa.errors import AhpaError
from ahpa.models.sit import SIT_CONFIGS, SiT, build_sit, count_parameters, sincos_pos_embed_2d, timestep_embedding
from helpers import randomised

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(model: SiT, batch: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return x, t, y


@pytest.fixture
def tiny() -> SiT:
    torch.manual_seed(0)
    return randomised(build_sit("SiT-T/2", input_size=8, num_classes=10)).eval()


def closed_form_count(depth: int, D: int, p: int, C: int, K: int, N: int, learn_sigma: bool) -> int:
    out = p * p * C * (2 if learn_sigma else 1)
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    embed = (D * C * p * p + D) + N * D + (256 * D + D + D * D + D) + (K + 1) * D
    final = (2 * D * D + 2 * D) + (D * out + out)
    return depth * block + embed + final


@pytest.mark.parametrize("size,expected", [("S", 33e6), ("B", 130e6), ("L", 458e6), ("XL", 675e6)])
def test_parameter_counts_match_spec(size, expected):
    name = f"SiT-{size}/2"
    with torch.device("meta"):
        model = build_sit(name, input_size=32)
        sigma = build_sit(name, input_size=32, learn_sigma=True)
    cfg = SIT_CONFIGS[name]
    assert abs(count_parameters(model) - expected) / expected < 0.01
    assert count_parameters(model) == closed_form_count(cfg["depth"], cfg["hidden_size"], 2, 4, 1000, 256, False)
    assert count_parameters(sigma) == closed_form_count(cfg["depth"], cfg["hidden_size"], 2, 4, 1000, 256, True)
    if size == "XL":  # the count DiT's and SiT's training scripts print for XL/2
        assert count_parameters(sigma) == 675_129_632


def test_default_alignment_depth_follows_spec():
    with torch.device("meta"):
        depths = {s: build_sit(f"SiT-{s}/2", 32).default_alignment_depth for s in ("T", "S", "B", "L", "XL")}
    assert depths == {"T": 2, "S": 3, "B": 3, "L": 6, "XL": 7}


def test_unknown_name_lists_valid_names():
    with pytest.raises(AhpaError, match="SiT-XL/2"):
        build_sit("SiT-M/2", 32)


def test_sincos_pos_embed_closed_form():
    D, g = 16, 4
    pe = sincos_pos_embed_2d(D, g)
    q = D // 4  # channels per sin/cos quarter; frequency k is 10000^(-k/q)
    assert pe.shape == (g * g, D)
    torch.testing.assert_close(pe[0], torch.tensor([0.0] * q + [1.0] * q + [0.0] * q + [1.0] * q))
    # Token 1 is row 0, column 1: the first half encodes the column, the second the row.
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0))
    assert pe[1, q].item() == pytest.approx(math.cos(1.0))
    assert pe[1, 2 * q].item() == pytest.approx(0.0)
    # Token 2*g + 3 is row 2, column 3; check frequency k = 1.
    w1 = 10000 ** (-1 / q)
    assert pe[2 * g + 3, 1].item() == pytest.approx(math.sin(3 * w1), abs=1e-6)
    assert pe[2 * g + 3, q + 1].item() == pytest.approx(math.cos(3 * w1), abs=1e-6)
    assert pe[2 * g + 3, 2 * q + 1].item() == pytest.approx(math.sin(2 * w1), abs=1e-6)
    assert pe[2 * g + 3, 3 * q + 1].item() == pytest.approx(math.cos(2 * w1), abs=1e-6)


def test_pos_embed_is_frozen_and_saved():
    model = build_sit("SiT-T/4", input_size=16)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.state_dict()["pos_embed"][0], sincos_pos_embed_2d(192, 4))


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0.3, 2.0]), dim=8)
    freqs = [10000 ** (-k / 4) for k in range(4)]
    expected = [[math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs] for t in (0.3, 2.0)]
    torch.testing.assert_close(emb, torch.tensor(expected))


def test_zero_init_output_and_identity_blocks():
    model = build_sit("SiT-T/2", input_size=8, num_classes=10)
    x, t, y = inputs(model)
    v, hidden = model(x, t, y, hidden_depths=(1, 6))
    assert v.shape == x.shape and torch.count_nonzero(v) == 0
    tokens = model.x_embedder(x) + model.pos_embed  # adaLN-Zero: every block starts as the identity
    torch.testing.assert_close(hidden[1], tokens)
    torch.testing.assert_close(hidden[6], tokens)
    assert model.final_layer.linear.weight.abs().sum() == 0


def test_hidden_equals_hooked_block_output(tiny):
    x, t, y = inputs(tiny)
    captured = {}
    for d in (1, 3, 6):
        tiny.blocks[d - 1].register_forward_hook(lambda m, a, out, d=d: captured.__setitem__(d, out))
    v, hidden = tiny(x, t, y, hidden_depths=[3, 1, 6])
    assert sorted(hidden) == [1, 3, 6]
    for d in (1, 3, 6):
        assert hidden[d].shape == (3, tiny.grid**2, tiny.hidden_size)
        assert torch.equal(hidden[d], captured[d])


def test_hidden_request_does_not_change_output(tiny):
    x, t, y = inputs(tiny)
    v = tiny(x, t, y)
    v2, _ = tiny(x, t, y, hidden_depths=(2,))
    assert torch.equal(v, v2)
    assert v.abs().max() > 0


def test_hidden_depth_out_of_range(tiny):
    x, t, y = inputs(tiny)
    with pytest.raises(AhpaError, match="1..6"):
        tiny(x, t, y, hidden_depths=(7,))


def test_block_matches_reference_attention(tiny):
    """timm layout of qkv ([3, heads, head_dim] per output row), softmax(qk^T/sqrt(d)) v, tanh-GELU MLP."""
    block, D, H = tiny.blocks[0], tiny.hidden_size, tiny.num_heads
    gen = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 5, D, generator=gen), torch.randn(2, D, generator=gen)
    s1, sc1, g1, s2, sc2, g2 = F.linear(F.silu(c), block.adaLN_modulation[1].weight,
                                        block.adaLN_modulation[1].bias).chunk(6, dim=-1)

    def ln(z):
        return (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-6)

    h = ln(x) * (1 + sc1[:, None]) + s1[:, None]
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(2, 5, H, D // H).transpose(1, 2) for i in range(3))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
    x1 = x + g1[:, None] * (att.transpose(1, 2).reshape(2, 5, D) @ block.attn.proj.weight.T + block.attn.proj.bias)
    h = ln(x1) * (1 + sc2[:, None]) + s2[:, None]
    a = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    gelu = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    x2 = x1 + g2[:, None] * (gelu @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
    torch.testing.assert_close(block(x, c), x2, atol=1e-5, rtol=1e-4)


def test_unpatchify_inverts_dit_patch_order(tiny):
    B, C, p, g = 2, tiny.out_channels, tiny.patch_size, tiny.grid
    img = torch.randn(B, C, g * p, g * p)
    tokens = torch.einsum("nchpwq->nhwpqc", img.reshape(B, C, g, p, g, p)).reshape(B, g * g, p * p * C)
    assert torch.equal(tiny.unpatchify(tokens), img)


def test_learn_sigma_returns_velocity_half():
    model = randomised(build_sit("SiT-T/4", input_size=8, num_classes=10, learn_sigma=True)).eval()
    captured = []
    model.final_layer.register_forward_hook(lambda m, a, out: captured.append(out))
    x, t, y = inputs(model, batch=2)
    v = model(x, t, y)
    full = model.unpatchify(captured[0])
    assert full.shape[1] == 8 and v.shape == x.shape
    assert torch.equal(v, full[:, :4])


def test_label_dropout_rate_only_in_train_mode():
    model = build_sit("SiT-T/8", input_size=8, num_classes=10, class_dropout=0.1)
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.full((20000,), 3)
    torch.manual_seed(0)
    out = emb(labels, train=True)
    null = (out == emb.embedding_table.weight[10]).all(-1)
    kept = (out == emb.embedding_table.weight[3]).all(-1)
    assert (null | kept).all()
    assert abs(null.float().mean().item() - 0.1) < 0.01  # 5 standard deviations
    assert torch.equal(emb(labels, train=False), emb.embedding_table.weight[labels])
    forced = emb(torch.tensor([1, 2, 3]), train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced, emb.embedding_table.weight[torch.tensor([10, 2, 10])])


def test_no_null_class_without_dropout():
    model = build_sit("SiT-T/8", input_size=8, num_classes=10, class_dropout=0.0).train()
    assert model.y_embedder.embedding_table.num_embeddings == 10
    labels = torch.arange(10)
    assert torch.equal(model.y_embedder(labels, train=True), model.y_embedder.embedding_table.weight)


def test_model_forced_drop_equals_null_label(tiny):
    x, t, y = inputs(tiny)
    forced = tiny(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(forced, tiny(x, t, torch.full_like(y, tiny.num_classes)))


def test_forward_traces_without_graph_breaks():
    model = randomised(SiT(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t, y = inputs(model, batch=2)
    v, hidden = compiled(x, t, y, hidden_depths=(1,))
    ref, ref_hidden = model(x, t, y, hidden_depths=(1,))
    torch.testing.assert_close(v, ref)
    torch.testing.assert_close(hidden[1], ref_hidden[1])
