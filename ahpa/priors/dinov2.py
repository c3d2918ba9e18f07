"""The frozen DINOv2 teacher of REPA (Yu et al. 2025), as one more prior.

REPA aligns block ``d`` of SiT to DINOv2's normalised patch tokens
(``x_norm_patchtokens``; CLS and registers dropped) through an MLP projector
and a negative cosine loss (weight 0.5).  Here the teacher is a prior beside
the hierarchical VAE prior: its tokens enter ``PriorOutput.features`` as the
group ``"dinov2"``, shaped like a VAE group ``[B, L=1, D, grid, grid]`` (token
``i * grid + j`` at row i, column j, DiT's patch order), and the same
:class:`~ahpa.align.objective.AlignmentObjective` aligns to it (single group,
uniform router, ``mlp3`` head, no normalisation, cosine, weight 0.5).

Facts followed (``docs/baselines.md``, REPA ``utils.py`` L53-101, ``train.py`` L39-60, L301-303):

- architecture: the official ``dinov2_vit{s,b,l,g}14[_reg4]`` ViTs, built with timm
  (``vit_*_patch14[_reg4]_dinov2``: the same modules and key names; LayerScale,
  LayerNorm eps 1e-6, qkv bias, GELU MLP, SwiGLU for g);
- position embedding resampled once, bicubic with antialias (timm
  ``resample_abs_pos_embed``, exactly the call REPA makes), from the 37 x 37 grid
  of the 518-px pretraining to the token grid (16 x 16 at 256 px);
- preprocessing: ``uint8 / 255``, ImageNet mean/std, THEN
  ``F.interpolate(size=14 * grid, mode="bicubic")`` (no antialias, no crop);
- weights: the official ``dinov2_vitb14_pretrain.pth`` (torch-hub cache or a
  local path) or timm's ``model.safetensors`` (Hugging Face cache or a local
  path); official key names are converted by timm's own DINOv2 filter.
  Nothing is ever downloaded.  ``weights="random"`` keeps the random
  initialisation of the real architecture (tests and the offline toy).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import constants, try_to_load_from_cache
from safetensors.torch import load_file
from torch import nn

from ahpa.config import TEACHER_GROUP
from ahpa.errors import AhpaError
from ahpa.io import state_sha256

PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
# REPA's teacher names (torch.hub entry points) -> timm architecture names.
TEACHERS = {
    f"dinov2_vit{s}14{r}": f"vit_{size}_patch14{'_reg4' if r else ''}_dinov2"
    for s, size in _SIZES.items()
    for r in ("", "_reg")
}


def official_filename(name: str) -> str:
    """The official release file of ``name`` (torch.hub saves it under this name)."""
    return f"{name.replace('_reg', '')}{'_reg4' if name.endswith('_reg') else ''}_pretrain.pth"


def timm_repo(name: str) -> str:
    return f"timm/{TEACHERS[name]}.lvd142m"


def _check_name(name: str) -> None:
    if name not in TEACHERS:
        raise AhpaError(f"unknown DINOv2 teacher '{name}'; choose one of: {', '.join(TEACHERS)}")


def find_weights(name: str) -> Path:
    """The weight file of teacher ``name`` in the torch-hub or Hugging Face cache (never downloads)."""
    _check_name(name)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / official_filename(name)
    if hub.is_file():
        return hub

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(timm_repo(name), filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str):
            return Path(found)
    raise AhpaError(
        f"DINOv2 weights for {name} not found: put {official_filename(name)} (https://dl.fbaipublicfiles.com/dinov2/) in {hub.parent}, "
        f"or `hf download {timm_repo(name)}` into the Hugging Face cache, or set teacher.weights=/path/to/{official_filename(name)}"
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AhpaError(f"DINOv2 weight file '{path}' does not exist; pass the official {'dinov2_vitb14_pretrain.pth'}-style file or timm's model.safetensors")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types on a damaged file
        raise AhpaError(f"DINOv2 weight file '{path}' is not readable ({type(err).__name__}); re-download it") from None
    for key in ("model", "state_dict", "teacher"):  # wrapped training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict) and "pos_embed" not in state:
            state = state[key]
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise AhpaError(f"'{path}' is not a DINOv2 state dict (no 'pos_embed' tensor); pass the official *_pretrain.pth or timm's model.safetensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


class DINOv2Teacher(nn.Module):
    """Frozen DINOv2 ViT whose normalised patch tokens are REPA's alignment target.

    Args:
        name: ``dinov2_vit{s,b,l,g}14[_reg]`` (REPA: ``dinov2_vitb14``, no registers).
        grid: the SiT token grid side (16 at 256 px for /2 models); the teacher sees
            ``input_size = 14 * grid`` pixels (224 at 256 px, 448 at 512 px).
        weights: ``""`` (search the torch-hub and Hugging Face caches), a file path, or
            ``"random"`` (the real architecture, randomly initialised).
        input_size: 0 for ``14 * grid``; otherwise must equal it (checked).

    Images (``preprocess`` / ``forward``): ``[B, 3, H, W]``, either uint8 in [0, 255] or
    float in [-1, 1] (the project's training convention, ``uint8 / 127.5 - 1``);
    ``(x + 1) / 2`` equals REPA's ``uint8 / 255``.
    """

    group = TEACHER_GROUP  # its features' group name in PriorOutput.features, caches and configs

    def __init__(self, name: str = "dinov2_vitb14", grid: int = 16, weights: str = "", input_size: int = 0):
        super().__init__()
        import timm  # timm: slow to import, only a run with a DINOv2 teacher needs it

        _check_name(name)
        if grid < 1:
            raise AhpaError(f"the DINOv2 teacher needs a positive token grid, got {grid}")
        if input_size and input_size != PATCH * grid:
            raise AhpaError(
                f"teacher.input_size={input_size} gives a {input_size // PATCH}x{input_size // PATCH} DINOv2 token grid, but the SiT token grid "
                f"is {grid}x{grid}; set teacher.input_size={PATCH * grid} (or 0)"
            )
        self.name, self.grid, self.input_size = name, grid, PATCH * grid
        self.weights = "random" if weights == "random" else str(Path(weights) if weights else find_weights(name))
        state = None if self.weights == "random" else _read_state(Path(self.weights))
        # With weights to load, build on the meta device (no random initialisation of 86M+ parameters).
        with torch.device("meta") if state is not None else torch.device("cpu"):
            self.model = timm.create_model(TEACHERS[name], pretrained=False, img_size=self.input_size, num_classes=0)
        self.embed_dim = self.model.embed_dim
        self.num_prefix_tokens = self.model.num_prefix_tokens  # CLS (+ 4 registers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if state is not None:
            self.load_weights(state, Path(self.weights))
        self.requires_grad_(False).eval()

    @property
    def randomly_initialised(self) -> bool:
        return self.weights == "random"

    def load_weights(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """Load an official (``*_pretrain.pth``) or timm DINOv2 state dict (read from ``path``), resampling ``pos_embed``."""
        from timm.models.vision_transformer import checkpoint_filter_fn  # timm: slow to import (see __init__)

        own = self.model.state_dict()
        width = state.get("cls_token", state["pos_embed"]).shape[-1]
        if width != self.embed_dim or ("register_tokens" in state or "reg_token" in state) != (self.num_prefix_tokens > 1):
            regs = "with" if ("register_tokens" in state or "reg_token" in state) else "without"
            raise AhpaError(f"DINOv2 weights '{path}' are a width-{width} ViT {regs} registers, not {self.name} (width {self.embed_dim}); "
                            f"set teacher.model to match the file or pass the {official_filename(self.name)} weights")
        converted = checkpoint_filter_fn(dict(state), self.model)  # official names -> timm, pos_embed -> grid
        missing = sorted(set(own) - set(converted))
        unexpected = sorted(set(converted) - set(own))
        wrong = [k for k in own if k in converted and converted[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            first = (f"tensor '{wrong[0]}' is {list(converted[wrong[0]].shape)} in the file, {list(own[wrong[0]].shape)} in {self.name}" if wrong
                     else f"tensor '{missing[0]}' is missing" if missing else f"unexpected tensor '{unexpected[0]}'")
            raise AhpaError(f"DINOv2 weights '{path}' do not fit {self.name}: {first}; pass the {official_filename(self.name)} weights or change teacher.model")
        self.model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in converted.items()}, assign=True)
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:
            raise AhpaError(f"DINOv2 weights '{path}' left '{left[0]}' unset in {self.name}")

    def describe(self) -> dict:
        """What determines the teacher features (for feature-cache manifests)."""
        return {"model": self.name, "weights_hash": state_sha256(self.model), "input_size": self.input_size, "grid": self.grid,
                "embed_dim": self.embed_dim, "preprocess": "repa"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """REPA's preprocessing: ``/255`` (here ``(x + 1) / 2`` for [-1, 1] floats), ImageNet mean/std,
        then bicubic resize to ``input_size`` (normalise first, no antialias, no crop)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise AhpaError(f"the DINOv2 teacher expects RGB images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else (images.float() + 1.0) / 2.0
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return F.interpolate(x, size=self.input_size, mode="bicubic")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``x_norm_patchtokens`` ``[B, grid * grid, D]`` (float32) of ``images`` (see class docstring)."""
        dev = next(self.model.parameters()).device
        tokens = self.model.forward_features(self.preprocess(images.to(dev)))
        return tokens[:, self.num_prefix_tokens :].float()

    def grid_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher tokens as a prior group: ``[B, 1, D, grid, grid]`` (token i*grid+j -> row i, col j)."""
        tokens = self(images)
        B, N, D = tokens.shape
        return tokens.transpose(1, 2).reshape(B, 1, D, self.grid, self.grid)


def teacher_width(name: str) -> int:
    """Embedding width of a DINOv2 teacher (its hub name), without building it."""
    _check_name(name)
    return {"s": 384, "b": 768, "l": 1024, "g": 1536}[name.split("_vit")[1][0]]


def teacher_cache_fields(teacher: DINOv2Teacher) -> dict:
    """The manifest entry of cached teacher features (``manifest["teachers"]["dinov2"]``)."""
    return teacher.describe()


def check_cache_teacher(manifest: dict, path, group: str, want: dict, backbone: str = "the model") -> None:
    """Refuse a run that aligns to a teacher group (``dinov2`` or ``inception``) on a cache written without its
    features, or with another teacher, layer, grid or input size.

    ``want`` holds the fields of the teacher's ``describe()`` the run needs (model or layer, grid, input
    size); the weights' hash is recorded for provenance only (a cache run needs no teacher weights).
    """
    stored = (manifest.get("teachers") or {}).get(group)
    flag = "inception" if group != TEACHER_GROUP else want.get("model", "dinov2_vitb14")
    label = "DINOv2" if group == TEACHER_GROUP else group.capitalize()
    if stored is None or group not in manifest.get("features", {}):
        raise AhpaError(
            f"feature cache '{path}' holds no {label} teacher features (missing prior '{group}'; it holds {sorted(manifest.get('features', {}))}); "
            f"re-extract it with `ahpa extract ... --teacher {flag}`, or train from images (data.source=images computes the teacher on the fly)"
        )
    for key, value in want.items():
        if stored.get(key) == value:
            continue
        if key == "grid":
            raise AhpaError(f"feature cache '{path}' holds {label} teacher features on a {stored.get('grid')}x{stored.get('grid')} grid "
                            f"({stored.get('input_size')} px), but {backbone} has a {value}x{value} token grid here; re-extract with --config of this model (or --grid {value})")
        raise AhpaError(f"feature cache '{path}' holds {label} teacher features with {key}={stored.get(key)!r}, the run asks for "
                        f"teacher.{key}={value!r}; re-extract with that teacher or set teacher.{key} to the cached one")
