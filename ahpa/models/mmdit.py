"""MMDiT backbone for text-to-image (paper Appendix C, Table 5; SD3's joint blocks as REPA's T2I uses them).

REPA's configuration (``MMDiT-B/2`` here, docs/baselines.md "Text-to-image"):
depth 24, hidden 768 = 32 x depth, 24 heads of width 32, patch 2, 4 latent
channels, mlp_ratio 4 with GELU(tanh), qkv bias, SDPA.  The text context is the
CLIP ViT-L/14 token sequence ``[B, 77, 768]`` through ``context_embedder =
Linear(768, hidden)``; there is no pooled text vector, so the adaLN conditioning
vector is the timestep embedding alone.  Each joint block runs one attention over
``cat(context, image)`` tokens, with separate weights per stream; the last block's
context stream is "pre-only" (it gives keys and values, no output).

Differences from REPA's release, on purpose: adaLN-Zero and DiT's xavier
initialisation (REPA's MMDiT has neither), and the null text condition for
classifier-free guidance is held by the model as the ``null_context`` buffer (the
empty prompt's CLIP embedding, set by the trainer from the text encoder), so a
checkpoint samples with guidance without a text encoder for the null branch.

The contract is SiT's: ``forward(x, t, y, hidden_depths=(), *, force_drop_ids=None)``
with ``y`` the text context; with ``hidden_depths`` it also returns the image
tokens after block d (the ones entering block d + 1), for every alignment objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ahpa.errors import AhpaError
from ahpa.models.sit import (
    Backbone,
    FinalLayer,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    dit_init_linears_and_patches,
    dit_init_time_and_zero_layers,
    modulate,
)

# size -> (depth, hidden, heads); heads of width 32 and hidden = 32 x depth as REPA's MMDiT ("B" is REPA's).
_SIZES = {"T": (6, 192, 6), "S": (12, 384, 12), "B": (24, 768, 24)}
MMDIT_CONFIGS: dict[str, dict[str, int]] = {
    f"MMDiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4)
}
CLIP_CONTEXT = (77, 768)  # CLIP ViT-L/14 text: 77 tokens of width 768


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN, qkv, output projection, MLP.

    ``pre_only`` (the context stream of the last block): only shift/scale and qkv.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple]:
        """q, k, v ``[B, heads, N, head_dim]`` of the modulated tokens, and the gates/shifts for later."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        h = modulate(self.norm1(x), mods[0], mods[1])
        B, N, C = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v, mods[2:]

    def post_attention(self, x: Tensor, attn: Tensor, mods: tuple) -> Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """SD3 joint block: one attention over ``cat(context, x)``, separate weights per stream."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise AhpaError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, pre_only=pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        qc, kc, vc, mods_c = self.context_block.pre_attention(context, c)
        qx, kx, vx, mods_x = self.x_block.pre_attention(x, c)
        out = F.scaled_dot_product_attention(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2))
        B, _, _, _ = out.shape
        out = out.transpose(1, 2).reshape(B, out.shape[2], -1)
        n_ctx = context.shape[1]
        x = self.x_block.post_attention(x, out[:, n_ctx:], mods_x)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out[:, :n_ctx], mods_c), x


class MMDiT(Backbone):
    """Multimodal diffusion transformer predicting the velocity ``v(x_t, t, context)``."""

    FAMILY = "MMDiT"
    REGISTRY = MMDIT_CONFIGS

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 768,
                 depth: int = 24, num_heads: int = 24, mlp_ratio: float = 4.0, context_tokens: int = CLIP_CONTEXT[0],
                 context_dim: int = CLIP_CONTEXT[1], class_dropout: float = 0.1):
        super().__init__()
        self._set_geometry(input_size, patch_size, in_channels, hidden_size, depth, num_heads)
        self.context_tokens, self.context_dim = context_tokens, context_dim
        self.class_dropout = class_dropout
        self.out_channels = in_channels

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden_size), requires_grad=False)
        # The empty prompt's embedding: the null condition of CFG and of condition dropout.
        self.register_buffer("null_context", torch.zeros(1, context_tokens, context_dim))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, pre_only=i == depth - 1) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # Recompute each joint block in the backward pass (train.activation_checkpointing), as SiT.
        self.activation_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation with adaLN-Zero (REPA's MMDiT uses PyTorch defaults; see module doc)."""
        dit_init_linears_and_patches(self)
        dit_init_time_and_zero_layers(self, [stream.adaLN_modulation[-1] for block in self.joint_blocks
                                             for stream in (block.context_block, block.x_block)])

    def set_null_context(self, null: Tensor) -> None:
        """Store the empty prompt's embedding ``[1, tokens, dim]`` (or ``[tokens, dim]``)."""
        null = null.reshape(1, self.context_tokens, self.context_dim)
        with torch.no_grad():
            self.null_context.copy_(null.to(self.null_context))

    def null_condition(self, y: Tensor) -> Tensor:
        """The null condition for a batch shaped like ``y`` (used by the CFG sampler)."""
        return self.null_context.to(y.dtype).expand(y.shape[0], -1, -1)

    def drop_condition(self, y: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """Condition dropout, as SiT's LabelEmbedder: rows with ``force_drop_ids == 1`` (or, in train
        mode without it, each row with probability ``class_dropout``) become the null context."""
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and self.class_dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout
        else:
            return y
        return torch.where(drop.view(-1, 1, 1), self.null_condition(y), y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_depths: Sequence[int] = (), *,
                force_drop_ids: Tensor | None = None) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Velocity ``[B, C, H, W]`` at ``x_t`` for times ``t [B]`` and text context ``y [B, T, D_text]``."""
        for d in hidden_depths:
            if not 1 <= d <= self.depth:
                raise AhpaError(f"alignment depth {d} is outside the {self.depth} blocks of {self.name}; "
                                f"choose a depth in 1..{self.depth}")
        if y.dim() != 3 or tuple(y.shape[1:]) != (self.context_tokens, self.context_dim):
            raise AhpaError(f"{self.name} expects a text context [B, {self.context_tokens}, {self.context_dim}] "
                            f"(CLIP token embeddings), got {tuple(y.shape)}")
        context = self.context_embedder(self.drop_condition(y, self.training, force_drop_ids))
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)  # no pooled text vector: the timestep embedding alone
        hidden = {}
        for depth, block in enumerate(self.joint_blocks, start=1):
            if self.activation_checkpointing and torch.is_grad_enabled():
                context, x = torch.utils.checkpoint.checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
            if depth in hidden_depths:
                hidden[depth] = x
        out = self.unpatchify(self.final_layer(x, c))
        return (out, hidden) if hidden_depths else out


def build_mmdit(name: str, input_size: int, in_channels: int = 4, context_tokens: int = CLIP_CONTEXT[0],
                context_dim: int = CLIP_CONTEXT[1], class_dropout: float = 0.1) -> MMDiT:
    """Build a registry model, e.g. ``build_mmdit("MMDiT-B/2", input_size=32)`` (REPA's T2I configuration)."""
    if name not in MMDIT_CONFIGS:
        raise AhpaError(f"unknown model '{name}'; valid names: {', '.join(MMDIT_CONFIGS)}")
    return MMDiT(input_size=input_size, in_channels=in_channels, context_tokens=context_tokens,
                 context_dim=context_dim, class_dropout=class_dropout, **MMDIT_CONFIGS[name])
