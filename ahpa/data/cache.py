"""The feature cache: latent moments and hierarchical VAE features, computed once.

At ImageNet scale the prior (docs/design.md section 2) is run once per image by ``ahpa
extract`` and training reads the results memory-mapped.  Layout::

    CACHE/manifest.json            the commit point, written last (atomically)
    CACHE/shards/000123.safetensors
    CACHE/progress/000123.json     one record per finished shard (resume state)

Why safetensors: one self-describing file per shard (names, dtypes, shapes in
its header, including bfloat16, which ``.npy`` lacks), and ``safe_open`` maps it
lazily, so reading item i touches only item i's bytes.  Tensors of a shard of n
items:

- ``labels`` int64 [n], ``index`` int64 [n] (position of the image in the
  sorted file list of the image folder),
- ``latent_mean``, ``latent_std`` [n, C, h, w]: float16, or bfloat16 for the
  bfloat16 cache; the int8 cache keeps them float16 (the latent is the
  diffusion target: quantising it would shift the data distribution),
- ``features.G3`` ... [n, L, C, H, W] in the cache dtype; for int8 also
  ``features.G3.scale`` float32 [n, L, C]: symmetric per-image, per-channel
  quantisation, x ~= q * scale with scale = max|x| / 127 over H x W,
- with flipped copies, the same tensors prefixed ``flip.`` for the
  horizontally mirrored image (its own encoder pass).

The manifest records counts, shapes, dtypes, the label histogram, the prior's
``describe()`` (encoder hash, grouping, layer paths, resample, grid), the
resolution, the flip policy, the ahpa version, per-shard sha256 / bytes /
count / xxh3_64 (issue 19: the fast checksum every training process checks
once per shard, at its first read; caches written before it have none and are read
without it), and per-channel statistics of sampled latents (iREPA convention):
mean_c = E[mu], var_c = E[mu^2 + sigma^2] - mean_c^2 (the exact expectation
over the posterior noise, accumulated in float64 before storage rounding).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ahpa.data.projection import projection_problem
from ahpa.errors import AhpaError
from ahpa.io import atomic_path, file_sha256
from ahpa.priors.base import PriorOutput

FORMAT = "ahpa-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "bfloat16", "int8")
# check_compatible reports the first differing field in this order.
PRIOR_FIELDS = ("encoder_hash", "grouping", "split", "groups", "layers", "channels", "resample", "grid")
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


def latent_dtype(dtype: str) -> str:
    """Storage dtype of the latent moments for a cache dtype (int8 caches keep float16)."""
    return "bfloat16" if dtype == "bfloat16" else "float16"


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise AhpaError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def bytes_per_image(
    dtype: str, group_shapes: dict[str, tuple[int, int]], grid: int, latent_shape: tuple[int, int, int], flip: bool = False
) -> int:
    """Stored bytes of one image (labels, index and int8 scales included, shard headers not).

    Example: float16, G3+G4 of SD-VAE at 256 px = 8 layers x 512 x 16 x 16 x 2 B
    = 2 MiB of features, plus 2 x 4 x 32 x 32 x 2 B of latent moments.
    """
    _check_dtype(dtype)
    feature_item = 1 if dtype == "int8" else 2
    c, h, w = latent_shape
    total = 2 * c * h * w * 2  # mean and std, 16-bit
    for layers, channels in group_shapes.values():
        total += layers * channels * grid * grid * feature_item
        if dtype == "int8":
            total += layers * channels * 4  # float32 scales
    return total * (2 if flip else 1) + 16  # labels, index


# ----------------------------------------------------------------------------- checksums
REPAIR = "rerun the same `ahpa extract IMAGE_DIR --out CACHE` command: it redoes exactly the damaged shards"


def file_xxh3(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """xxh3_64 hex digest of a file: the fast content checksum of a shard (docs/reliability.md "Safety nets")."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(path: str | os.PathLike, chunk: int = 1 << 22) -> tuple[str, str]:
    """(sha256, xxh3_64) of a file in one read."""
    sha, fast = hashlib.sha256(), xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            fast.update(block)
    return sha.hexdigest(), fast.hexdigest()


def shard_checksum_problem(root: Path, shard: dict) -> str | None:
    """Why a shard's bytes differ from its record's xxh3_64, or None (also None for a record without one: an old cache)."""
    want = shard.get("xxh3_64")
    if want is None:
        return None
    got = file_xxh3(root / shard["file"])
    return None if got == want else f"{shard['file']} fails its xxh3_64 checksum ({got}, the manifest says {want}: corrupt bytes)"


# ----------------------------------------------------------------------------- writing


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, L, C, H, W]`` float -> (int8 values, float32 scales ``[n, L, C]``), symmetric per channel."""
    scale = x.abs().amax(dim=(-2, -1)).float().clamp_min(1e-12) / 127.0
    q = torch.round(x.float() / scale[..., None, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored features -> ``dtype`` (``scale`` is None unless int8)."""
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale.float()[..., None, None]).to(dtype)


def storage_tensors(out: PriorOutput, dtype: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A prior's float32 output as the CPU tensors a shard stores (module docstring).

    Conversion happens on the output's device, so only the stored bytes cross to the host.
    """
    _check_dtype(dtype)
    moments = _TORCH[latent_dtype(dtype)]
    tensors = {
        f"{prefix}latent_mean": out.latent_mean.detach().to(moments).cpu(),
        f"{prefix}latent_std": out.latent_std.detach().to(moments).cpu(),
    }
    for group, feats in out.features.items():
        if dtype == "int8":
            q, scale = quantize_int8(feats.detach())
            tensors[f"{prefix}features.{group}"], tensors[f"{prefix}features.{group}.scale"] = q.cpu(), scale.cpu()
        else:
            tensors[f"{prefix}features.{group}"] = feats.detach().to(_TORCH[dtype]).cpu()
    return tensors


def _shard_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape, from a shard's header only."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> dict:
    """Write a shard safely: temp file, re-read the header and check it, fsync, rename.

    Returns the shard's record ``{file, count, bytes, sha256, xxh3_64}`` (file relative
    to the cache root, i.e. ``shards/<name>``).
    """
    path = Path(path)
    count = int(tensors["labels"].shape[0])
    expected = {k: list(v.shape) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        # One metadata key only: safetensors writes several in random (hash map) order,
        # which would make reruns differ byte-wise.
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(tmp), metadata={"format": FORMAT})
        shapes = _shard_shapes(tmp)
        if shapes != expected:
            raise AhpaError(f"shard {path.name} read back with shapes {shapes}, written {expected}; check the disk and rerun")
    sha256, xxh3 = file_checksums(path)
    return {"file": f"{path.parent.name}/{path.name}", "count": count, "bytes": path.stat().st_size, "sha256": sha256, "xxh3_64": xxh3}


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a finished cache, or AhpaError saying why there is none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise AhpaError(
            f"'{path}' has no {MANIFEST}: it is not a feature cache, or its extraction has not finished; "
            "rerun the same `ahpa extract` command to complete it"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise AhpaError(f"{file} is not valid JSON ({err}); re-extract the cache") from None
    if manifest.get("format") != FORMAT:
        raise AhpaError(f"{file} is not an ahpa feature cache manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AhpaError(f"{file} has cache format version {manifest.get('format_version')}; this ahpa reads version {FORMAT_VERSION}; re-extract")
    return manifest


def check_compatible(manifest: dict, prior_describe: dict, resolution: int, features: bool = True) -> None:
    """AhpaError naming the first field where the cache differs from the requested prior.

    The run may use a subset of the cached groups (the single-group ablations read G4
    from a G3+G4 cache).  ``features=False`` (vanilla SiT: latents only) checks just the
    encoder and the resolution.
    """
    requested = json.loads(json.dumps(prior_describe))  # tuples -> lists, as stored
    stored = manifest.get("prior", {})
    if manifest.get("resolution") != resolution:
        raise AhpaError(
            f"feature cache field 'resolution' differs: cache has {manifest.get('resolution')}, the run needs {resolution}; "
            "extract a cache at this resolution or change data.resolution"
        )
    keys = list(dict.fromkeys([*PRIOR_FIELDS, *stored, *requested])) if features else ["encoder_hash"]
    for key in keys:
        have, want = stored.get(key), requested.get(key)
        if key == "groups":
            same = set(want or []) <= set(have or [])
        elif key in ("layers", "channels"):  # per group: only the requested groups must match
            same = all((have or {}).get(g) == v for g, v in (want or {}).items())
        else:
            same = have == want
        if not same:
            raise AhpaError(
                f"feature cache field '{key}' differs: cache has {have!r}, the run needs {want!r}; "
                "re-extract the cache with this prior or change the prior settings to match it"
            )


def verify_cache(path: str | os.PathLike, checksum: bool = True) -> list[str]:
    """Problems of a cache (missing/short/corrupt shards, count mismatches); empty if sound."""
    try:
        manifest = read_manifest(path)
    except AhpaError as err:
        return [str(err)]
    problems, total = [], 0
    for shard in manifest["shards"]:
        file = Path(path) / shard["file"]
        total += shard["count"]
        if not file.is_file():
            problems.append(f"{shard['file']}: missing")
            continue
        size = file.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{shard['file']}: {size} bytes, manifest says {shard['bytes']}")
            continue
        try:
            shapes = _shard_shapes(file)
        except (SafetensorError, OSError, ValueError) as err:
            problems.append(f"{shard['file']}: unreadable header ({err})")
            continue
        if shapes.get("labels") != [shard["count"]]:
            problems.append(f"{shard['file']}: holds {shapes.get('labels')} labels, manifest says {shard['count']}")
        for group, spec in manifest["features"].items():
            if shapes.get(f"features.{group}", [None])[1:] != spec["shape"]:
                problems.append(f"{shard['file']}: features.{group} has shape {shapes.get(f'features.{group}')}, manifest says [n, *{spec['shape']}]")
        if checksum and file_sha256(file) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest (corrupt bytes)")
        elif checksum and (problem := shard_checksum_problem(Path(path), shard)):
            problems.append(problem)
    if problem := projection_problem(Path(path), manifest):  # a projected cache's matrices (docs/projected-caches.md)
        problems.append(problem)
    if total != manifest["count"]:
        problems.append(f"shards hold {total} items, manifest count is {manifest['count']}")
    return problems


# ----------------------------------------------------------------------------- reading


class CacheDataset(Dataset):
    """Memory-mapped cache reader: item -> dict(latent_mean, latent_std, y, features{g: [L, C, H, W]}).

    Tensors are float32 (int8 features dequantised), or ``dtype``: float16
    halves what DataLoader workers pass to the trainer.  ``flip=None`` uses the
    flipped copies when the cache holds them: items ``count .. 2*count-1`` are
    the mirrored images.  ``verify``: ``"fast"`` (default) checks every shard's size
    at open, and its header and xxh3_64 checksum on first use in each process (reads
    the shard once; a cache without xxh3_64 records gets the ``"size"`` checks);
    ``"size"``: sizes and headers only; ``"checksum"``: sizes, headers and sha256.  ``groups`` selects the feature
    groups read (default all stored; ``()`` for latents only, e.g. vanilla SiT,
    so their bytes are never touched).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        flip: bool | None = None,
        verify: str = "fast",
        dtype: torch.dtype = torch.float32,
        groups: Sequence[str] | None = None,
    ):
        if verify not in ("fast", "size", "checksum"):
            raise AhpaError(f"CacheDataset verify must be 'fast', 'size' or 'checksum', got {verify!r}")
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.verify, self.dtype = verify, dtype
        stored_flip = self.manifest["flip"] == "both"
        if flip and not stored_flip:
            raise AhpaError(f"feature cache '{path}' holds no flipped copies; re-extract with --flip-both or turn flips off")
        self.flip = stored_flip if flip is None else flip
        self.shards = self.manifest["shards"]
        self.count = int(self.manifest["count"])
        stored_groups = list(self.manifest["features"])
        self.groups = stored_groups if groups is None else list(groups)
        if set(self.groups) - set(stored_groups):
            raise AhpaError(f"feature cache '{path}' holds groups {stored_groups}, not {self.groups}; re-extract with --groups")
        self.int8 = self.manifest["dtype"] == "int8"
        self.offsets = [0]
        for shard in self.shards:
            file = self.path / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                raise AhpaError(
                    f"cache shard {file} is {'missing' if size is None else f'{size} bytes'}, the manifest says {shard['bytes']}; "
                    "run `ahpa extract --verify` and re-extract the cache"
                )
            self.offsets.append(self.offsets[-1] + shard["count"])
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def shard_sizes(self) -> list[int]:
        """Items per shard (for ``ResumableSampler(shard_sizes=...)``, flipped copies as more shards)."""
        sizes = [s["count"] for s in self.shards]
        return sizes * 2 if self.flip else sizes

    @property
    def latent_stats(self) -> dict[str, list[float]]:
        """Per-channel ``{"mean", "std"}`` of sampled latents (iREPA convention)."""
        return self.manifest["latent_stats"]

    def __len__(self) -> int:
        return self.count * (2 if self.flip else 1)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files are per process (DataLoader workers)

    def _open(self, k: int):
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            shard = self.shards[k]
            file = self.path / shard["file"]
            try:
                handle = safe_open(os.fspath(file), framework="pt")
                count = handle.get_slice("labels").get_shape()[0]
            except (SafetensorError, OSError, ValueError) as err:
                raise AhpaError(f"cache shard {file} is unreadable ({err}); run `ahpa extract --verify` and re-extract") from None
            if count != shard["count"]:
                raise AhpaError(f"cache shard {file} holds {count} items, the manifest says {shard['count']}; re-extract the cache")
            if self.verify == "checksum" and file_sha256(file) != shard["sha256"]:
                raise AhpaError(f"cache shard {file} fails its sha256 check (corrupt bytes); {REPAIR} (add --checksums)")
            problem = shard_checksum_problem(self.path, shard) if self.verify == "fast" else None
            if problem:  # before any value of the shard is handed out: training stops here
                raise AhpaError(f"cache shard {self.path}/{problem}; {REPAIR}")
            self._files[k] = handle
        return self._files[k]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        flipped, index = divmod(index, self.count)
        k = bisect.bisect_right(self.offsets, index) - 1
        i = index - self.offsets[k]
        f = self._open(k)
        prefix = "flip." if flipped else ""

        def read(name: str) -> torch.Tensor:
            return f.get_slice(name)[i : i + 1][0]

        features = {}
        for g in self.groups:
            scale = read(f"{prefix}features.{g}.scale") if self.int8 else None
            features[g] = dequantize(read(f"{prefix}features.{g}"), scale, self.dtype)
        return {
            "latent_mean": read(f"{prefix}latent_mean").to(self.dtype),
            "latent_std": read(f"{prefix}latent_std").to(self.dtype),
            "y": read("labels").long(),
            "features": features,
        }
