"""The feature-cache extractor: run the hierarchical VAE prior once over an image folder (the command is :mod:`ahpa.extract`).

The image list (sorted, see ``images.py``) is put in a fixed random order
(seed ``order_seed``, so every shard mixes classes) and cut into shards of
``shard_size`` images; shard k belongs to rank ``k % world``.  A shard's content
depends only on k, never on the rank, the world size or on interruptions:
its images are decoded and encoded in batches that never cross shards.

Resume: a shard is part of the cache once ``progress/<k>.json`` exists (written
atomically after the shard file was fsynced, verified and renamed; a thread
writes one shard while the next is encoded).  A rerun skips recorded shards,
discards stale temp files and redoes anything else, producing the same bytes on
the same hardware; it may use another world size.  ``plan.json`` pins the
settings; a rerun with other settings is refused, naming the field.  Before
encoding, the space still to write (bytes per image x images) is compared with
``shutil.disk_usage`` and a run that cannot fit is refused.  The manifest (the commit point of the
whole cache, see ``cache.py``) is written when all shards are recorded: by rank
0 after a barrier when ``torch.distributed`` is initialised, else by whichever
rank finishes last (identical bytes, atomic rename).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ahpa import __version__, preemption
from ahpa.data.cache import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    _shard_shapes,
    bytes_per_image,
    latent_dtype,
    read_manifest,
    shard_checksum_problem,
    storage_tensors,
    write_shard,
)
from ahpa.data.images import ImageFolderDataset, ImageReport, LoadResult
from ahpa.data.projection import PROJECTION_FILE, Projection, ProjectionSpec, manifest_record, prepare_projection, project, projection_problem
from ahpa.errors import AhpaError
from ahpa.io import check_output_dir, file_sha256, remove_stale_temps, write_json_atomic
from ahpa.priors.base import PriorOutput
from ahpa.priors.hierarchy import HierarchicalVAEPrior
from ahpa.priors.vae import vae_downsample_factor

PLAN = "plan.json"


def shard_plan(num_images: int, shard_size: int, order_seed: int) -> list[np.ndarray]:
    """Image indices of each shard: a seeded permutation cut into ``shard_size`` pieces."""
    order = np.random.Generator(np.random.PCG64(order_seed)).permutation(num_images)
    return [order[i : i + shard_size] for i in range(0, num_images, shard_size)]


def _first_difference(old, new, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in dict.fromkeys([*old, *new]):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


class _Decoded(Dataset):
    """``LoadResult``s, so failures and conversions travel back from decoding workers."""

    def __init__(self, images: ImageFolderDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> LoadResult:
        return self.images.load(index)


class _ShardBuffer:
    """Preallocated storage tensors of one shard, filled batch by batch."""

    def __init__(self, capacity: int):
        self.capacity, self.n = capacity, 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.labels: Counter = Counter()
        self.latent_sum = self.latent_sqsum = None
        self.latent_elems = 0
        self.report = ImageReport()

    def add(self, stored: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> None:
        b = stored["labels"].shape[0]
        for key, value in stored.items():
            if key not in self.tensors:
                self.tensors[key] = torch.empty((self.capacity, *value.shape[1:]), dtype=value.dtype)
            self.tensors[key][self.n : self.n + b] = value
        self.n += b
        self.labels.update(stored["labels"].tolist())
        # Channel statistics of sampled latents, exact over the posterior noise (cache.py docstring).
        mean, std = mean.double(), std.double()
        s, sq = mean.sum(dim=(0, 2, 3)).cpu(), (mean**2 + std**2).sum(dim=(0, 2, 3)).cpu()
        self.latent_sum = s if self.latent_sum is None else self.latent_sum + s
        self.latent_sqsum = sq if self.latent_sqsum is None else self.latent_sqsum + sq
        self.latent_elems += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def write(self, path: Path, root: str) -> dict:
        """Write the shard (if any image decoded) and return its progress record."""
        if self.n:
            record = write_shard(path, {k: v[: self.n] for k, v in self.tensors.items()})
        else:
            record = {"file": None, "count": 0, "bytes": 0, "sha256": None}
        report = self.report.to_dict()
        return {
            **record,
            "labels": {str(y): c for y, c in sorted(self.labels.items())},
            "latent_sum": [] if self.latent_sum is None else self.latent_sum.tolist(),
            "latent_sqsum": [] if self.latent_sqsum is None else self.latent_sqsum.tolist(),
            "latent_elems": self.latent_elems,
            "failed": {os.path.relpath(p, root): r for p, r in report["failed"].items()},
            "converted": report["converted"],
            "upsampled": report["upsampled"],
        }


def _encode(prior: HierarchicalVAEPrior, results: list[LoadResult], buffer: _ShardBuffer, dtype: str, flip_both: bool,
            teacher=None, projection: Projection | None = None) -> None:
    """Run the prior on one batch's decodable images (and their mirror images) into the shard buffer."""
    for result in results:
        buffer.report.record(result)
    ok = [r for r in results if r.item is not None]
    if not ok:
        return
    x = torch.stack([r.item["image"] for r in ok]).to(prior.vae.device).float() / 127.5 - 1.0
    x = torch.cat([x, x.flip(-1)]) if flip_both else x
    output = prior(x)
    if projection is not None:  # P norm(F) per group (docs/projected-caches.md)
        output.features = project(output.features, projection)
    if teacher is not None:  # REPA's teacher on the same images (the mirrored image's own features for flips)
        output.features[teacher.group] = teacher.grid_features(x)
    halves = [
        PriorOutput(output.latent_mean[s], output.latent_std[s], {g: v[s] for g, v in output.features.items()})
        for s in (slice(0, len(ok)), slice(len(ok), None))
    ]
    stored = storage_tensors(halves[0], dtype)
    if flip_both:
        stored |= storage_tensors(halves[1], dtype, prefix="flip.")
    stored["labels"] = torch.stack([r.item["y"] for r in ok])
    stored["index"] = torch.tensor([r.index for r in ok], dtype=torch.long)
    buffer.add(stored, halves[0].latent_mean, halves[0].latent_std)


def _commit(buffer: _ShardBuffer, out: Path, k: int, root: str) -> None:
    """Write shard k, then its progress record (the shard's commit point)."""
    record = buffer.write(out / "shards" / f"{k:06d}.safetensors", root)
    write_json_atomic(out / "progress" / f"{k:06d}.json", record)


def _plan(images: ImageFolderDataset, prior: HierarchicalVAEPrior, resolution: int, dtype: str, flip_both: bool, shard_size: int, order_seed: int,
          teacher=None, projection: ProjectionSpec | None = None) -> dict:
    f = vae_downsample_factor(prior.vae)
    latent_shape = [prior.vae.config.latent_channels, resolution // f, resolution // f]
    group_shapes = (projection.shapes(dict(prior.group_shapes)) if projection else dict(prior.group_shapes)) | ({teacher.group: (1, teacher.embed_dim)} if teacher is not None else {})
    teachers = {"teachers": {teacher.group: teacher.describe()}} if teacher is not None else {}
    teachers |= {"projection": projection.describe()} if projection else {}  # stored: P norm(F), K channels per group
    return teachers | {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "resolution": resolution,
        "dtype": dtype,
        "latent_dtype": latent_dtype(dtype),
        "flip": "both" if flip_both else "none",
        "shard_size": shard_size,
        "order_seed": order_seed,
        "prior": prior.describe(),
        "latent_shape": latent_shape,
        "features": {
            g: {"shape": [layers, channels, prior.grid, prior.grid], "dtype": dtype}
            for g, (layers, channels) in group_shapes.items()
        },
        "bytes_per_image": bytes_per_image(dtype, group_shapes, prior.grid, tuple(latent_shape), flip_both),
        "images": {
            "root_classes": images.classes,
            "listed": len(images),
            "file_list_sha256": images.file_list_hash(),
            "ignored": images.report.ignored,
            "empty_classes": images.report.empty_classes,
            **({"y": "image_index"} if getattr(images, "y_is_image_index", False) else {}),  # MS-COCO: y = image, not class
        },
    }


def _load_plan(out: Path, plan: dict) -> None:
    """Write ``plan.json``, or check that an existing one matches (else refuse, naming the field)."""
    file = out / PLAN
    if file.is_file():
        old = json.loads(file.read_text())
        field = _first_difference(old, plan)
        if field:
            raise AhpaError(
                f"'{out}' holds a cache started with different settings: field '{field}' differs; "
                "rerun with the original settings, or extract into a new --out directory"
            )
    else:
        write_json_atomic(file, plan)


def _done(out: Path, k: int) -> dict | None:
    """The progress record of shard k if it is complete (record present, shard file of that size)."""
    file = out / "progress" / f"{k:06d}.json"
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    if record["count"] and not ((out / record["file"]).is_file() and (out / record["file"]).stat().st_size == record["bytes"]):
        return None
    return record


def damaged_shards(out: Path, checksums: bool = False) -> dict[int, str]:
    """Shards of a finished cache that do not match its manifest: {k: problem}.  Sizes,
    safetensors headers and the fast xxh3_64 checksum (where recorded) always; sha256 with ``checksums``.  An unreadable manifest names every
    recorded shard whose progress record disagrees (the records are the truth; finalize rewrites it)."""
    try:
        shards = read_manifest(out)["shards"]
    except AhpaError as err:
        return {-1: str(err)}
    problems = {}
    for shard in shards:
        file = out / shard["file"]
        k = int(Path(shard["file"]).stem)
        if not file.is_file():
            problems[k] = f"{shard['file']} missing"
        elif file.stat().st_size != shard["bytes"]:
            problems[k] = f"{shard['file']} has {file.stat().st_size} bytes, the manifest says {shard['bytes']}"
        else:
            try:
                _shard_shapes(file)
            except Exception as err:  # safetensors / OS errors of a damaged header
                problems[k] = f"{shard['file']} has an unreadable header ({type(err).__name__})"
                continue
            if checksums and file_sha256(file) != shard["sha256"]:
                problems[k] = f"{shard['file']} does not match its sha256"
            elif problem := shard_checksum_problem(out, shard):
                problems[k] = problem
    return problems


def finalize(out: Path, plan: dict, num_shards: int) -> dict:
    """Assemble and atomically write the manifest from all shard records."""
    records = [_done(out, k) for k in range(num_shards)]
    missing = [k for k, r in enumerate(records) if r is None]
    if missing:
        raise AhpaError(f"{len(missing)} shards of '{out}' are unfinished (first: {missing[0]}); rerun `ahpa extract` to complete them")
    count = sum(r["count"] for r in records)
    if count == 0:
        failed = sorted(f for r in records for f in r["failed"])
        for k in range(num_shards):  # an empty cache is no result: let a rerun after fixing the images start over
            (out / "progress" / f"{k:06d}.json").unlink(missing_ok=True)
        first = f" (first: {failed[0]})" if failed else ""
        raise AhpaError(
            f"none of the {len(failed)} images of the folder could be decoded{first}; nothing cached in '{out}'. "
            "Replace or remove the broken files and rerun the same command"
        )
    classes = plan["images"]["root_classes"]
    labels = Counter()
    sums = np.zeros(plan["latent_shape"][0])
    sqsums = np.zeros_like(sums)
    elems = 0
    failed, converted, upsampled = {}, Counter(), 0
    for r in records:
        labels.update({int(y): c for y, c in r["labels"].items()})
        if r["count"]:
            sums += np.asarray(r["latent_sum"])
            sqsums += np.asarray(r["latent_sqsum"])
            elems += r["latent_elems"]
        failed.update(r["failed"])
        converted.update(r["converted"])
        upsampled += r["upsampled"]
    mean = sums / elems
    std = np.sqrt(np.maximum(sqsums / elems - mean**2, 0.0))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ahpa_version": __version__,
        "count": count,
        "resolution": plan["resolution"],
        "dtype": plan["dtype"],
        "latent_dtype": plan["latent_dtype"],
        "flip": plan["flip"],
        "prior": plan["prior"],
        "latent_shape": plan["latent_shape"],
        "features": plan["features"],
        **({"teachers": plan["teachers"]} if "teachers" in plan else {}),  # REPA teacher features (ahpa extract --teacher)
        **({"projection": manifest_record(out, plan["projection"])} if "projection" in plan else {}),
        "bytes_per_image": plan["bytes_per_image"],
        "latent_stats": {"mean": mean.tolist(), "std": std.tolist()},
        "labels": {"num_classes": len(classes), "classes": classes,
                   "counts": [count] if plan["images"].get("y") == "image_index" else [labels.get(y, 0) for y in range(len(classes))]},
        "images": {
            **{k: v for k, v in plan["images"].items() if k != "root_classes"},
            "cached": count,
            "converted": dict(sorted(converted.items())),
            "upsampled": upsampled,
            "failed": dict(sorted(failed.items())),
        },
        "order_seed": plan["order_seed"],
        "shard_size": plan["shard_size"],
        "shards": [{k: r[k] for k in ("file", "count", "bytes", "sha256", "xxh3_64") if k in r} for r in records if r["count"]],
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def extract_cache(
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    prior: HierarchicalVAEPrior,
    resolution: int,
    *,
    dtype: str = "float16",
    flip_both: bool = False,
    shard_size: int = 1024,
    batch_size: int = 32,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    order_seed: int = 0,
    stop_after: int | None = None,
    progress: bool = True,
    teacher=None,
    checksums: bool = False,
    images: ImageFolderDataset | None = None,
    projection: ProjectionSpec | None = None,
) -> dict | None:
    """Extract (or resume extracting) this rank's shards; returns the manifest once the cache is complete.

    ``stop_after``: return after this many encoder batches, as if killed (tests).
    ``teacher``: a frozen teacher from :func:`ahpa.build.build_teacher` whose features are stored as its
    group (``teacher.group``: "dinov2" or "inception").
    ``projection``: store ``P norm(F)`` (docs/projected-caches.md); the projection is fitted first, into
    ``out/projection.safetensors``.  Returns None while shards of other ranks are still pending.
    A finished cache is checked against its manifest (sizes, headers and xxh3_64; ``checksums``:
    also sha256) and exactly its damaged shards are redone.
    """
    if shard_size < 1 or batch_size < 1:
        raise AhpaError("--shard-size and --batch must be at least 1")
    if not 0 <= rank < world:
        raise AhpaError(f"rank {rank} is outside world size {world}")
    out = Path(out)
    images = images if images is not None else ImageFolderDataset(image_dir, resolution)  # or COCO's (data/coco.py)
    if projection is not None and teacher is not None:
        raise AhpaError("--project projects the VAE groups only; extract the teacher's features into a cache without --project")
    plan = _plan(images, prior, resolution, dtype, flip_both, shard_size, order_seed, teacher, projection)
    if not (out / PLAN).is_file():  # a new cache: refuse one that cannot be written before creating anything
        check_output_dir(out, "--out", need_bytes=len(images) * plan["bytes_per_image"])
    for sub in ("shards", "progress"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if world == 1:  # plan and manifest have one writer only in a single-process run
        remove_stale_temps(out / PLAN)
        remove_stale_temps(out / MANIFEST)
        remove_stale_temps(out / PROJECTION_FILE)
    _load_plan(out, plan)
    if (out / MANIFEST).is_file():
        damaged = damaged_shards(out, checksums)
        if -1 not in damaged and (problem := projection_problem(out, read_manifest(out))):  # refit: same images, same bytes
            print(f"ahpa extract: {problem}; fitting it again")
            (out / PROJECTION_FILE).unlink(missing_ok=True)
            prepare_projection(out, projection, images, prior, batch_size, progress)
            if projection_problem(out, read_manifest(out)):
                raise AhpaError(f"'{out}': the refitted projection differs from the recorded one (other hardware?); extract into a new --out")
        if not damaged:
            if progress:
                print(f"ahpa extract: '{out}' is already complete ({'sha256' if checksums else 'sizes, headers and xxh3_64'} checked)")
            return read_manifest(out)
        print(f"ahpa extract: {len(damaged)} shard(s) of '{out}' are damaged ({next(iter(damaged.values()))}); redoing exactly those")
        for k in damaged:  # the shard is no longer recorded as done; the manifest (commit point) is rewritten at the end
            (out / "progress" / f"{k:06d}.json").unlink(missing_ok=True)
            (out / "shards" / f"{k:06d}.safetensors").unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
    shards = shard_plan(len(images), shard_size, order_seed)
    pending = [k for k in range(len(shards)) if _done(out, k) is None]
    todo = [k for k in pending if k % world == rank]
    for k in todo:  # partial shard files and progress records of a killed run
        remove_stale_temps(out / "shards" / f"{k:06d}.safetensors")
        remove_stale_temps(out / "progress" / f"{k:06d}.json")

    needed = sum(len(shards[k]) for k in pending) * plan["bytes_per_image"]
    free = shutil.disk_usage(out).free
    if progress:
        print(
            f"ahpa extract: {len(images)} images, {len(shards)} shards ({len(pending)} to do, {len(todo)} on rank {rank}/{world}); "
            f"{plan['bytes_per_image'] / 2**20:.3f} MiB per image, {needed / 2**30:.2f} GiB still to write, {free / 2**30:.1f} GiB free"
        )
    if needed > free:
        raise AhpaError(f"the cache needs {needed / 2**30:.2f} GiB more but only {free / 2**30:.2f} GiB are free at '{out}'; free space or use --dtype int8")

    fitted = prepare_projection(out, projection, images, prior, batch_size, progress) if projection and todo else None
    batches = [(k, shards[k][i : i + batch_size].tolist(), i + batch_size >= len(shards[k])) for k in todo for i in range(0, len(shards[k]), batch_size)]
    loader = DataLoader(_Decoded(images), batch_sampler=[b for _, b, _ in batches], collate_fn=list, num_workers=workers,
                        worker_init_fn=preemption.ignore_in_worker if workers else None)
    bar = tqdm(total=sum(len(shards[k]) for k in todo), unit="img", desc=f"extract rank {rank}", disable=not progress, smoothing=0.05)
    # One shard is written (fsync, sha256) in a thread while the next is encoded.
    writer, writing = ThreadPoolExecutor(max_workers=1), None
    buffer, encoded, committed = None, 0, 0
    try:
        for (k, _, last), results in zip(batches, loader):
            buffer = buffer or _ShardBuffer(len(shards[k]))
            _encode(prior, results, buffer, dtype, flip_both, teacher, fitted)
            bar.update(len(results))
            encoded += 1
            if last:
                if writing is not None:
                    writing.result()
                writing, buffer = writer.submit(_commit, buffer, out, k, images.root), None
                committed += 1
                preemption.send_test_signal(committed)
                if preemption.requested() is not None:  # SIGTERM/SIGUSR1: stop at this shard boundary, it is written
                    writing.result()  # this shard's commit finishes before the stop
                    writing = None
                    written = sum(_done(out, j) is not None for j in range(len(shards)))
                    preemption.check(f"{written} of {len(shards)} shards of {out} are written; rerun the same command to continue")
            if stop_after is not None and encoded >= stop_after:
                return None
    finally:
        if writing is not None:
            writing.result()
        writer.shutdown()
        bar.close()

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        return finalize(out, plan, len(shards)) if rank == 0 else None
    still = [k for k in range(len(shards)) if _done(out, k) is None]
    if still:
        if progress:
            print(f"ahpa extract: rank {rank} done; {len(still)} shards pending on other ranks (the last rank to finish writes {MANIFEST})")
        return None
    return finalize(out, plan, len(shards))
