"""The accepted values of the config keys and the rules a config must satisfy before anything runs.

:func:`validate` is called on every config :mod:`ahpa.config` builds; each refusal names the key, its
value and what to set instead (docs/design.md section 10).  This module reads a config by attribute only,
so it needs nothing from :mod:`ahpa.config`.
"""

from __future__ import annotations

import dataclasses
import math

from ahpa.errors import AhpaError

CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("images", "cache", "repa", "toy", "coco", "toy_captions"),
    "data.encoder_dtype": ("auto", "float32", "bfloat16"),
    "data.encoder_memory_format": ("auto", "contiguous", "channels_last"),
    "vae.latent_norm": ("scale", "channel_stats"),
    "transport.path": ("linear", "cosine"),
    "transport.time_sampling": ("uniform", "lognormal"),
    "prior.kind": ("none", "vae_hierarchy"),
    "prior.split": ("4/4", "2/6", "6/2"),
    "prior.grouping": ("auto", "sd_vae", "resolution"),
    "prior.resample": ("area", "bilinear"),
    "prior.normalize": ("token", "none", "spatial", "irepa"),
    "prior.latent_target": ("patchify", "pool"),
    "teacher.model": tuple(f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")),
    # the Inception teacher's selectable blocks (ahpa/priors/inception.py LAYERS; a test keeps the two equal)
    "teacher.layer": ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                      "Mixed_7a", "Mixed_7b", "Mixed_7c"),
    "align.method": ("ahpa", "repa", "sra2", "vanilla"),
    "align.router": ("dynamic", "uniform", "linear", "lut", "attention", "content"),
    "align.time_encoding": ("linear", "sinusoidal", "fourier"),
    "align.head": ("conv3", "linear", "mlp3", "mlp5", "convblock2", "convblock3", "convblock5", "sra_mlp"),
    "align.loss": ("cosine", "l1", "smooth_l1"),
    "align.router_signal": ("alignment", "usefulness"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "sample.mode": ("ode", "sde"),
    "sample.method": ("euler", "heun"),
    "text.split": ("train2014", "val2014"),
}

VAE_GROUPS = ("G1", "G2", "G3", "G4")  # hierarchical VAE prior (ahpa/priors/hierarchy.py)
TEACHER_GROUP = "dinov2"  # DINOv2 teacher, REPA (ahpa/priors/dinov2.py)
INCEPTION_GROUP = "inception"  # Inception-v3 teacher, REPA's recipe with another network (ahpa/priors/inception.py)
TEACHER_GROUPS = (TEACHER_GROUP, INCEPTION_GROUP)  # the frozen pretrained teachers; a run aligns to at most one
LATENT_GROUP = "latent"  # VAE posterior mean, SRA2-style (ahpa/priors/latent.py)
METHOD_GROUP = {"repa": TEACHER_GROUPS, "sra2": (LATENT_GROUP,)}  # the groups a method label accepts (any one of them)


PROJECTION_KINDS = ("pca", "random")  # projected feature caches (docs/projected-caches.md)


def parse_projection(value: str) -> tuple[str, int] | None:
    """``"pca:64"`` -> ``("pca", 64)``; ``""`` or a projection file's path -> None; anything else -> AhpaError."""
    if not value or value.endswith(".safetensors"):
        return None
    kind, _, k = value.partition(":")
    if kind not in PROJECTION_KINDS or not k.isdigit() or int(k) < 1:
        raise AhpaError(f"projection {value!r} is not pca:K, random:K (K >= 1) or a projection .safetensors file; "
                        "e.g. prior.project=pca:64 (docs/projected-caches.md)")
    return kind, int(k)


def validate(cfg) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise AhpaError(f"config key '{dotted}' is {value!r}; choose one of: {', '.join(allowed)}")
    if cfg.train.global_batch < 1:
        raise AhpaError("config key 'train.global_batch' must be at least 1")
    if cfg.train.steps < 0:
        raise AhpaError("config key 'train.steps' must be non-negative")
    for key in ("log_every", "keep_last"):
        if getattr(cfg.train, key) < 1:
            raise AhpaError(f"config key 'train.{key}' must be at least 1")
    if cfg.train.gsnr_every < 0:
        raise AhpaError("config key 'train.gsnr_every' must be 0 (off) or a positive number of steps")
    if cfg.sample.cfg_scale != 1.0 and cfg.model.class_dropout == 0:
        raise AhpaError("sample.cfg_scale != 1 needs the null class that label dropout trains; set model.class_dropout > 0 (0.1) or sample.cfg_scale=1")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise AhpaError("config key 'train.ema_decay' must lie in [0, 1)")
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise AhpaError("sample.guidance_low and sample.guidance_high must satisfy 0 <= low <= high <= 1")
    if cfg.data.source == "coco" and not cfg.data.path:
        raise AhpaError("data.source is 'coco' but data.path is empty; set data.path=/path/to/coco (train2014/, annotations/)")
    if cfg.data.source in ("images", "cache", "repa") and not cfg.data.path:
        folder = {"images": "imagenet/train", "cache": "cache", "repa": "DATA (REPA's images/ and vae-sd/)"}[cfg.data.source]
        raise AhpaError(f"data.source is '{cfg.data.source}' but data.path is empty; set data.path=/path/to/{folder}")
    if cfg.data.source == "repa" and cfg.data.hflip:
        raise AhpaError("data.source=repa reads the latents REPA stored for the unflipped images (REPA trains without flips); "
                        "set data.hflip=false")
    known = (*VAE_GROUPS, *TEACHER_GROUPS, LATENT_GROUP)
    bad = [g for g in cfg.prior.groups if g not in known]
    if bad:
        raise AhpaError(f"prior.groups has unknown group {bad[0]!r}; choose from: {', '.join(known)}")
    if len(set(cfg.prior.groups)) != len(cfg.prior.groups):
        raise AhpaError(f"prior.groups {cfg.prior.groups} names a group twice")
    need = METHOD_GROUP.get(cfg.align.method)
    if need and not set(need) & set(cfg.prior.groups):
        raise AhpaError(f"align.method={cfg.align.method} aligns to the '{need[0]}' group, but prior.groups is {cfg.prior.groups}; "
                        f"set prior.groups=[{need[0]}]" + (f" (or [{need[1]}])" if len(need) > 1 else ""))
    teachers = [g for g in cfg.prior.groups if g in TEACHER_GROUPS]
    if len(teachers) > 1:
        raise AhpaError(f"prior.groups names two teachers {teachers}; a run aligns to one frozen teacher: keep one of them")
    if cfg.align.router_signal == "usefulness" and cfg.align.router in ("uniform", "linear"):
        raise AhpaError(f"align.router_signal=usefulness trains the router, but align.router={cfg.align.router} has nothing to train; "
                        "use align.router=dynamic (or lut, attention, content)")
    if cfg.align.method != "vanilla" and cfg.prior.kind == "none":
        raise AhpaError(f"align.method={cfg.align.method} needs a prior; set prior.kind=vae_hierarchy (or align.method=vanilla)")
    if cfg.prior.project:
        parse_projection(cfg.prior.project)
        other = [g for g in cfg.prior.groups if g not in VAE_GROUPS]
        if other:
            raise AhpaError(f"prior.project={cfg.prior.project} projects the VAE groups only, but prior.groups has {other[0]!r}; "
                            "drop it or set prior.project to \"\" (docs/projected-caches.md)")
    if cfg.teacher.input_size and (cfg.teacher.input_size < 0 or cfg.teacher.input_size % 14):
        raise AhpaError(f"teacher.input_size={cfg.teacher.input_size} must be a multiple of the DINOv2 patch size 14 (or 0: 14 x the token grid)")
    if any(d < 1 for d in cfg.align.depths):
        raise AhpaError("align.depths are 1-indexed block numbers (>= 1)")
    if cfg.align.router_temperature <= 0:
        raise AhpaError("config key 'align.router_temperature' must be > 0 (1 = the paper's softmax)")
    for key in ("router_lr_mult", "router_entropy", "router_warmup_steps"):
        if getattr(cfg.align, key) < 0:
            raise AhpaError(f"config key 'align.{key}' must be >= 0")
    _validate_ranges(cfg)


def _validate_ranges(cfg) -> None:
    """Numbers outside their meaningful range (issue 9): refused before anything runs."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise AhpaError(f"config key '{section.name}.{f.name}' is {v!r}; it must be a finite number")
    t = cfg.train
    rules = [
        (t.lr > 0, "train.lr", "must be positive (e.g. 1e-4)"),
        (len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas), "train.betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
        (t.weight_decay >= 0, "train.weight_decay", "must be non-negative"),
        (t.grad_clip >= 0, "train.grad_clip", "must be non-negative (0: no clipping)"),
        (t.ckpt_every >= 0, "train.ckpt_every", "must be non-negative (0: only at the end)"),
        (t.sample_every >= 0, "train.sample_every", "must be non-negative (0: no periodic grids)"),
        (t.max_minutes >= 0, "train.max_minutes", "must be non-negative (0: no limit)"),
        (t.grid_steps >= 1, "train.grid_steps", "must be at least 1"),
        (t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1"),
        (0.0 <= cfg.model.class_dropout < 1.0, "model.class_dropout", "must lie in [0, 1)"),
        (cfg.model.num_classes >= 1, "model.num_classes", "must be at least 1"),
        (cfg.data.num_workers >= 0, "data.num_workers", "must be non-negative (0: load in the main process)"),
        (cfg.data.resolution >= 8, "data.resolution", "must be a positive image side in pixels (e.g. 256)"),
        (cfg.align.weight >= 0, "align.weight", "must be non-negative (lambda)"),
        (min(cfg.align.time_dim, cfg.align.router_hidden, cfg.align.lut_bins, cfg.align.prototypes) >= 1,
         "align.time_dim/router_hidden/lut_bins/prototypes", "must be at least 1"),
        (cfg.transport.time_std > 0, "transport.time_std", "must be positive"),
        (cfg.vae.scaling_factor >= 0, "vae.scaling_factor", "must be non-negative (0: the VAE's own)"),
        (cfg.sample.steps >= 1, "sample.steps", "must be at least 1"),
        (cfg.sample.cfg_scale >= 0, "sample.cfg_scale", "must be non-negative (1: no guidance)"),
    ]
    for ok, key, rule in rules:
        if not ok:
            value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1], None) if "/" not in key else None
            raise AhpaError(f"config key '{key}' {'is ' + repr(value) + '; it ' if value is not None else ''}{rule}")
