"""Hierarchical VAE priors: the frozen encoder's layers as alignment targets.

docs/design.md section 2, paper Sec. 4.2, App. A (Table A.8), App. B and App. D.2.  The
encoder's layers are grouped G1..G4 (shallow to deep); the selected groups'
feature maps are caught by forward hooks during the ONE ``vae.encode`` call that
also yields the latent moments, and each map is resampled to the token grid
inside its hook, so no full-resolution map outlives its layer.

Groupings (``layer_groups``):

- ``"sd_vae"`` (Table A.8): the 15 layers of ``SD_VAE_LAYERS``; G1 = the four
  128-channel layers, G2 = the three 256-channel layers, and the eight
  512-channel layers split between G3 and G4 as ``"4/4"`` (default), ``"2/6"``
  or ``"6/2"`` (App. D.2: layers in G3 / layers in G4).
- ``"resolution"`` (App. B, any diffusers ``AutoencoderKL`` encoder): a layer's
  resolution level is the number of 2x downsamplings before its output.  G4 =
  the lowest-resolution level, G3 = the level before it, then G2, G1; levels
  above G1's resolution are not used.  diffusers widens channels at a block's
  first resnet, so a downsampler output still has the previous stage's width:
  a layer whose width differs from its level's width (the width of the level's
  last layer) joins the previous, higher-resolution level.  Every group then
  has one width (checked), as the router sums layers within a group.  On
  SD-VAE's architecture this gives exactly the ``"sd_vae"`` 2/6 split.
- ``"auto"``: ``"sd_vae"`` when the encoder has SD-VAE's architecture (same 15
  layers and widths; SDXL-VAE and FLUX/SD3-style VAEs share it), else
  ``"resolution"``.  App. B grouped SDXL-VAE by resolution: pass
  ``grouping="resolution"`` to reproduce it.

Resampling to the ``grid x grid`` token grid (``resample_to_grid``):
``"area"`` (default, Sec. 4.2) is adaptive average pooling, the exact mean over
each ``f x f`` block when the map side is ``f * grid``; ``"bilinear"`` (App. A)
is ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``,
which reads only the 2x2 pixels around each token centre when downsampling.

The cheap on-the-fly pass (docs/scale.md, "The on-the-fly encoder"): the pass always runs under
``torch.inference_mode`` (its outputs are handed back as ordinary tensors); ``precision="bfloat16"``
runs it under bf16 autocast, ``channels_last=True`` in channels-last memory, and ``compile=True``
through ``torch.compile`` of :meth:`HierarchicalVAEPrior.walk`, a hook-free copy of the encoder's
block order (the hooks' forward, checked equal to it by the tests).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ahpa.errors import AhpaError
from ahpa.priors.base import PriorOutput
from ahpa.priors.vae import check_encoder, encoder_hash, vae_in_channels

GROUPS = ("G1", "G2", "G3", "G4")
GROUPINGS = ("auto", "sd_vae", "resolution")
SPLITS = {"4/4": 4, "2/6": 2, "6/2": 6}  # split -> number of 512-channel layers in G3 (App. D.2)
RESAMPLES = ("area", "bilinear")
PRECISIONS = ("float32", "bfloat16")

# diffusers AutoencoderKL kwargs of stabilityai/sd-vae-ft-ema (its config.json): the
# architecture the groupings below are written for.  ``AutoencoderKL(**SD_VAE_CONFIG)``
# gives a randomly initialised copy for tests and benchmarks (no weights needed).
SD_VAE_CONFIG = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
    }
)

# docs/design.md section 2 table / Table A.8: SD-VAE's 15 encoder layers and their output widths.
# Other encoders of App. B, transcribed from their config.json (diffusers kwargs; tests build
# randomly initialised copies).  SDXL-VAE, SD3 and FLUX keep SD-VAE's encoder layout; the 16-channel
# ones change the latent width, scale and shift and drop quant_conv.
_SD_LAYOUT = {k: SD_VAE_CONFIG[k] for k in ("in_channels", "out_channels", "down_block_types", "up_block_types",
                                            "block_out_channels", "layers_per_block", "act_fn", "norm_num_groups")}
SDXL_VAE_CONFIG = MappingProxyType(  # stabilityai/sdxl-vae
    {**_SD_LAYOUT, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
)
SD3_VAE_CONFIG = MappingProxyType(  # stabilityai/stable-diffusion-3-medium-diffusers, vae/
    {**_SD_LAYOUT, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
     "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}
)
FLUX_VAE_CONFIG = MappingProxyType(  # black-forest-labs/FLUX.1-dev, vae/
    {**_SD_LAYOUT, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
     "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}
)
# openai/consistency-decoder (diffusers ConsistencyDecoderVAE): SD-VAE's encoder, a UNet consistency decoder.
CONSISTENCY_DECODER_CONFIG = MappingProxyType(
    {
        "scaling_factor": 0.18215, "latent_channels": 4, "sample_size": 32,
        "encoder_act_fn": "silu", "encoder_block_out_channels": (128, 256, 512, 512), "encoder_double_z": True,
        "encoder_down_block_types": ("DownEncoderBlock2D",) * 4, "encoder_in_channels": 3,
        "encoder_layers_per_block": 2, "encoder_norm_num_groups": 32, "encoder_out_channels": 4,
        "decoder_add_attention": False, "decoder_block_out_channels": (320, 640, 1024, 1024),
        "decoder_down_block_types": ("ResnetDownsampleBlock2D",) * 4, "decoder_downsample_padding": 1,
        "decoder_in_channels": 7, "decoder_layers_per_block": 3, "decoder_norm_eps": 1e-5,
        "decoder_norm_num_groups": 32, "decoder_num_train_timesteps": 1024, "decoder_out_channels": 6,
        "decoder_resnet_time_scale_shift": "scale_shift", "decoder_time_embedding_type": "learned",
        "decoder_up_block_types": ("ResnetUpsampleBlock2D",) * 4,
    }
)

SD_VAE_LAYERS = (
    "encoder.conv_in",
    "encoder.down_blocks.0.resnets.0",
    "encoder.down_blocks.0.resnets.1",
    "encoder.down_blocks.0.downsamplers.0",
    "encoder.down_blocks.1.resnets.0",
    "encoder.down_blocks.1.resnets.1",
    "encoder.down_blocks.1.downsamplers.0",
    "encoder.down_blocks.2.resnets.0",
    "encoder.down_blocks.2.resnets.1",
    "encoder.down_blocks.2.downsamplers.0",
    "encoder.down_blocks.3.resnets.0",
    "encoder.down_blocks.3.resnets.1",
    "encoder.mid_block.resnets.0",
    "encoder.mid_block.attentions.0",
    "encoder.mid_block.resnets.1",
)
SD_VAE_CHANNELS = (128,) * 4 + (256,) * 3 + (512,) * 8


@dataclass(frozen=True)
class EncoderLayer:
    path: str  # module path relative to the AutoencoderKL
    channels: int  # output channels
    level: int  # 2x downsamplings before its output: the map side is image_side / 2**level


def encoder_layers(vae: AutoencoderKL) -> list[EncoderLayer]:
    """The encoder's layers in forward order: conv_in, each down block's resnets and
    downsampler, then the mid block (resnets[0], then attention/resnet pairs)."""
    encoder = vae.encoder
    layers = [EncoderLayer("encoder.conv_in", encoder.conv_in.out_channels, 0)]
    level = 0
    for i, block in enumerate(encoder.down_blocks):
        for j, resnet in enumerate(block.resnets):
            layers.append(EncoderLayer(f"encoder.down_blocks.{i}.resnets.{j}", resnet.out_channels, level))
        for j, downsampler in enumerate(block.downsamplers or ()):
            level += 1
            layers.append(EncoderLayer(f"encoder.down_blocks.{i}.downsamplers.{j}", downsampler.out_channels, level))
    mid = encoder.mid_block
    layers.append(EncoderLayer("encoder.mid_block.resnets.0", mid.resnets[0].out_channels, level))
    for i, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attention is not None:
            layers.append(EncoderLayer(f"encoder.mid_block.attentions.{i}", attention.out_dim, level))
        layers.append(EncoderLayer(f"encoder.mid_block.resnets.{i + 1}", resnet.out_channels, level))
    return layers


def is_sd_vae(vae: AutoencoderKL) -> bool:
    """Whether the encoder has SD-VAE's 15 layers with SD-VAE's widths."""
    layers = encoder_layers(vae)
    return tuple((l.path, l.channels) for l in layers) == tuple(zip(SD_VAE_LAYERS, SD_VAE_CHANNELS))


def resolve_grouping(vae: AutoencoderKL, grouping: str = "auto") -> str:
    """``"auto"`` -> ``"sd_vae"`` or ``"resolution"``; checks that ``"sd_vae"`` applies."""
    if grouping not in GROUPINGS:
        raise AhpaError(f"unknown prior grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    sd_vae = is_sd_vae(vae)
    if grouping == "auto":
        return "sd_vae" if sd_vae else "resolution"
    if grouping == "sd_vae" and not sd_vae:
        raise AhpaError("prior grouping 'sd_vae' needs SD-VAE's encoder architecture; use grouping 'resolution'")
    return grouping


def grouped_layers(vae: AutoencoderKL, grouping: str = "auto", split: str = "4/4") -> dict[str, list[EncoderLayer]]:
    """Group name -> its layers in forward order, for the groups this encoder has."""
    if split not in SPLITS:
        raise AhpaError(f"unknown prior split {split!r}; choose one of {', '.join(SPLITS)}")
    layers = encoder_layers(vae)
    if resolve_grouping(vae, grouping) == "sd_vae":
        g3_end = 7 + SPLITS[split]
        return {"G1": layers[:4], "G2": layers[4:7], "G3": layers[7:g3_end], "G4": layers[g3_end:]}
    width = {layer.level: layer.channels for layer in layers}  # the last layer of each level wins
    levels = sorted(width, reverse=True)  # lowest resolution first
    groups: dict[str, list[EncoderLayer]] = {}
    for layer in layers:
        level = layer.level if layer.channels == width[layer.level] else layer.level - 1
        rank = levels.index(level)
        if rank < len(GROUPS):
            groups.setdefault(GROUPS[-1 - rank], []).append(layer)
    for name, members in groups.items():
        if len({layer.channels for layer in members}) != 1:
            paths = ", ".join(f"{l.path} ({l.channels})" for l in members)
            raise AhpaError(f"resolution grouping gives {name} mixed channel widths: {paths}; this encoder is unsupported")
    return {name: groups[name] for name in GROUPS if name in groups}


def layer_groups(vae: AutoencoderKL, grouping: str = "auto", split: str = "4/4") -> dict[str, list[str]]:
    """Group name -> module paths (relative to the AutoencoderKL), docs/design.md section 2."""
    return {name: [layer.path for layer in members] for name, members in grouped_layers(vae, grouping, split).items()}


def resample_to_grid(x: torch.Tensor, grid: int, mode: str = "area") -> torch.Tensor:
    """Resample ``[B, C, H, W]`` to ``[B, C, grid, grid]`` (Sec. 4.2 area pooling, or App. A bilinear)."""
    if mode == "area":
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)


class HierarchicalVAEPrior:
    """Latent moments and grouped encoder features of a frozen VAE, from one encoder pass.

    ``prior(images)`` takes images in [-1, 1], ``[B, 3, H, W]``, and returns a
    ``PriorOutput`` whose features map each selected group to
    ``[B, L_k, C_k, grid, grid]`` float32 (not normalised).  Works under autocast;
    moments and features are returned as float32.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        groups: Sequence[str] = ("G3", "G4"),
        grid: int = 16,
        grouping: str = "auto",
        split: str = "4/4",
        resample: str = "area",
        *,
        precision: str = "float32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise AhpaError(f"unknown encoder precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if resample not in RESAMPLES:
            raise AhpaError(f"unknown prior resample {resample!r}; choose one of {', '.join(RESAMPLES)}")
        if grid < 1:
            raise AhpaError(f"prior grid must be a positive token-grid side, got {grid}")
        check_encoder(vae)
        self.vae = vae
        self.grid = grid
        self.resample = resample
        self.grouping = resolve_grouping(vae, grouping)
        self.split = split if self.grouping == "sd_vae" else None
        available = grouped_layers(vae, self.grouping, split)
        unknown = [g for g in groups if g not in available]
        if unknown:
            raise AhpaError(
                f"prior groups {unknown} do not exist for this encoder ({self.grouping} grouping); "
                f"available: {', '.join(available)}"
            )
        self.layers = {name: available[name] for name in GROUPS if name in groups}
        self._hooked = {l.path: vae.get_submodule(l.path) for members in self.layers.values() for l in members}
        self.precision, self.channels_last = precision, channels_last
        if channels_last:  # the encoder's convolutions read NHWC weights; values (and encoder_hash) unchanged
            vae.encoder.to(memory_format=torch.channels_last)
            if vae.quant_conv is not None:
                vae.quant_conv.to(memory_format=torch.channels_last)
        # one graph of the whole pass (no hooks: Dynamo would bake hook registration into its guards)
        self._walk = torch.compile(self.walk) if compile else None

    @property
    def group_shapes(self) -> dict[str, tuple[int, int]]:
        """Group name -> (L_k layers, C_k channels)."""
        return {name: (len(members), members[0].channels) for name, members in self.layers.items()}

    def describe(self) -> dict:
        """Everything that determines the features, for feature-cache manifests (JSON-serialisable)."""
        return {
            "encoder_hash": encoder_hash(self.vae),
            "grouping": self.grouping,
            "split": self.split,
            "groups": list(self.layers),
            "layers": {name: [l.path for l in members] for name, members in self.layers.items()},
            "channels": {name: members[0].channels for name, members in self.layers.items()},
            "resample": self.resample,
            "grid": self.grid,
        }

    def _hook(self, store: list[torch.Tensor]) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # Pool in the layer's dtype (bf16 under autocast), keep float32.
            store.append(resample_to_grid(output, self.grid, self.resample).float())

        return hook

    def walk(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder's forward block by block, as diffusers' ``Encoder.forward`` and ``DownEncoderBlock2D`` /
        ``UNetMidBlock2D.forward`` order it (the layers :func:`encoder_layers` lists): (the posterior's
        parameters, hooked path -> its output resampled to the grid, float32).  No hooks, no side effects:
        what ``torch.compile`` turns into one graph."""
        vae, enc, found = self.vae, self.vae.encoder, {}

        def keep(path: str, h: torch.Tensor) -> torch.Tensor:
            if path in self._hooked:
                found[path] = resample_to_grid(h, self.grid, self.resample).float()
            return h

        h = keep("encoder.conv_in", enc.conv_in(images))
        for i, block in enumerate(enc.down_blocks):
            for j, resnet in enumerate(block.resnets):
                h = keep(f"encoder.down_blocks.{i}.resnets.{j}", resnet(h, temb=None))
            for j, downsampler in enumerate(block.downsamplers or ()):
                h = keep(f"encoder.down_blocks.{i}.downsamplers.{j}", downsampler(h))
        mid = enc.mid_block
        h = keep("encoder.mid_block.resnets.0", mid.resnets[0](h, None))
        for i, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            if attention is not None:
                h = keep(f"encoder.mid_block.attentions.{i}", attention(h, temb=None))
            h = keep(f"encoder.mid_block.resnets.{i + 1}", resnet(h, None))
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        return (vae.quant_conv(h) if vae.quant_conv is not None else h), found

    def _hooked_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``vae.encode`` with a forward hook on each selected layer (a slicing VAE calls each hook per image)."""
        outputs: dict[str, list[torch.Tensor]] = {path: [] for path in self._hooked}
        handles = [module.register_forward_hook(self._hook(outputs[p])) for p, module in self._hooked.items()]
        try:
            moments = self.vae.encode(images).latent_dist.parameters
        finally:
            for handle in handles:
                handle.remove()
        return moments, {path: torch.cat(maps) for path, maps in outputs.items()}

    def __call__(self, images: torch.Tensor) -> PriorOutput:
        channels = vae_in_channels(self.vae)
        if images.ndim != 4 or images.shape[1] != channels or not images.is_floating_point():
            raise AhpaError(
                f"prior expects float images in [-1, 1], [B, {channels}, H, W]; got {images.dtype} {tuple(images.shape)}"
            )
        if getattr(self.vae, "use_tiling", False):
            raise AhpaError("tiled VAE encoding splits the feature maps; call vae.disable_tiling() before extraction")
        device = self.vae.device
        # float16 autocast overflows SDXL-VAE's activations (force_upcast): encode in float32 then
        upcast = (getattr(self.vae.config, "force_upcast", True) and torch.amp.is_autocast_available(device.type)
                  and torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16)
        if upcast:
            amp = torch.autocast(device.type, enabled=False)
        elif self.precision == "bfloat16":
            amp = torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            amp = nullcontext()
        x = images.to(device, self.vae.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), amp:
            moments, found = (self._walk or self._hooked_pass)(x)
        # Outside inference mode: the posterior and the stacked maps are ordinary tensors (training may save them).
        # The clone makes the inference tensor an ordinary one with the same strides (convolutions may return
        # channels-last moments even from contiguous inputs); the mean stays a view of the moments, as vae.encode
        # returns it, so that everything downstream computes as in 0.3.0, bit for bit (tests/test_compat_030.py).
        posterior = DiagonalGaussianDistribution(moments.float().clone())
        features = {
            name: torch.stack([found[l.path] for l in members], dim=1).contiguous()
            for name, members in self.layers.items()
        }
        return PriorOutput(posterior.mean, posterior.std, features)
