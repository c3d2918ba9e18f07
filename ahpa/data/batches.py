"""Training batches from any source, in one shape.

Every source yields, per step and rank, a dict on the training device::

    {"y": [b] long, "latent_mean": [b,C,h,w], "latent_std": [b,C,h,w],
     "features": {group: [b, L, C_k, H, W]}}      # features only when a prior needs them

- ``toy``: the bundled digits, encoded once by the tiny VAE and kept in memory.
- ``images``: an ImageNet-layout folder, decoded by DataLoader workers and
  encoded on the device by the one-pass hierarchical prior (small data sets).
- ``cache``: the memory-mapped feature cache written by ``ahpa extract``.

Each source is handed its frozen encoders (VAE, hierarchical prior, teacher), its
latent normalisation and the target shapes by :func:`ahpa.build.build_source`; a
source builds nothing from the config itself.

The index stream is a :class:`~ahpa.data.sampler.ResumableSampler`; ``start(step)``
positions it at the batch of global step ``step``, so a resumed run reads exactly
what an uninterrupted one would have read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ahpa.config import LATENT_GROUP, Config
from ahpa.data.cache import CacheDataset, check_compatible
from ahpa.data.sampler import ResumableSampler, step_generator
from ahpa.errors import AhpaError
from ahpa.preemption import ignore_in_worker
from ahpa.priors.base import PriorOutput, denormalize_latent, normalize_latent
from ahpa.priors.latent import add_latent_target


class BatchSource:
    """Common part: VAE for decoding, latent normalisation, the index stream, the teacher and latent targets."""

    def __init__(self, cfg: Config, device, rank: int, world: int, per_rank: int, *, vae, prior, teacher=None,
                 normalisation=None, group_shapes: dict | None = None):
        self.cfg, self.device, self.rank, self.world, self.per_rank = cfg, torch.device(device), rank, world, per_rank
        self.vae, self.prior, self.teacher = vae, prior, teacher
        self.grid = prior.grid
        self.scale, self.shift = normalisation if normalisation is not None else (1.0, 0.0)
        self.group_shapes: dict[str, tuple[int, int]] = dict(group_shapes or {})
        # (1, C') of the SRA2 group "latent": a batch whose latents give another shape is refused
        self.latent_expected = self.group_shapes.get(LATENT_GROUP)
        self.latent_shape: tuple[int, int, int] = (0, 0, 0)
        self.num_classes = 0
        self._iter = None

    # -- latent normalisation (docs/design.md section 5; iREPA's per-channel option) ------
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

    def _finish(self, batch: dict, images: torch.Tensor | None = None) -> dict:
        """Teacher features of ``images`` (the images as trained on, flips included) and the latent target."""
        if self.teacher is not None and images is not None:
            batch = {**batch, "features": {**(batch.get("features") or {}), self.teacher.group: self.teacher.grid_features(images)}}
        if self.latent_expected is not None:
            batch = add_latent_target(batch, self.scale, self.shift, self.grid, self.cfg.prior.latent_target, self.latent_expected)
        return batch

    def next_batch(self) -> dict:
        return next(self._iter)


class InMemorySource(BatchSource):
    """A small data set encoded once (the toy digits, or any list of images)."""

    def __init__(self, cfg, device, rank, world, per_rank, images: torch.Tensor, labels: torch.Tensor, **encoders):
        super().__init__(cfg, device, rank, world, per_rank, **encoders)
        outputs = []
        with torch.no_grad():
            for chunk in torch.split(images, 256):
                x = chunk.to(self.device).float() / 127.5 - 1.0
                outputs.append(self.prior(x).to("cpu"))
        self.data = PriorOutput(
            torch.cat([o.latent_mean for o in outputs]),
            torch.cat([o.latent_std for o in outputs]),
            {g: torch.cat([o.features[g] for o in outputs]) for g in outputs[0].features},
        )
        self.labels = labels.long()
        self.latent_shape = tuple(self.data.latent_mean.shape[1:])
        self.num_classes = int(self.labels.max()) + 1
        if self.teacher is not None:  # the in-memory set: teacher features once, at start (memoised on disk)
            self.data.features[self.teacher.group] = memoised_teacher_features(self.teacher, images, self.device)
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


def teacher_memo_dir() -> Path:
    """``$XDG_CACHE_HOME/ahpa/teacher-features`` (``~/.cache/...`` by default), beside the evaluator's reference features."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ahpa" / "teacher-features"


def memoised_teacher_features(teacher, images: torch.Tensor, device) -> torch.Tensor:
    """The teacher's grid features of a fixed uint8 image set ``[N, 3, H, W]``, computed once per machine.

    A pure function of the teacher (its ``describe()``: network, layer, weights hash, grid) and the image
    bytes, so it is memoised in :func:`teacher_memo_dir` under the hash of both, written atomically; a file
    that does not read back whole is recomputed.  What it saves: the Inception teacher's features of the
    1,612 toy digits take about 3 minutes on 2 cores, once per run otherwise (docs/studies/toy-pc/README.md).
    """
    key = hashlib.sha256(json.dumps(teacher.describe(), sort_keys=True).encode())
    key.update(str(tuple(images.shape)).encode() + images.contiguous().numpy().tobytes())
    path = teacher_memo_dir() / f"{teacher.group}-{key.hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["features"]
        except Exception:  # a damaged memo is only a lost shortcut: recompute it
            pass
    with torch.no_grad():
        feats = torch.cat([teacher.grid_features(c.to(device).float() / 127.5 - 1.0).cpu() for c in torch.split(images, 256)])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": feats.contiguous()}, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache directory costs only the recomputation next time
        print(f"note: could not memoise the teacher features in {path.parent} ({e.strerror}); they are recomputed per run")
    return feats


def _loader(dataset, sampler: ResumableSampler, cfg: Config, device) -> torch.utils.data.DataLoader:
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_in_worker if workers > 0 else None,  # preemption: the main process decides
    )


class ImageSource(BatchSource):
    """Raw images, encoded on the device by the one-pass prior at every step."""

    def __init__(self, cfg, device, rank, world, per_rank, dataset, *, latent_shape, **encoders):
        super().__init__(cfg, device, rank, world, per_rank, **encoders)
        self.dataset = dataset
        self.latent_shape = tuple(latent_shape)
        self.num_classes = len(self.dataset.classes)

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
    """The memory-mapped feature cache of ``ahpa extract``; ``normalisation=None`` takes the cache's per-channel statistics."""

    def __init__(self, cfg, device, rank, world, per_rank, *, features: bool, **encoders):
        super().__init__(cfg, device, rank, world, per_rank, **encoders)
        # float16 reads keep the loader ahead of the step (float32 output capped it); cast on the device
        self.dataset = CacheDataset(cfg.data.path, flip=None if cfg.data.hflip else False, dtype=torch.float16,
                                    groups=[g for g in self.group_shapes if g != LATENT_GROUP])  # "latent": from the moments
        manifest = self.dataset.manifest
        check_compatible(manifest, self.prior.describe(), cfg.data.resolution, features=features)  # vanilla: encoder only
        if encoders.get("normalisation") is None:  # vae.latent_norm=channel_stats
            stats = self.dataset.latent_stats
            self.shift = torch.tensor(stats["mean"], dtype=torch.float32)
            self.scale = 1.0 / torch.tensor(stats["std"], dtype=torch.float32)
        self.latent_shape = tuple(manifest["latent_shape"])
        self.num_classes = int(manifest["labels"]["num_classes"])
        self.keep_features = bool(self.dataset.groups)

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
