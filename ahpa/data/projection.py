"""Projected feature caches (docs/projected-caches.md; issue 18): one linear map per group.

``ahpa extract --project pca:K`` (or ``random:K``) stores ``P_g norm(F_l)`` instead of ``F_l``
for every layer l of group g: ``norm`` is the per-layer normalisation the objective would apply
at training time (``prior.normalize``, docs/design.md section 2), ``P_g`` is a ``[K, C_g]``
matrix shared by all layers of the group.  Because ``P_g`` is linear and shared, the router's
mixing (paper Eqs. 3-4) commutes with it: ``P sum_l w_l F_l = sum_l w_l P F_l``, so every
router variant trains unchanged on the projected targets, with a head of K channels per group,
and the objective must not normalise the stored values again (``prior.normalize`` is applied
once, here; :func:`target_normalization`).

- ``pca``: the top-K eigenvectors of the uncentred second moment ``E[x x^T]`` of the normalised
  tokens of all layers of the group (uncentred so that ``P`` stays linear, no offset), over a
  subset of ``images`` images chosen by a seeded permutation of the sorted file list (the same
  images whatever the number of processes); accumulated in float64, decomposed by
  ``torch.linalg.eigh``.  Explained variance = sum of the top-K eigenvalues / trace.
- ``random``: the Q factor of a seeded Gaussian ``[C, K]`` matrix (orthonormal rows of ``P``).

The matrices are stored in ``CACHE/projection.safetensors`` (tensors named by group, float32,
one JSON metadata key), written before any shard: a temp file, fsynced, then linked into place
without overwriting (a second rank's identical fit keeps the first file).  A kill during the fit
leaves at most a temp file, removed by the rerun, which fits again (same images, same bytes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ahpa.align.normalize import normalize_features
from ahpa.config import Config
from ahpa.config_rules import parse_projection
from ahpa.errors import AhpaError
from ahpa.io import _fsync_file, _temp_name, file_sha256, fsync_dir
from ahpa.priors.base import PriorOutput

PROJECTION_FILE = "projection.safetensors"


@dataclass
class ProjectionSpec:
    """What ``ahpa extract --project`` asks for (pinned in plan.json)."""

    kind: str
    k: int
    images: int = 1024  # PCA subset size (--pca-images)
    seed: int = 0  # PCA subset permutation / random matrix (--project-seed)
    normalize: str = "token"  # prior.normalize applied before projecting
    normalize_alpha: float = 0.6

    @classmethod
    def parse(cls, value: str, **kwargs) -> ProjectionSpec:
        parsed = parse_projection(value)
        if parsed is None:
            raise AhpaError(f"--project {value!r}: give pca:K or random:K (e.g. pca:64)")
        if kwargs.get("images", 1) < 1:
            raise AhpaError(f"--pca-images must be at least 1 (got {kwargs['images']})")
        return cls(*parsed, **kwargs)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.k}"

    def describe(self) -> dict:
        images = {"pca_images": self.images} if self.kind == "pca" else {}
        return {"kind": self.kind, "k": self.k, **images, "seed": self.seed, "normalize": self.normalize,
                "normalize_alpha": self.normalize_alpha, "file": PROJECTION_FILE}

    def shapes(self, group_shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """(layers, K) per group; K above a group's width is refused."""
        for g, (_, c) in group_shapes.items():
            if self.k > c:
                raise AhpaError(f"--project {self.name}: K={self.k} exceeds the {c} channels of group {g}; choose K <= {c}")
        return {g: (layers, self.k) for g, (layers, _) in group_shapes.items()}


@dataclass
class Projection:
    """The matrices ``{group: [K, C]}`` (float32) and how the features were normalised before them."""

    matrices: dict[str, torch.Tensor]
    kind: str
    normalize: str = "token"
    normalize_alpha: float = 0.6
    explained: dict[str, float | None] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(next(iter(self.matrices.values())).shape[0])


def project(features_by_group: dict[str, torch.Tensor], projection: Projection) -> dict[str, torch.Tensor]:
    """``{g: [B, L, C, H, W]}`` -> ``{g: [B, L, K, H, W]}`` float32: ``P_g norm(F_l)`` per layer.

    Groups without a matrix pass through unchanged.  What the extractor stores and what an
    on-the-fly source with ``prior.project`` trains on.
    """
    out = dict(features_by_group)
    for g, p in projection.matrices.items():
        if g not in out:
            continue
        f = out[g] if projection.normalize == "none" else normalize_features(out[g], projection.normalize, alpha=projection.normalize_alpha)
        if f.shape[2] != p.shape[1]:
            raise AhpaError(f"the projection of group {g} takes {p.shape[1]} channels, the features have {f.shape[2]}; "
                            "it was fitted for another prior")
        out[g] = torch.einsum("kc,blchw->blkhw", p.to(f.device), f)
    return out


class ProjectedPrior:
    """A hierarchical prior whose features come out projected (on-the-fly sources with ``prior.project``)."""

    def __init__(self, prior, projection: Projection):
        self.prior, self.projection = prior, projection

    def __getattr__(self, name):  # vae, grid, describe, ... of the wrapped prior
        if name in ("prior", "projection"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.prior, name)

    def __call__(self, images: torch.Tensor) -> PriorOutput:
        out = self.prior(images)
        return PriorOutput(out.latent_mean, out.latent_std, project(out.features, self.projection))


# ----------------------------------------------------------------------------- fitting
class MomentAccumulator:
    """Per group, the float64 sum of ``x x^T`` over every token of every layer (x: the C channels)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def add(self, features: dict[str, torch.Tensor]) -> None:
        for g, f in features.items():  # [B, L, C, H, W]
            x = f.detach().double().cpu().movedim(2, -1).reshape(-1, f.shape[2])
            self.sums[g] = self.sums.get(g, 0) + x.T @ x
        self.tokens += int(next(iter(features.values())).numel() // next(iter(features.values())).shape[2])


def pca_from_moment(moment: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Top-k eigenvectors of a second-moment matrix as the rows of ``P`` ``[k, C]`` (float32; each row's
    largest entry positive, so the signs are fixed) and the explained fraction of its trace."""
    values, vectors = torch.linalg.eigh(moment.double())
    top = vectors[:, -k:].flip(1)  # descending eigenvalues
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    explained = float(values[-k:].clamp_min(0).sum() / values.clamp_min(0).sum().clamp_min(1e-300))
    return (top * signs).T.contiguous().float(), explained


def random_projection(channels: int, k: int, seed: int) -> torch.Tensor:
    """A fixed random ``[k, C]`` matrix with orthonormal rows (QR of a seeded Gaussian, signs fixed by R)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(channels, k, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous().float()


def pca_subset(num_images: int, n: int, seed: int) -> np.ndarray:
    """Indices of the PCA images: the first n of a seeded permutation of the sorted file list."""
    return np.random.Generator(np.random.PCG64(seed)).permutation(num_images)[:n]


def group_moments(batches, groups, normalize: str = "token", normalize_alpha: float = 0.6) -> MomentAccumulator:
    """The PCA's moments: ``batches`` of raw features ``{g: [B, L, C, H, W]}``, normalised per layer as the
    objective would (``prior.normalize``), accumulated for ``groups``."""
    moments = MomentAccumulator()
    for feats in batches:
        moments.add({g: normalize_features(feats[g], normalize, alpha=normalize_alpha) for g in groups})
    return moments


@torch.no_grad()
def subset_features(images, subset, prior, batch_size: int = 32, progress: bool = True):
    """The prior's features of the images ``subset`` of an ImageFolderDataset, batch by batch (undecodable ones skipped)."""
    for start in tqdm(range(0, len(subset), batch_size), desc="pca fit", disable=not progress):
        loaded = [images.load(int(i)).item for i in subset[start : start + batch_size]]
        ok = [item["image"] for item in loaded if item is not None]
        if ok:
            yield prior(torch.stack(ok).to(prior.vae.device).float() / 127.5 - 1.0).features


@torch.no_grad()
def fit_projection(spec: ProjectionSpec, images, prior, batch_size: int = 32, progress: bool = True) -> Projection:
    """Fit (pca) or draw (random) the projection of ``prior``'s groups; ``images``: an ImageFolderDataset."""
    shapes = spec.shapes(dict(prior.group_shapes))
    if spec.kind == "random":
        matrices = {g: random_projection(prior.group_shapes[g][1], spec.k, spec.seed + i) for i, g in enumerate(shapes)}
        return Projection(matrices, "random", spec.normalize, spec.normalize_alpha, {g: None for g in shapes})
    subset = pca_subset(len(images), spec.images, spec.seed)
    moments = group_moments(subset_features(images, subset, prior, batch_size, progress), shapes, spec.normalize, spec.normalize_alpha)
    if not moments.tokens:
        raise AhpaError("none of the PCA images could be decoded; fix the image folder or use --project random:K")
    fitted = {g: pca_from_moment(moments.sums[g], spec.k) for g in shapes}
    return Projection({g: p for g, (p, _) in fitted.items()}, "pca", spec.normalize, spec.normalize_alpha,
                      {g: e for g, (_, e) in fitted.items()})


# ----------------------------------------------------------------------------- files
def save_projection(path: str | os.PathLike, projection: Projection) -> None:
    """Write the projection once: temp file, fsync, link into place (an existing file is kept)."""
    path = Path(path)
    meta = {"kind": projection.kind, "normalize": projection.normalize, "normalize_alpha": projection.normalize_alpha,
            "explained_variance": projection.explained}
    tmp = _temp_name(path)
    try:
        save_file({g: p.contiguous() for g, p in projection.matrices.items()}, os.fspath(tmp), metadata={"ahpa": json.dumps(meta)})
        _fsync_file(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:  # another rank's fit (same images, same bytes on the same hardware) is used
            pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_projection(path: str | os.PathLike) -> Projection:
    """A projection file, or AhpaError naming what is wrong with it."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["ahpa"])
            matrices = {g: f.get_tensor(g) for g in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise AhpaError(f"'{path}' is not a readable projection file ({type(err).__name__}: {err}); "
                        "point prior.project at the projection.safetensors of a projected cache") from None
    return Projection(matrices, meta["kind"], meta["normalize"], meta["normalize_alpha"], meta["explained_variance"])


def prepare_projection(out: Path, spec: ProjectionSpec, images, prior, batch_size: int, progress: bool) -> Projection:
    """The cache's projection: read back if a finished fit left it, else fitted and written (resume-safe)."""
    file = out / PROJECTION_FILE
    if file.is_file():
        try:
            return load_projection(file)
        except AhpaError:
            file.unlink()  # a damaged file: the fit is redone (same images, same bytes)
    projection = fit_projection(spec, images, prior, batch_size, progress)
    if progress and spec.kind == "pca":
        print(f"ahpa extract: {spec.name} on {min(spec.images, len(images))} images, explained variance "
              + ", ".join(f"{g} {e:.4f}" for g, e in projection.explained.items()))
    save_projection(file, projection)
    return load_projection(file)  # the file on disk is the projection every rank uses


def manifest_record(out: Path, plan_record: dict) -> dict:
    """The manifest's ``projection``: the plan's settings, the explained variance and the file's sha256."""
    return {**plan_record, "explained_variance": load_projection(out / PROJECTION_FILE).explained,
            "sha256": file_sha256(out / PROJECTION_FILE)}


def projection_problem(cache: Path, manifest: dict) -> str | None:
    """Why a projected cache's projection file does not match its manifest, or None."""
    record = manifest.get("projection")
    if record is None:
        return None
    file = cache / record["file"]
    if not file.is_file():
        return f"{record['file']}: missing (the projection of this {record['kind']}:{record['k']} cache)"
    if file_sha256(file) != record["sha256"]:
        return f"{record['file']}: sha256 differs from the manifest (corrupt projection)"
    return None


# ----------------------------------------------------------------------------- training
def target_normalization(cfg: Config) -> str:
    """The objective's per-layer normalisation: none for projected targets (applied before projecting)."""
    return "none" if cfg.prior.project else cfg.prior.normalize


def projected_shapes(cfg: Config, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """(layers, K) of the VAE groups when ``prior.project`` is set (K from the spec or the projection file)."""
    if not cfg.prior.project:
        return shapes
    parsed = parse_projection(cfg.prior.project)
    k = parsed[1] if parsed else load_projection(cfg.prior.project).k
    return {g: (layers, k) for g, (layers, _) in shapes.items()}


def check_cache_projection(manifest: dict, cfg: Config, path) -> None:
    """One line when the cache's projection is not the one the config expects (``prior.project``)."""
    record, want = manifest.get("projection"), cfg.prior.project
    have = f"{record['kind']}:{record['k']}" if record else ""
    parsed = parse_projection(want) if want else None
    if want and parsed is None:  # a projection file: it must be the cache's own
        if record is None or file_sha256(want) != record["sha256"]:
            raise AhpaError(f"prior.project={want} is not the projection of feature cache '{path}' ({have or 'full features'}); "
                            f"set prior.project={have!r}")
    elif want != have:
        raise AhpaError(f"feature cache '{path}' holds {have or 'full (unprojected)'} features, the config expects "
                        f"prior.project={want!r}; set prior.project={have!r} or extract a cache with --project {want or '(none)'}")
    if record and cfg.prior.normalize != record["normalize"]:
        raise AhpaError(f"feature cache '{path}' was normalised with prior.normalize={record['normalize']} before projecting, "
                        f"the config says {cfg.prior.normalize}; set prior.normalize={record['normalize']}")
