"""The sampling engine of ``ahpa sample``: N samples from a model into an ADM ``.npz`` (docs/design.md
sections 7 and 10), the same for class labels and prompts (:mod:`ahpa.generate.conditions`).

Sample i has its condition from i alone and its noise from (seed, i) alone
(:func:`ahpa.sampling.noise_for_indices`), so the result does not depend on the batch size or the
number of processes.  Process r of w takes the indices i = r, r + w, r + 2w, ... in batches; each
finished batch is written atomically to ``OUT/parts/part_{first index:08d}_{count}.npz`` (``arr_0``
uint8 images, ``indices``, and the condition's per-sample arrays, e.g. ``labels``).  A restart skips
every index already in a part file.  When all N exist, rank 0 writes ``OUT/samples_{N}.npz`` (``arr_0``
images in index order, plus the condition's arrays: ``arr_1`` labels, or ``prompts``).
``OUT/sampling.json`` records the settings, the condition and the sha256 of the model's weights; a
rerun with other settings or another checkpoint is refused, so one ``.npz`` never mixes checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ahpa import preemption
from ahpa.errors import AhpaError
from ahpa.evaluation.npz import save_npz_atomic, to_uint8
from ahpa.generate.conditions import ClassCondition, Condition
from ahpa.io import RunLock, atomic_open, check_output_dir, lock_on_main_rank, remove_temps_in, state_sha256, write_json_atomic
from ahpa.priors.base import denormalize_latent
from ahpa.sampling import noise_for_indices, sample, sde_seeds
from ahpa.sampling_speed import check_speed_options, manifest_entries, speed_wrapped

PARTS_DIR = "parts"
PNG_DIR = "png"
MANIFEST = "sampling.json"


def samples_path(out_dir: str | os.PathLike, num: int) -> Path:
    """Where the assembled ADM ``.npz`` of ``num`` samples goes."""
    return Path(out_dir) / f"samples_{num}.npz"


def latents_to_vae(z: Tensor, meta: dict) -> Tensor:
    """Undo the training normalisation: VAE latent = z / scale + shift (scalars or per-channel lists).

    ``meta["latent_scale"]``/``["latent_shift"]`` when set (channel statistics), else
    the VAE scaling factor (0.18215 for SD-VAE) and no shift (docs/design.md section 10).
    """
    scale = meta.get("latent_scale") or meta.get("scaling_factor") or 0.18215
    return denormalize_latent(z, scale, meta.get("latent_shift") or 0.0)


def vae_decoder(vae: nn.Module) -> Callable[[Tensor], Tensor]:
    """The ``decode_fn`` of a diffusers-style VAE: latents -> float32 images in [-1, 1], decoded in the VAE's dtype."""
    def decode(latents: Tensor) -> Tensor:
        return vae.decode(latents.to(vae.dtype)).sample.float()
    return decode


def written_indices(parts_dir: Path) -> set[int]:
    """Indices already held by part files."""
    done: set[int] = set()
    for part in parts_dir.glob("part_*.npz"):
        try:
            with np.load(part) as data:
                done.update(int(i) for i in data["indices"])
        except (OSError, ValueError, KeyError) as err:
            raise AhpaError(f"part file {part} is unreadable ({err}); delete it and rerun to redo its samples") \
                from None
    return done


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes, bytes): the identity samples are bound to."""
    return state_sha256(model, header="{key}|{dtype}|{shape}|")


def check_sampler_arguments(num: int, batch: int, sampler_kwargs: dict, seed: int = 0) -> None:
    """AhpaError for values the sampler cannot use, before anything is written."""
    steps, cfg_scale = sampler_kwargs.get("steps", 1), sampler_kwargs.get("cfg_scale", 1.0)
    low, high = sampler_kwargs.get("guidance_interval", (0.0, 1.0))
    if num < 1 or batch < 1:
        raise AhpaError(f"--num and --batch must be at least 1 (got {num} and {batch})")
    if steps < 1:
        raise AhpaError(f"--steps must be at least 1 (got {steps}); the paper's setting is 250 (SDE) or 50 (ODE)")
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise AhpaError(f"--cfg-scale must be a finite number >= 0 (got {cfg_scale}); 1 means no guidance")
    if not 0.0 <= low <= high <= 1.0:
        raise AhpaError("--guidance-low and --guidance-high must satisfy 0 <= low <= high <= 1")
    if seed < 0:
        raise AhpaError(f"--seed must be non-negative (got {seed})")


def check_speed_levers(condition: Condition | type[Condition], precision: str, compile: bool) -> None:
    """AhpaError for an unknown precision, or for bf16 / compile with a condition they do not apply to."""
    check_speed_options(precision, compile)
    if manifest_entries(precision, compile) and not condition.speed_levers:
        raise AhpaError("--precision bf16 and --compile are for class-conditional sampling only so far; "
                        "drop them for an MMDiT checkpoint")


def _check_manifest(out_dir: Path, settings: dict) -> None:
    """Refuse to mix samples drawn with different settings or weights in one directory."""
    path = out_dir / MANIFEST
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("weights_sha256", settings.get("weights_sha256")) != settings.get("weights_sha256"):
            raise AhpaError(f"{out_dir} holds samples of another checkpoint (weights sha256 {recorded['weights_sha256'][:12]}..., "
                            f"this one is {settings['weights_sha256'][:12]}...); use a new --out directory for each checkpoint")
        if "weights_sha256" not in recorded and "weights_sha256" in settings:  # sampled before the weights were recorded
            print(f"note: {path} does not record which weights drew its samples (older ahpa): resuming unverified")
            settings.pop("weights_sha256")
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        if changed:
            raise AhpaError(f"{out_dir} holds samples drawn with other settings ({', '.join(changed)} differ, see "
                            f"{path}); use a new --out directory or delete that one")
        return
    write_json_atomic(path, settings, sort_keys=True)


def _write_pngs(png_dir: Path, indices: list[int], images: np.ndarray) -> None:
    for index, image in zip(indices, images):
        with atomic_open(png_dir / f"{index:06d}.png") as f:
            Image.fromarray(image).save(f, format="PNG")


def assemble_samples(out_dir: str | os.PathLike, num: int, gathered: Mapping[str, str] = ClassCondition.gathered,
                     archive: Mapping[str, np.ndarray] | None = None) -> Path:
    """Gather the part files into ``samples_{num}.npz`` ordered by index (indices >= num are left out).

    ``gathered``: per-sample arrays of the parts -> their name in the archive (default: class labels
    as ``arr_1``); ``archive``: further arrays of the archive (e.g. the prompts).  Images are gathered
    in a memory-mapped ``.npy`` beside the output and streamed into the archive, so rank 0 never holds
    all of them (50K at 256 px are 9.8 GB).
    """
    out_dir = Path(out_dir)
    present = np.zeros(num, dtype=bool)
    arrays: dict[str, np.ndarray] = {}
    gather = out_dir / f".samples_{num}.gather.npy"
    images = None
    try:
        for part in sorted((out_dir / PARTS_DIR).glob("part_*.npz")):
            with np.load(part) as data:
                indices, keep = data["indices"], data["indices"] < num
                if images is None:
                    images = np.lib.format.open_memmap(gather, mode="w+", dtype=np.uint8, shape=(num, *data["arr_0"].shape[1:]))
                images[indices[keep]] = data["arr_0"][keep]
                for key, name in gathered.items():
                    if name not in arrays:
                        arrays[name] = np.zeros((num, *data[key].shape[1:]), dtype=data[key].dtype)
                    arrays[name][indices[keep]] = data[key][keep]
                present[indices[keep]] = True
        if not present.all():
            raise AhpaError(f"{(~present).sum()} of {num} samples are missing from {out_dir / PARTS_DIR}; "
                            "rerun the same command to draw them")
        return save_npz_atomic(samples_path(out_dir, num), images, **arrays, **(archive or {}))
    finally:
        del images
        gather.unlink(missing_ok=True)


@torch.no_grad()
def generate_samples(model: nn.Module, meta: dict, decode_fn: Callable[[Tensor], Tensor], out_dir: str | os.PathLike,
                     num: int, batch: int, sampler_kwargs: dict, seed: int = 0, rank: int = 0, world: int = 1,
                     write_png: bool = False, condition: Condition | None = None,
                     barrier: Callable[[], None] | None = None, precision: str = "float32",
                     compile: bool = False) -> Path | None:
    """Draw this rank's share of samples 0..num-1, then (rank 0) assemble the ``.npz``.

    ``meta``: the checkpoint meta (input_size, in_channels, num_classes, latent
    normalisation, time_convention).  ``decode_fn``: VAE latents -> images in [-1, 1]
    ``[B, 3, H, W]``.  ``sampler_kwargs``: keyword arguments of
    :func:`ahpa.sampling.sample` (mode, method, steps, cfg_scale, guidance_interval, path).
    ``condition``: class labels or prompts (default: the checkpoint's ``num_classes`` classes).
    ``barrier`` (e.g. accelerate's ``wait_for_everyone``) is called before assembling.
    ``precision``/``compile``: :mod:`ahpa.sampling_speed` (bf16 forwards, torch.compile; off by default).
    Returns the ``.npz`` path on rank 0 once all samples exist, else None.
    """
    check_sampler_arguments(num, batch, sampler_kwargs, seed)
    condition = condition or ClassCondition(meta["num_classes"])
    check_speed_levers(condition, precision, compile)
    if condition.count is not None and condition.count != num:
        raise AhpaError(f"{num} samples asked for, but there are {condition.count} prompts; draw one sample per prompt")
    out_dir = Path(out_dir)
    kwargs = {"time_convention": meta.get("time_convention", "repa"), **sampler_kwargs}
    parts_dir = out_dir / PARTS_DIR
    settings = {"seed": seed, "sampler": kwargs, "model": meta, "weights_sha256": weights_digest(model),
                **condition.manifest(), **manifest_entries(precision, compile)}
    parts_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, settings)
    final = samples_path(out_dir, num)
    if final.is_file():
        return final if rank == 0 else None

    done = written_indices(parts_dir)
    todo = [i for i in range(rank, num, world) if i not in done]
    device = next(model.parameters()).device
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    forward = speed_wrapped(model, precision, compile)
    bar = tqdm(total=len(todo), desc=f"sampling (rank {rank})", unit="img", disable=rank != 0)
    for start in range(0, len(todo), batch):
        # SIGTERM/SIGUSR1 (ahpa/preemption.py): stop between batches; the written parts are kept and resumed
        preemption.check(f"{len(done) + start} of {num} samples are in {parts_dir}" + (f" (rank {rank})" if world > 1 else "")
                         + "; rerun the same command to continue")
        indices = todo[start : start + batch]
        y, arrays = condition.batch(indices, device)
        noise = noise_for_indices(indices, seed, shape, device)
        seeds = sde_seeds(indices, seed) if kwargs.get("mode") == "sde" else None
        latents = sample(forward, y, noise, seeds=seeds, **kwargs)
        images = to_uint8(decode_fn(latents_to_vae(latents.float(), meta)))
        if write_png:
            _write_pngs(out_dir / PNG_DIR, indices, images)
        save_npz_atomic(parts_dir / f"part_{indices[0]:08d}_{len(indices)}.npz", images,
                        indices=np.asarray(indices, dtype=np.int64), **arrays)
        bar.update(len(indices))
        preemption.send_test_signal(start // batch + 1)
    bar.close()
    note = condition.note()
    if note and rank == 0:
        print(note)
    if barrier is None:  # ranks run one after another (tests): assemble once all parts exist
        complete = rank == 0 and len(written_indices(parts_dir) & set(range(num))) == num
    else:
        barrier()  # every rank has finished: missing parts now mean a real problem (e.g. a node-local --out)
        complete = rank == 0
    return assemble_samples(out_dir, num, condition.gathered, condition.archive()) if complete else None


def assembly_bytes(out_dir: Path, num: int, side: int, png: bool = False) -> int:
    """Disk still needed: the part files not yet written, the memory-mapped gather file and the
    final .npz (each about num x side^2 x 3 bytes; so about twice the .npz beyond the parts)."""
    per_image = side * side * 3
    if samples_path(out_dir, num).is_file():
        return 0
    written = sum(p.stat().st_size for p in (out_dir / PARTS_DIR).glob("part_*.npz")) if (out_dir / PARTS_DIR).is_dir() else 0
    return max(0, num * per_image - written) + 2 * num * per_image + (num * per_image if png else 0)


def lock_sample_dir(out: Path, state, need_bytes: int) -> RunLock | None:
    """Rank 0 checks the space and locks OUT; every rank learns the outcome (one collective).

    ``state``: accelerate's ``PartialState``.  Temporaries of a killed run are removed under the lock."""
    lock = lock_on_main_rank(out, "ahpa sample", is_main=state.is_main_process, world=state.num_processes, device=state.device,
                             check=lambda: check_output_dir(out, "--out", need_bytes=need_bytes))
    if lock is not None:
        for sub in (out, out / PARTS_DIR, out / PNG_DIR):
            if sub.is_dir():
                remove_temps_in(sub)
        for gather in out.glob(".samples_*.gather.npy"):
            gather.unlink(missing_ok=True)
    return lock
