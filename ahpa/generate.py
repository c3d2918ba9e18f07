"""``ahpa sample``: draw N images from a checkpoint into an ADM ``.npz`` (docs/design.md section 7).

Sample i has class label ``i % num_classes`` and its noise from (seed, i) alone
(:func:`ahpa.sampling.noise_for_indices`), so the result does not depend on the
batch size or the number of processes.  Process r of w takes the indices
i = r, r + w, r + 2w, ... in batches; each finished batch is written atomically
to ``OUT/parts/part_{first index:08d}_{count}.npz`` (``arr_0`` uint8 images,
``indices``, ``labels``).  A restart skips every index already in a part file.
When all N exist, rank 0 writes ``OUT/samples_{N}.npz`` (``arr_0`` images in
index order, ``arr_1`` labels, as guided-diffusion's class-conditional samples).
``OUT/sampling.json`` records the settings and the sha256 of the model's weights; a rerun
with other settings or another checkpoint is refused, so one ``.npz`` never mixes checkpoints.

    ahpa sample --ckpt RUN/checkpoints/0400000 --out OUT --mode sde --cfg-scale 1.8 --guidance-high 0.7
    accelerate launch -m ahpa.cli sample ...   # several GPUs, the same .npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from datetime import timedelta
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ahpa.errors import AhpaError
from ahpa.evaluation.npz import save_npz_atomic, to_uint8
from ahpa.io import RunLock, atomic_open, check_output_dir, lock_on_main_rank, remove_temps_in, write_json_atomic
from ahpa.priors.base import denormalize_latent
from ahpa.sampling import noise_for_indices, sample, sde_seeds
from ahpa.sampling_speed import PRECISIONS, check_speed_options, manifest_entries, speed_wrapped

PARTS_DIR = "parts"
PNG_DIR = "png"
MANIFEST = "sampling.json"


def samples_path(out_dir: str | os.PathLike, num: int) -> Path:
    """Where the assembled ADM ``.npz`` of ``num`` samples goes."""
    return Path(out_dir) / f"samples_{num}.npz"


def latents_to_vae(z: Tensor, meta: dict) -> Tensor:
    """Undo the training normalisation: VAE latent = z / scale + shift (scalars or per-channel lists).

    ``meta["latent_scale"]``/``["latent_shift"]`` when set (channel statistics), else
    the VAE scaling factor (0.18215 for SD-VAE) and no shift.
    """
    scale = meta.get("latent_scale") or meta.get("scaling_factor") or 0.18215
    return denormalize_latent(z, scale, meta.get("latent_shift") or 0.0)


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
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


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


def assemble_samples(out_dir: str | os.PathLike, num: int) -> Path:
    """Gather the part files into ``samples_{num}.npz`` ordered by index (indices >= num are left out).

    Images are gathered in a memory-mapped ``.npy`` beside the output and streamed into
    the archive, so rank 0 never holds all of them (50K at 256 px are 9.8 GB).
    """
    out_dir = Path(out_dir)
    labels, present = np.zeros(num, dtype=np.int64), np.zeros(num, dtype=bool)
    gather = out_dir / f".samples_{num}.gather.npy"
    images = None
    try:
        for part in sorted((out_dir / PARTS_DIR).glob("part_*.npz")):
            with np.load(part) as data:
                indices, keep = data["indices"], data["indices"] < num
                if images is None:
                    images = np.lib.format.open_memmap(gather, mode="w+", dtype=np.uint8, shape=(num, *data["arr_0"].shape[1:]))
                images[indices[keep]] = data["arr_0"][keep]
                labels[indices[keep]] = data["labels"][keep]
                present[indices[keep]] = True
        if not present.all():
            raise AhpaError(f"{(~present).sum()} of {num} samples are missing from {out_dir / PARTS_DIR}; "
                            "rerun the same command to draw them")
        return save_npz_atomic(samples_path(out_dir, num), images, arr_1=labels)
    finally:
        del images
        gather.unlink(missing_ok=True)


@torch.no_grad()
def generate_samples(model: nn.Module, meta: dict, decode_fn: Callable[[Tensor], Tensor], out_dir: str | os.PathLike,
                     num: int, batch: int, sampler_kwargs: dict, seed: int = 0, rank: int = 0, world: int = 1,
                     write_png: bool = False, num_classes: int | None = None,
                     barrier: Callable[[], None] | None = None, precision: str = "float32",
                     compile: bool = False) -> Path | None:
    """Draw this rank's share of samples 0..num-1, then (rank 0) assemble the ``.npz``.

    ``meta``: the checkpoint meta (input_size, in_channels, num_classes, latent
    normalisation, time_convention).  ``decode_fn``: VAE latents -> images in [-1, 1]
    ``[B, 3, H, W]``.  ``sampler_kwargs``: keyword arguments of
    :func:`ahpa.sampling.sample` (mode, method, steps, cfg_scale, guidance_interval, path).
    ``barrier`` (e.g. accelerate's ``wait_for_everyone``) is called before assembling.
    ``precision``/``compile``: :mod:`ahpa.sampling_speed` (bf16 forwards, torch.compile; off by default).
    Returns the ``.npz`` path on rank 0 once all samples exist, else None.
    """
    check_sampler_arguments(num, batch, sampler_kwargs, seed)
    out_dir = Path(out_dir)
    num_classes = num_classes or meta["num_classes"]
    kwargs = {"time_convention": meta.get("time_convention", "repa"), **sampler_kwargs}
    parts_dir = out_dir / PARTS_DIR
    check_speed_options(precision, compile)
    settings = {"seed": seed, "num_classes": num_classes, "sampler": kwargs, "model": meta, "weights_sha256": weights_digest(model),
                **manifest_entries(precision, compile)}
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
        indices = todo[start : start + batch]
        labels = [i % num_classes for i in indices]
        noise = noise_for_indices(indices, seed, shape, device)
        seeds = sde_seeds(indices, seed) if kwargs.get("mode") == "sde" else None
        y = torch.tensor(labels, dtype=torch.long, device=device)
        latents = sample(forward, y, noise, seeds=seeds, **kwargs)
        images = to_uint8(decode_fn(latents_to_vae(latents.float(), meta)))
        if write_png:
            _write_pngs(out_dir / PNG_DIR, indices, images)
        save_npz_atomic(parts_dir / f"part_{indices[0]:08d}_{len(indices)}.npz", images,
                        indices=np.asarray(indices, dtype=np.int64), labels=np.asarray(labels, dtype=np.int64))
        bar.update(len(indices))
    bar.close()
    if barrier is None:  # ranks run one after another (tests): assemble once all parts exist
        return assemble_samples(out_dir, num) if rank == 0 and len(written_indices(parts_dir) & set(range(num))) == num else None
    barrier()  # every rank has finished: missing parts now mean a real problem (e.g. a node-local --out)
    return assemble_samples(out_dir, num) if rank == 0 else None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="draw samples from a checkpoint into an ADM .npz",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="RUN/checkpoints/<step>/, its ema.safetensors, or a published SiT/REPA .pt")
    p.add_argument("--model", default=None, help="architecture name (e.g. SiT-XL/2) for .pt files; default: inferred")
    p.add_argument("--out", required=True, help="output directory (parts/, samples_N.npz, optional png/)")
    p.add_argument("--num", type=int, default=None, help="number of samples (default 50000; text-to-image: all prompts)")
    p.add_argument("--batch", type=int, default=64, help="samples per batch per process")
    p.add_argument("--mode", choices=("ode", "sde"), default="ode")
    p.add_argument("--method", choices=("euler", "heun"), default="euler", help="ODE solver (SDE: Euler-Maruyama)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0, help="guidance applies for t in [low, high]")
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--path", choices=("linear", "cosine"), default=None,
                   help="interpolant the model was trained with; default: the checkpoint's, else linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint")
    p.add_argument("--vae", default=None,
                   help="VAE (diffusers dir, cached HF repo id or 'tiny'); default: the checkpoint's")
    p.add_argument("--time-convention", choices=("auto", "repa", "sit"), default="auto",
                   help="auto: ours/REPA files are 'repa' (t=0 data), other .pt files 'sit' (t=0 noise); override when a file is mislabelled")
    p.add_argument("--png", action="store_true", help="also write png/{index:06d}.png")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="bf16: model forwards under bf16 autocast (the ODE/SDE state stays float64); default float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor); off by default")
    t2i = p.add_argument_group("text-to-image (MMDiT checkpoints, paper App. C)")
    t2i.add_argument("--prompts", help="coco-val (first caption of each val2014 image: REPA's 40K protocol), "
                     "coco-random (--num random val2014 captions, default 30000: U-ViT's protocol), or a text file")
    t2i.add_argument("--coco", help="COCO root (annotations/captions_val2014.json) for --prompts coco-*")
    t2i.add_argument("--text-encoder", help="CLIP text model: local dir or cached HF id (default: the checkpoint's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ahpa.models.checkpoints import load_model_for_sampling
    from ahpa.priors.vae import load_vae  # diffusers: imported only when sampling

    from ahpa.generate_t2i import is_t2i_checkpoint, run_t2i

    if is_t2i_checkpoint(args.ckpt):  # an MMDiT: prompts instead of class labels
        if getattr(args, "precision", "float32") != "float32" or getattr(args, "compile", False):
            raise AhpaError("--precision bf16 and --compile are for class-conditional sampling only so far; drop them for an MMDiT checkpoint")
        return run_t2i(args)
    if args.prompts or args.coco or args.text_encoder:
        raise AhpaError(f"--prompts/--coco/--text-encoder are for text-to-image (MMDiT) checkpoints; {args.ckpt} is a class-conditional model")
    args.num = 50_000 if args.num is None else args.num
    check_sampler_arguments(args.num, args.batch, dict(steps=args.steps, cfg_scale=args.cfg_scale,
                            guidance_interval=(args.guidance_low, args.guidance_high)), args.seed)
    if args.num_classes is not None and args.num_classes < 1:
        raise AhpaError(f"--num-classes must be at least 1 (got {args.num_classes})")
    check_output_dir(args.out, "--out")
    # cpu=True: several CPU processes use gloo; a long timeout: on resume one rank may wait long at the barrier
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=6))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    verify_ema_file(args.ckpt)
    model, meta = load_model_for_sampling(args.ckpt, model_name=args.model, num_classes=args.num_classes)
    refuse_nonfinite(model, args.ckpt)
    if args.cfg_scale != 1.0 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise AhpaError(f"{args.ckpt} was trained without a null class, so it cannot use guidance; use --cfg-scale 1")
    model = model.to(state.device).eval()
    meta = dict(meta, vae=args.vae or meta.get("vae") or "stabilityai/sd-vae-ft-ema")  # recorded in sampling.json
    if args.time_convention != "auto":
        meta["time_convention"] = args.time_convention
    vae = load_vae(meta["vae"], device=state.device)
    sampler_kwargs = dict(mode=args.mode, method=args.method, steps=args.steps, cfg_scale=args.cfg_scale,
                          guidance_interval=(args.guidance_low, args.guidance_high),
                          path=args.path or meta.get("path", "linear"))
    from ahpa.priors.vae import vae_downsample_factor

    config = getattr(vae, "config", None)  # a diffusers VAE; other decoders: SD-VAE's factor 8
    side = meta["input_size"] * (vae_downsample_factor(vae) if config is not None and hasattr(config, "block_out_channels") else 8)
    lock = _lock_sample_dir(Path(args.out), state, need_bytes=assembly_bytes(Path(args.out), args.num, side, args.png))
    try:
        if state.is_main_process:
            print(f"sampling {args.num} images from {meta['model']} on {state.num_processes} process(es): {sampler_kwargs}")
        path = generate_samples(model, meta, lambda x: vae.decode(x.to(vae.dtype)).sample.float(), args.out, args.num,
                                args.batch, sampler_kwargs, seed=args.seed, rank=state.process_index,
                                world=state.num_processes, write_png=args.png, num_classes=args.num_classes,
                                barrier=state.wait_for_everyone, precision=args.precision, compile=args.compile)
    finally:
        if lock is not None:
            lock.release()
    if state.is_main_process:
        print(f"wrote {path}")
    return 0


def verify_ema_file(ckpt: str | os.PathLike) -> None:
    """An ema.safetensors inside a training checkpoint must match the size and sha256 its manifest records."""
    from ahpa.checkpointing import MANIFEST as CKPT_MANIFEST

    path = Path(ckpt)
    folder, name = (path, "ema.safetensors") if path.is_dir() else (path.parent, path.name)
    try:
        record = json.loads((folder / CKPT_MANIFEST).read_text())["files"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest (a published or older file): nothing to check against
    from ahpa.io import file_sha256

    file = folder / name
    if file.is_file() and (file.stat().st_size != record["bytes"] or file_sha256(file) != record["sha256"]):
        raise AhpaError(f"{file} does not match the size/sha256 in {folder / CKPT_MANIFEST}: the file is damaged; "
                        "sample from another checkpoint of the run")


def refuse_nonfinite(model: nn.Module, ckpt) -> None:
    from ahpa.checkpointing import first_nonfinite

    bad = first_nonfinite(model)
    if bad is not None:
        raise AhpaError(f"{ckpt} holds NaN/Inf weights (first: tensor '{bad}'): its training diverged and its samples "
                        "would be blank; sample from an earlier checkpoint")


def assembly_bytes(out_dir: Path, num: int, side: int, png: bool = False) -> int:
    """Disk still needed: the part files not yet written, the memory-mapped gather file and the
    final .npz (each about num x side^2 x 3 bytes; so about twice the .npz beyond the parts)."""
    per_image = side * side * 3
    if samples_path(out_dir, num).is_file():
        return 0
    written = sum(p.stat().st_size for p in (out_dir / PARTS_DIR).glob("part_*.npz")) if (out_dir / PARTS_DIR).is_dir() else 0
    return max(0, num * per_image - written) + 2 * num * per_image + (num * per_image if png else 0)


def _lock_sample_dir(out: Path, state, need_bytes: int) -> RunLock | None:
    """Rank 0 checks the space and locks OUT; every rank learns the outcome (one collective)."""
    lock = lock_on_main_rank(out, "ahpa sample", is_main=state.is_main_process, world=state.num_processes, device=state.device,
                             check=lambda: check_output_dir(out, "--out", need_bytes=need_bytes))
    if lock is not None:
        for sub in (out, out / PARTS_DIR, out / PNG_DIR):  # temporaries of a killed run
            if sub.is_dir():
                remove_temps_in(sub)
        for gather in out.glob(".samples_*.gather.npy"):
            gather.unlink(missing_ok=True)
    return lock
