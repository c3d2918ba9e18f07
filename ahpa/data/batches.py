"""Training batches from any source, in one shape.

Every source yields, per step and rank, a dict on the training device::

    {"y": [b] long, "latent_mean": [b,C,h,w], "latent_std": [b,C,h,w],
     "features": {group: [b, L, C_k, H, W]}}      # features only when a prior needs them

- ``toy``: the bundled digits, encoded once by the tiny VAE and kept in memory.
- ``images``: an ImageNet-layout folder, decoded by DataLoader workers and
  encoded on the device by the one-pass hierarchical prior (small data sets).
- ``cache``: the memory-mapped feature cache written by ``ahpa extract``.

The index stream is a :class:`~ahpa.data.sampler.ResumableSampler`; ``start(step)``
positions it at the batch of global step ``step``, so a resumed run reads exactly
what an uninterrupted one would have read.
"""

from __future__ import annotations

import torch

from ahpa.config import Config
from ahpa.data.sampler import ResumableSampler
from ahpa.errors import AhpaError
from ahpa.priors.base import PriorOutput, denormalize_latent, normalize_latent


def step_generator(seed: int, step: int, device="cpu", stream: int = 0) -> torch.Generator:
    """The generator of all random draws of global step ``step`` (``stream`` separates independent uses).

    Seeded by (seed, step) alone, so a resumed run draws what an uninterrupted one
    would, and every rank draws the same global-batch values and takes its slice.
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 7 + stream) % (2**63 - 1))


def _groups(cfg: Config) -> tuple[str, ...]:
    return tuple(cfg.prior.groups) if cfg.align.method != "vanilla" and cfg.prior.kind != "none" else ()


def _vae_groups(cfg: Config) -> tuple[str, ...]:
    """The groups of the hierarchical VAE prior (G1..G4); "dinov2" and "latent" come from their own priors."""
    from ahpa.config import VAE_GROUPS

    return tuple(g for g in _groups(cfg) if g in VAE_GROUPS)


class BatchSource:
    """Common part: VAE for decoding, latent normalisation, the index stream."""

    def __init__(self, cfg: Config, device, rank: int, world: int, per_rank: int):
        self.cfg, self.device, self.rank, self.world, self.per_rank = cfg, torch.device(device), rank, world, per_rank
        self.vae = None
        self.latent_shape: tuple[int, int, int] = (0, 0, 0)
        self.group_shapes: dict[str, tuple[int, int]] = {}
        self.num_classes = 0
        self.scale: torch.Tensor | float = 1.0
        self.shift: torch.Tensor | float = 0.0
        self._iter = None
        self.teacher = None  # DINOv2 teacher on the fly (group "dinov2"), see _setup_targets
        self.latent_expected = None  # (1, C') of the SRA2 group "latent"

    # -- latent normalisation (docs/design.md section 5; iREPA's per-channel option) ------
    def _set_scale_from_vae(self) -> None:
        from ahpa.priors.vae import vae_scaling_factor, vae_shift_factor

        self.scale = self.cfg.vae.scaling_factor or vae_scaling_factor(self.vae)
        shift = vae_shift_factor(self.vae)  # SD3/FLUX VAEs: z = (x - shift) * scale, per channel in the meta
        self.shift = torch.full((self.vae.config.latent_channels,), shift) if shift else 0.0

    @property
    def latent_scale_scalar(self) -> float | None:
        return float(self.scale) if not isinstance(self.scale, torch.Tensor) else None

    @property
    def latent_scale_list(self) -> list[float] | None:
        return self.scale.tolist() if isinstance(self.scale, torch.Tensor) else None

    @property
    def latent_shift_list(self) -> list[float] | None:
        return self.shift.tolist() if isinstance(self.shift, torch.Tensor) else None

    def sample_latent(self, batch: dict, eps: torch.Tensor) -> torch.Tensor:
        """x0 = normalize(mean + std * eps): the posterior sampled with the trainer's eps."""
        return normalize_latent(batch["latent_mean"] + batch["latent_std"] * eps, self.scale, self.shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in training normalisation -> images in [-1, 1]."""
        if self.vae is None:
            from ahpa.priors.vae import load_vae

            self.vae = load_vae(self.cfg.vae.path, device=self.device)
        return self.vae.decode(denormalize_latent(latents, self.scale, self.shift)).sample.clamp(-1, 1)

    # -- index stream -----------------------------------------------------------
    def _sampler(self, n: int, shard_sizes=None) -> ResumableSampler:
        if n < self.cfg.train.global_batch:
            raise AhpaError(f"the data set has {n} items, fewer than train.global_batch={self.cfg.train.global_batch}; lower the batch size")
        return ResumableSampler(n, self.per_rank, seed=self.cfg.train.seed, rank=self.rank, world=self.world, shard_sizes=shard_sizes)

    def _stream(self, n: int, step: int, shard_sizes=None) -> ResumableSampler:
        """The index stream positioned at global step ``step``."""
        sampler = self._sampler(n, shard_sizes)
        sampler.load_state_dict(sampler.state_dict(consumed=step))
        return sampler

    def start(self, step: int) -> None:
        raise NotImplementedError

    # -- the teacher (REPA) and latent (SRA2) groups beside the VAE groups ---------
    def _setup_targets(self, grid: int, teacher: bool = True) -> None:
        """After ``group_shapes``, ``latent_shape`` and the scale are known: add groups "dinov2" / "latent"."""
        from ahpa.config import LATENT_GROUP, TEACHER_GROUP

        groups = _groups(self.cfg)
        self.grid, self.teacher, self.latent_expected = grid, None, None
        if TEACHER_GROUP in groups:
            if teacher:  # on the fly (images, toy); a cache stores the features instead
                from ahpa.priors.dinov2 import build_teacher

                self.teacher = build_teacher(self.cfg, grid, device=self.device)
                self.group_shapes[TEACHER_GROUP] = (1, self.teacher.embed_dim)
        if LATENT_GROUP in groups:
            from ahpa.priors.latent import latent_group_shape

            self.latent_expected = latent_group_shape(tuple(self.latent_shape), grid, self.cfg.prior.latent_target)
            self.group_shapes[LATENT_GROUP] = self.latent_expected

    def _finish(self, batch: dict, images: torch.Tensor | None = None) -> dict:
        """Teacher features of ``images`` (the images as trained on, flips included) and the latent target."""
        from ahpa.config import TEACHER_GROUP

        if self.teacher is not None and images is not None:
            batch = {**batch, "features": {**(batch.get("features") or {}), TEACHER_GROUP: self.teacher.grid_features(images)}}
        if self.latent_expected is not None:
            from ahpa.priors.latent import add_latent_target

            batch = add_latent_target(batch, self.scale, self.shift, self.grid, self.cfg.prior.latent_target, self.latent_expected)
        return batch

    def next_batch(self) -> dict:
        return next(self._iter)


class InMemorySource(BatchSource):
    """A small data set encoded once (the toy digits, or any list of images)."""

    def __init__(self, cfg, device, rank, world, per_rank, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(cfg, device, rank, world, per_rank)
        from ahpa.priors.hierarchy import HierarchicalVAEPrior
        from ahpa.priors.vae import load_vae

        self.vae = load_vae(cfg.vae.path, device=self.device)
        self._set_scale_from_vae()
        from ahpa.priors.vae import vae_downsample_factor

        latent_size = cfg.data.resolution // vae_downsample_factor(self.vae)
        grid = latent_size // _patch_size(cfg.model.name)
        prior = HierarchicalVAEPrior(self.vae, groups=_vae_groups(cfg), grid=grid, grouping=cfg.prior.grouping, split=cfg.prior.split, resample=cfg.prior.resample)
        outputs = []
        with torch.no_grad():
            for chunk in torch.split(images, 256):
                x = chunk.to(self.device).float() / 127.5 - 1.0
                outputs.append(prior(x).to("cpu"))
        self.data = PriorOutput(
            torch.cat([o.latent_mean for o in outputs]),
            torch.cat([o.latent_std for o in outputs]),
            {g: torch.cat([o.features[g] for o in outputs]) for g in outputs[0].features},
        )
        self.labels = labels.long()
        self.latent_shape = tuple(self.data.latent_mean.shape[1:])
        self.group_shapes = dict(prior.group_shapes)
        self.num_classes = int(self.labels.max()) + 1
        self._setup_targets(grid)
        if self.teacher is not None:  # the in-memory set: teacher features once, at start
            from ahpa.config import TEACHER_GROUP

            with torch.no_grad():
                feats = [self.teacher.grid_features(c.to(self.device).float() / 127.5 - 1.0).cpu() for c in torch.split(images, 256)]
            self.data.features[TEACHER_GROUP] = torch.cat(feats)
            self.teacher = None  # not needed any more

    def start(self, step: int) -> None:
        self._iter = map(self._gather, self._stream(len(self.labels), step))

    def _gather(self, idx) -> dict:
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        d = self.device
        return self._finish({
            "y": self.labels[idx].to(d),
            "latent_mean": self.data.latent_mean[idx].to(d),
            "latent_std": self.data.latent_std[idx].to(d),
            "features": {g: f[idx].to(d) for g, f in self.data.features.items()},
        })


def _loader(dataset, sampler: ResumableSampler, cfg: Config, device) -> torch.utils.data.DataLoader:
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )


class ImageSource(BatchSource):
    """Raw images, encoded on the device by the one-pass prior at every step."""

    def __init__(self, cfg, device, rank, world, per_rank, dataset=None):
        super().__init__(cfg, device, rank, world, per_rank)
        from ahpa.data.images import ImageFolderDataset
        from ahpa.priors.hierarchy import HierarchicalVAEPrior
        from ahpa.priors.vae import load_vae, vae_downsample_factor

        self.dataset = dataset if dataset is not None else ImageFolderDataset(cfg.data.path, cfg.data.resolution)
        self.vae = load_vae(cfg.vae.path, device=self.device)
        self._set_scale_from_vae()
        factor = vae_downsample_factor(self.vae)
        latent_size = cfg.data.resolution // factor
        self.prior = HierarchicalVAEPrior(
            self.vae, groups=_vae_groups(cfg), grid=latent_size // _patch_size(cfg.model.name),
            grouping=cfg.prior.grouping, split=cfg.prior.split, resample=cfg.prior.resample,
        )
        self.latent_shape = (self.vae.config.latent_channels, latent_size, latent_size)
        self.group_shapes = dict(self.prior.group_shapes)
        self.num_classes = len(self.dataset.classes)
        self._setup_targets(self.prior.grid)

    def start(self, step: int) -> None:
        self.step = step
        self._batches = iter(_loader(self.dataset, self._stream(len(self.dataset), step), self.cfg, self.device))

    def next_batch(self) -> dict:
        batch = next(self._batches)
        images = batch["image"].to(self.device, non_blocking=True).float() / 127.5 - 1.0
        if self.cfg.data.hflip:  # flips drawn per global step, like every other random choice
            g = step_generator(self.cfg.train.seed, self.step, self.device, stream=1)
            flip = torch.rand(self.cfg.train.global_batch, generator=g, device=self.device)[self.rank * self.per_rank :][: len(images)] < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        self.step += 1
        with torch.no_grad():
            out = self.prior(images)
        return self._finish({"y": batch["y"].to(self.device), "latent_mean": out.latent_mean, "latent_std": out.latent_std,
                             "features": out.features}, images)


class CacheSource(BatchSource):
    """The memory-mapped feature cache of ``ahpa extract``."""

    def __init__(self, cfg, device, rank, world, per_rank):
        super().__init__(cfg, device, rank, world, per_rank)
        from ahpa.data.cache import CacheDataset, check_compatible
        from ahpa.priors.hierarchy import HierarchicalVAEPrior
        from ahpa.priors.vae import load_vae

        from ahpa.config import LATENT_GROUP
        from ahpa.priors.dinov2 import check_cache_teacher

        check_cache_teacher(cfg, cfg.data.path)  # a REPA run on a cache without teacher features: refused by name
        # float16 reads keep the loader ahead of the step (float32 output capped it); cast on the device
        self.dataset = CacheDataset(cfg.data.path, flip=None if cfg.data.hflip else False, dtype=torch.float16,
                                    groups=[g for g in _groups(cfg) if g != LATENT_GROUP])  # "latent": from the moments
        manifest = self.dataset.manifest
        self.vae = load_vae(cfg.vae.path, device=self.device)  # decodes sample grids; its hash must match the cache
        grid = manifest["latent_shape"][-1] // _patch_size(cfg.model.name)
        prior = HierarchicalVAEPrior(self.vae, groups=_vae_groups(cfg), grid=grid, grouping=cfg.prior.grouping, split=cfg.prior.split, resample=cfg.prior.resample)
        check_compatible(manifest, prior.describe(), cfg.data.resolution, features=bool(_vae_groups(cfg)))  # vanilla: encoder only
        if cfg.vae.latent_norm == "channel_stats":
            stats = self.dataset.latent_stats
            self.shift = torch.tensor(stats["mean"], dtype=torch.float32)
            self.scale = 1.0 / torch.tensor(stats["std"], dtype=torch.float32)
        else:
            self._set_scale_from_vae()
        self.latent_shape = tuple(manifest["latent_shape"])
        self.group_shapes = dict(prior.group_shapes) if _vae_groups(cfg) else {}
        self.num_classes = int(manifest["labels"]["num_classes"])
        self.keep_features = bool(self.dataset.groups)
        from ahpa.config import TEACHER_GROUP

        if TEACHER_GROUP in self.dataset.groups:  # after the VAE groups, before "latent", as in every source
            self.group_shapes[TEACHER_GROUP] = tuple(manifest["features"][TEACHER_GROUP]["shape"][:2])
        self._setup_targets(grid, teacher=False)

    def start(self, step: int) -> None:
        stream = self._stream(len(self.dataset), step, shard_sizes=self.dataset.shard_sizes)
        self._batches = iter(_loader(self.dataset, stream, self.cfg, self.device))

    def next_batch(self) -> dict:
        batch = next(self._batches)
        d = self.device
        f32 = torch.float32
        out = {"y": batch["y"].to(d), "latent_mean": batch["latent_mean"].to(d, f32), "latent_std": batch["latent_std"].to(d, f32)}
        if self.keep_features:
            out["features"] = {g: f.to(d, non_blocking=True).float() for g, f in batch["features"].items()}
        return self._finish(out)


def _patch_size(name: str) -> int:
    from ahpa.models.mmdit import MMDIT_CONFIGS
    from ahpa.models.sit import SIT_CONFIGS

    configs = {**SIT_CONFIGS, **MMDIT_CONFIGS}
    if name not in configs:
        raise AhpaError(f"unknown model '{name}'; choose one of {', '.join(configs)}")
    return configs[name]["patch_size"]


def build_source(cfg: Config, *, device, rank: int, world: int, per_rank: int) -> BatchSource:
    if cfg.model.name.startswith("MMDiT") or cfg.data.source in ("coco", "toy_captions"):
        from ahpa.data.captions import build_caption_source  # text-to-image (Appendix C)

        return build_caption_source(cfg, device=device, rank=rank, world=world, per_rank=per_rank)
    if cfg.vae.latent_norm == "channel_stats" and cfg.data.source != "cache":
        raise AhpaError("vae.latent_norm=channel_stats needs per-channel statistics from a feature cache; set data.source=cache or vae.latent_norm=scale")
    if cfg.data.source == "toy":
        from ahpa.data.toy import load_toy

        images, labels = load_toy("train", resolution=cfg.data.resolution)
        return InMemorySource(cfg, device, rank, world, per_rank, images, labels)
    if cfg.data.source == "images":
        return ImageSource(cfg, device, rank, world, per_rank)
    return CacheSource(cfg, device, rank, world, per_rank)
