"""The SiT backbone (docs/design.md section 1): a DiT with adaLN-Zero blocks, trained as a flow.

Module and parameter names follow facebookresearch/DiT and willisma/SiT (and the
timm layers they use) so the published SiT and REPA state dicts load unchanged.
One addition: ``forward(..., hidden_depths=(d,))`` also returns the tokens after
block ``d``, taken from the same pass, for the alignment objective (paper Sec. 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ahpa.errors import AhpaError

# size -> (depth, hidden, heads); docs/design.md section 1 table, plus "T" for CPU tests and demos.
# Patch 1 is an addition for small latents (the toy study's 8x8 latent -> 8x8 token grid).
_SIZES = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SIT_CONFIGS: dict[str, dict[str, int]] = {
    f"SiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (1, 2, 4, 8)
}


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal frequency embedding of (fractional) times ``t [B]`` -> ``[B, dim]``, as in DiT/GLIDE."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid*grid, dim]`` (MAE/DiT layout, float64 math).

    Token ``n = i * grid + j`` (row i, column j).  The first ``dim/2`` channels encode
    the column j, the last ``dim/2`` the row i; each half is ``[sin(p w_k), cos(p w_k)]``
    with ``w_k = 10000^(-k / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device="cpu") / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64, device="cpu"),
                                torch.arange(grid, dtype=torch.float64, device="cpu"), indexing="ij")

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens ``[B, N, D]`` by per-sample ``[B, D]`` shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens (timm's PatchEmbed, key ``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Time ``t [B]`` -> ``[B, D]``: frequency embedding followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> ``[B, D]``; row ``num_classes`` is the null class used for CFG.

    In train mode labels are replaced by the null class with probability
    ``dropout_prob`` (DiT's token_drop); ``force_drop_ids == 1`` drops chosen rows.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-1/2, as timm
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (DiT), timm's names ``fc1``/``fc2``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on ``c = t_emb + y_emb``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to ``p*p*out_channels`` values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Backbone(nn.Module):
    """What every backbone of this project shares (SiT's hidden-state contract, docs/design.md section 1):
    its registry name, the block whose output is aligned by default, and the unpatchify of its output tokens.
    A subclass sets ``REGISTRY`` (name -> architecture) and ``FAMILY`` and holds depth, hidden_size,
    num_heads, patch_size, grid and out_channels."""

    REGISTRY: dict[str, dict] = {}
    FAMILY = "Backbone"

    def _set_geometry(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                      num_heads: int) -> None:
        if input_size % patch_size:
            raise AhpaError(f"input size {input_size} is not divisible by patch size {patch_size}; "
                            "choose a resolution whose latent size is a multiple of the patch size")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.grid = input_size // patch_size

    @property
    def name(self) -> str:
        """Registry name (e.g. ``"SiT-XL/2"``), or a description for a custom size."""
        arch = dict(depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads,
                    patch_size=self.patch_size)
        for name, cfg in self.REGISTRY.items():
            if cfg == arch:
                return name
        return f"{self.FAMILY}(" + ", ".join(f"{k}={v}" for k, v in arch.items()) + ")"

    @property
    def default_alignment_depth(self) -> int:
        """Block whose output is aligned (docs/design.md section 1: S,B 3; L 6; XL 7, i.e. a quarter of the depth;
        REPA's text-to-image MMDiT taps block 8: set align.depths)."""
        return max(1, round(self.depth / 4))

    def unpatchify(self, x: Tensor) -> Tensor:
        """Tokens ``[B, N, p*p*C]`` -> image ``[B, C, H, W]``."""
        B, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c, g * p, g * p)


class SiT(Backbone):
    """Scalable Interpolant Transformer predicting the velocity ``v(x_t, t, y)``."""

    FAMILY = "SiT"
    REGISTRY = SIT_CONFIGS

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout: float = 0.1, learn_sigma: bool = False):
        super().__init__()
        self._set_geometry(input_size, patch_size, in_channels, hidden_size, depth, num_heads)
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed sin-cos embedding, a frozen Parameter so the published key "pos_embed" loads.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # Recompute each block's activations in the backward pass (train.activation_checkpointing):
        # memory for L/XL at 512 px; the hidden states handed to the alignment objective are unchanged.
        self.activation_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, adaLN-Zero and zero output layer."""
        dit_init_linears_and_patches(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        dit_init_time_and_zero_layers(self, [block.adaLN_modulation[-1] for block in self.blocks])

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_depths: Sequence[int] = (), *,
                force_drop_ids: Tensor | None = None) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Velocity ``[B, C, H, W]`` at ``x_t`` for times ``t [B]`` and labels ``y [B]``.

        With ``hidden_depths`` (1-indexed blocks), returns ``(velocity, {d: tokens [B, N, D]})``,
        the tokens after block ``d`` of this same pass.
        """
        for d in hidden_depths:
            if not 1 <= d <= self.depth:
                raise AhpaError(f"alignment depth {d} is outside the {self.depth} blocks of {self.name}; "
                                f"choose a depth in 1..{self.depth}")
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        hidden = {}
        for depth, block in enumerate(self.blocks, start=1):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if depth in hidden_depths:
                hidden[depth] = x
        out = self.unpatchify(self.final_layer(x, c))
        if self.learn_sigma:  # SiT keeps only the velocity half of the learned-sigma output
            out = out[:, : self.in_channels]
        return (out, hidden) if hidden_depths else out



def dit_init_linears_and_patches(model: nn.Module) -> None:
    """DiT's initialisation, first half (shared by SiT and MMDiT): xavier linears with zero bias, the frozen
    sin-cos ``pos_embed``, the patch embedding initialised like a linear layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed_2d(model.hidden_size, model.grid)[None])
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, not nn.Conv2d
    nn.init.zeros_(model.x_embedder.proj.bias)


def dit_init_time_and_zero_layers(model: nn.Module, adaln_layers: list[nn.Linear]) -> None:
    """DiT's initialisation, second half: N(0, 0.02) timestep MLP, adaLN-Zero for ``adaln_layers`` and a zero
    output layer (the random draws happen in the same order as DiT's, so initial weights are unchanged)."""
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for layer in [*adaln_layers, model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_sit(name: str, input_size: int, in_channels: int = 4, num_classes: int = 1000,
              class_dropout: float = 0.1, learn_sigma: bool = False) -> SiT:
    """Build a registry model, e.g. ``build_sit("SiT-B/2", input_size=32)``."""
    if name not in SIT_CONFIGS:
        raise AhpaError(f"unknown model '{name}'; valid names: {', '.join(SIT_CONFIGS)}")
    return SiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
               class_dropout=class_dropout, learn_sigma=learn_sigma, **SIT_CONFIGS[name])


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, frozen ``pos_embed`` included (as DiT/SiT report them)."""
    return sum(p.numel() for p in model.parameters())
