"""Typed run configuration: YAML presets plus command-line overrides.

One :class:`Config` describes a whole run.  It is built in three layers, each
winning over the one before (REPA's fault of YAML silently overriding flags is
avoided by construction):

1. the dataclass defaults below (the paper's recipe, docs/design.md section 5),
2. a YAML file (``configs/*.yaml``), which may name only known keys,
3. ``section.key=value`` overrides from the command line.

Unknown keys, wrong types and impossible values raise :class:`AhpaError`
naming the key and the accepted values.  The resolved config is written to the
run directory as ``config.yaml`` so that a run can be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ahpa.config_rules import (  # noqa: F401 (the group names are re-exported)
    CHOICES,
    INCEPTION_GROUP,
    LATENT_GROUP,
    METHOD_GROUP,
    TEACHER_GROUP,
    TEACHER_GROUPS,
    VAE_GROUPS,
    validate,
)
from ahpa.errors import AhpaError
from ahpa.io import read_yaml_mapping, write_text_atomic

# The YAML presets (configs/ at the repository root; the README installs the project editable).
PRESETS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    name: str = "SiT-B/2"  # SiT-{T,S,B,L,XL}/{2,4,8} (T: tiny, for CPU)
    num_classes: int = 1000
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = False  # True only to load published SiT-XL/2 weights


@dataclass
class DataConfig:
    source: str = "images"  # images | cache | repa | toy | coco | toy_captions (the last two: captions, MMDiT)
    path: str = ""  # ImageNet-layout folder (images), cache directory (cache) or REPA's DATA/ folder (repa: images/ + vae-sd/)
    resolution: int = 256
    hflip: bool = True  # random flips (raw images only; a cache decides itself)
    num_workers: int = 4
    # The on-the-fly encoder of data.source=images|repa (docs/scale.md, "The on-the-fly encoder"):
    encoder_dtype: str = "auto"  # auto (bfloat16 on a CUDA GPU with bf16, else float32) | float32 | bfloat16
    encoder_memory_format: str = "auto"  # auto (channels_last where the encoder runs in bfloat16 on CUDA) | contiguous | channels_last
    encoder_compile: bool = False  # torch.compile of the encoder pass (one graph; opt-in: it compiles for minutes)


@dataclass
class VAEConfig:
    path: str = "stabilityai/sd-vae-ft-ema"  # local dir, HF repo id (cache only) or "tiny"
    scaling_factor: float = 0.0  # 0: the VAE's own config value (0.18215 for SD-VAE)
    latent_norm: str = "scale"  # scale | channel_stats (iREPA convention, from a cache manifest)


@dataclass
class TransportConfig:
    path: str = "linear"  # linear | cosine
    time_sampling: str = "uniform"  # uniform | lognormal
    time_mean: float = 0.0  # log-normal location
    time_std: float = 1.0  # log-normal scale


@dataclass
class PriorConfig:
    kind: str = "vae_hierarchy"  # none | vae_hierarchy
    groups: list[str] = field(default_factory=lambda: ["G3", "G4"])
    split: str = "4/4"  # SD-VAE 512-channel layers: 4/4 | 2/6 | 6/2
    grouping: str = "auto"  # auto | sd_vae | resolution
    resample: str = "area"  # area (adaptive average pooling) | bilinear
    normalize: str = "token"  # token | none | spatial | irepa (iREPA's (f - alpha mean_T) / (std_T + 1e-6))
    normalize_alpha: float = 0.6  # iREPA's alpha for normalize=irepa (its code default; its README writes 1)
    latent_target: str = "patchify"  # SRA2 group "latent": patchify (p x p -> C p^2 channels) | pool (average)
    # "": full features | "pca:K" / "random:K": the projection of a projected cache (checked against its manifest)
    # | a projection .safetensors file (CACHE/projection.safetensors) for on-the-fly sources (docs/projected-caches.md)
    project: str = ""


@dataclass
class TeacherConfig:
    """The frozen teacher of REPA's recipe: DINOv2 (group ``dinov2`` in prior.groups; ahpa/priors/dinov2.py)
    or Inception-v3 (group ``inception``; ahpa/priors/inception.py)."""

    model: str = "dinov2_vitb14"  # dinov2_vit{s,b,l,g}14[_reg] (REPA: dinov2_vitb14)
    weights: str = ""  # "": the torch-hub / Hugging Face cache; a local .pth/.safetensors file; "random" (tests, toy)
    input_size: int = 0  # 0: 14 x the token grid (REPA: 224 at 256 px, 448 at 512 px)
    layer: str = "Mixed_6e"  # group inception: the Inception-v3 block whose activations are the target (Mixed_5b .. Mixed_7c)


@dataclass
class AlignConfig:
    method: str = "ahpa"  # ahpa | repa | sra2 (labels of the same alignment objective) | vanilla
    router: str = "dynamic"  # dynamic | uniform | linear | lut | attention | content
    time_encoding: str = "linear"  # linear | sinusoidal | fourier
    time_dim: int = 128
    router_hidden: int = 256
    router_depth: int = 4  # 3 | 4 | 8
    lut_bins: int = 10
    prototypes: int = 8
    head: str = "conv3"  # conv3 | linear | mlp3 | mlp5 | convblock2 | convblock3 | convblock5 | sra_mlp
    loss: str = "cosine"  # cosine | l1 | smooth_l1
    weight: float = 1.0  # lambda
    depths: list[int] = field(default_factory=list)  # empty: 25% of the backbone depth
    # Controls of the router's collapse; the defaults are the paper's method (off).
    router_lr_mult: float = 1.0  # router learning rate = train.lr * this (its own AdamW param group)
    router_entropy: float = 0.0  # entropy bonus coefficient on the router's softmaxes (normalised entropy)
    router_temperature: float = 1.0  # softmax temperature of the router's logits
    router_warmup_steps: int = 0  # blend from the static uniform mix to the router over this many steps
    # What trains the router (docs/design.md section 13): "alignment" = the paper (the alignment loss, which drives it
    # to the most predictable target); "usefulness" = the agreement, per sample and t, between each target's alignment
    # gradient and the diffusion gradient at the aligned hidden state (App. E.1's cosine), the router detached from
    # the alignment loss.  router_usefulness is that signal's coefficient.
    router_signal: str = "alignment"
    router_usefulness: float = 1.0


@dataclass
class TrainConfig:
    out: str = "runs/default"
    steps: int = 400_000
    global_batch: int = 256
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = 0.9999
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    compile: bool = False  # torch.compile of the forward + objective (one graph, no breaks)
    fsdp: bool = False  # FSDP2 through accelerate (shards parameters, grads, AdamW state); else DDP
    activation_checkpointing: bool = False  # recompute SiT blocks in backward (L/XL at 512 px)
    tf32: bool = True
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10_000
    ckpt_every: int = 50_000
    keep_last: int = 2
    wandb: bool = False
    max_minutes: float = 0.0  # 0: no wall-clock limit; else save and stop (rerun resumes)
    grid_steps: int = 50  # ODE steps for the periodic EMA sample grids
    init_from: str = ""  # a published REPA .pt (model, ema, opt, projectors) to continue training from
    gsnr_every: int = 0  # 0: off; else a G-SNR estimate at t = 0.1, 0.5, 0.9 to TensorBoard every N steps
    # Stop after this many consecutive steps with a NaN/Inf loss or gradient (each is skipped, EMA untouched).
    # 100: fp16 loss scaling skips ~15 steps while it calibrates, a spike a few; 100 in a row is a divergence.
    max_nonfinite_steps: int = 100


@dataclass
class SampleConfig:
    mode: str = "ode"  # ode | sde
    method: str = "euler"  # euler | heun (ODE)
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_low: float = 0.0  # CFG applies for t in [guidance_low, guidance_high]
    guidance_high: float = 1.0


@dataclass
class TextConfig:
    """Text conditioning of an MMDiT (text-to-image, Appendix C)."""

    encoder: str = "openai/clip-vit-large-patch14"  # local dir, cached HF repo id, or "random" (random-init ViT-L/14 text)
    context_tokens: int = 77  # CLIP tokens given to the MMDiT (77; the offline demo keeps the first 16)
    cache: str = ""  # text cache of `ahpa extract --coco` (CACHE/text); empty: encode captions on the fly
    coco: str = ""  # COCO root for the captions of a feature cache without a text cache
    split: str = "train2014"  # COCO split for data.source=coco


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    text: TextConfig = field(default_factory=TextConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``typ``."""
    origin = typing.get_origin(typ)
    if origin in (list, typing.List):
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, inner) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise AhpaError(f"config key '{key}' expects true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise AhpaError(f"config key '{key}' expects a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if typ is int:
                if float(number) != int(float(number)):
                    raise ValueError
                return int(float(number))
            return float(number)
        except (TypeError, ValueError):
            raise AhpaError(f"config key '{key}' expects {typ.__name__}, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise AhpaError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {typ} for {key}")


def _unknown(key: str, known: list[str]) -> AhpaError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return AhpaError(f"unknown config key '{key}'.{hint} Known keys here: {', '.join(sorted(known))}.")


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg``, converting and checking the value."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise AhpaError(f"config override '{dotted}' must look like section.key=value (e.g. train.steps=1000)")
    section_name, key = parts
    sections = [f.name for f in dataclasses.fields(Config)]
    if section_name not in sections:
        raise _unknown(section_name, sections)
    section = getattr(cfg, section_name)
    types_ = _field_types(type(section))
    if key not in types_:
        raise _unknown(dotted, list(types_))
    setattr(section, key, _coerce(dotted, value, types_[key]))


def merge_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise AhpaError(f"{source}: expected a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    for section_name, values in data.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise AhpaError(f"{source}: section '{section_name}' must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            try:
                set_key(cfg, f"{section_name}.{key}", value)
            except AhpaError as err:
                raise AhpaError(f"{source}: {err}") from None
    return cfg


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise AhpaError(f"override '{item}' must look like section.key=value (e.g. train.global_batch=64)")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then command-line overrides (which win)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            preset = PRESETS / path.name
            if path.name == str(path) and preset.is_file():  # a bare name such as sit-b2-ahpa.yaml
                path = preset
            else:
                raise AhpaError(f"config file '{path}' does not exist; pass a YAML file such as configs/sit-b2-ahpa.yaml")
        for source, data in _yaml_chain(path):  # the bases first: a file wins over the file it inherits
            merge_dict(cfg, data, source=str(source))
    for key, value in parse_overrides(overrides or []):
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


BASE_KEY = "base"  # top-level YAML key: the file this one inherits from (relative to this file)


def _yaml_chain(path: Path) -> list[tuple[Path, dict]]:
    """``[(file, sections)]`` from the root base down to ``path``, following ``base:`` keys.

    A row of a paper table then differs from its base by its own keys only; a cycle is refused.
    """
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    while path is not None:
        path = path.resolve()
        if path in seen:
            cycle = " -> ".join(p.name for p in [*seen, path])
            raise AhpaError(f"config inheritance cycle: {cycle}; remove one of the 'base:' keys")
        seen.append(path)
        data = dict(read_yaml_mapping(path, "config file", "of sections model:, train:, ..."))
        base = data.pop(BASE_KEY, None)
        chain.append((path, data))
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise AhpaError(f"{path}: 'base' must name a YAML file (relative to this file), got {base!r}")
        parent = path.parent / base
        if not parent.is_file():
            raise AhpaError(f"{path}: its base '{base}' does not exist (looked for {parent})")
        path = parent
    return chain[::-1]


# Target groups and the prior each comes from (prior.groups).
def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (write, then rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    cfg = merge_dict(Config(), data)
    validate(cfg)
    return cfg
