"""``ahpa sample``: draw N images from a checkpoint into an ADM ``.npz`` (SPEC section 7).

Sample i has class label ``i % num_classes`` and its noise from (seed, i) alone
(:func:`ahpa.sampling.noise_for_indices`), so the result does not depend on the
batch size or the number of processes.  Process r of w takes the indices
i = r, r + w, r + 2w, ... in batches; each finished batch is written atomically
to ``OUT/parts/part_{first index:08d}_{count}.npz`` (``arr_0`` uint8 images,
``indices``, ``labels``).  A restart skips every index already in a part file.
When all N exist, rank 0 writes ``OUT/samples_{N}.npz`` (``arr_0`` images in
index order, ``arr_1`` labels, as guided-diffusion's class-conditional samples).
``OUT/sampling.json`` records the settings; a rerun with other settings is refused.

    ahpa sample --ckpt RUN/checkpoints/0400000 --out OUT --mode sde --cfg-scale 1.8 --guidance-high 0.7
    accelerate launch -m ahpa.cli sample ...   # several GPUs, the same .npz
"""

from __future__ import annotations

import argparse
import json
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
from ahpa.io import atomic_open, write_json_atomic
from ahpa.priors.base import denormalize_latent
from ahpa.sampling import noise_for_indices, sample, sde_seeds

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


def _check_manifest(out_dir: Path, settings: dict) -> None:
    """Refuse to mix samples drawn with different settings in one directory."""
    path = out_dir / MANIFEST
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    if path.is_file():
        recorded = json.loads(path.read_text())
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
                     barrier: Callable[[], None] | None = None) -> Path | None:
    """Draw this rank's share of samples 0..num-1, then (rank 0) assemble the ``.npz``.

    ``meta``: the checkpoint meta (input_size, in_channels, num_classes, latent
    normalisation, time_convention).  ``decode_fn``: VAE latents -> images in [-1, 1]
    ``[B, 3, H, W]``.  ``sampler_kwargs``: keyword arguments of
    :func:`ahpa.sampling.sample` (mode, method, steps, cfg_scale, guidance_interval, path).
    ``barrier`` (e.g. accelerate's ``wait_for_everyone``) is called before assembling.
    Returns the ``.npz`` path on rank 0 once all samples exist, else None.
    """
    if num < 1 or batch < 1:
        raise AhpaError(f"--num and --batch must be at least 1 (got {num} and {batch})")
    out_dir = Path(out_dir)
    num_classes = num_classes or meta["num_classes"]
    kwargs = {"time_convention": meta.get("time_convention", "repa"), **sampler_kwargs}
    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, {"seed": seed, "num_classes": num_classes, "sampler": kwargs, "model": meta})
    final = samples_path(out_dir, num)
    if final.is_file():
        return final if rank == 0 else None

    done = written_indices(parts_dir)
    todo = [i for i in range(rank, num, world) if i not in done]
    device = next(model.parameters()).device
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    bar = tqdm(total=len(todo), desc=f"sampling (rank {rank})", unit="img", disable=rank != 0)
    for start in range(0, len(todo), batch):
        indices = todo[start : start + batch]
        labels = [i % num_classes for i in indices]
        noise = noise_for_indices(indices, seed, shape, device)
        seeds = sde_seeds(indices, seed) if kwargs.get("mode") == "sde" else None
        y = torch.tensor(labels, dtype=torch.long, device=device)
        latents = sample(model, y, noise, seeds=seeds, **kwargs)
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
        return run_t2i(args)
    if args.prompts:
        raise AhpaError(f"--prompts is for text-to-image (MMDiT) checkpoints; {args.ckpt} is a class-conditional model")
    args.num = 50_000 if args.num is None else args.num
    if not 0.0 <= args.guidance_low <= args.guidance_high <= 1.0:
        raise AhpaError("--guidance-low and --guidance-high must satisfy 0 <= low <= high <= 1")
    # cpu=True: several CPU processes use gloo; a long timeout: on resume one rank may wait long at the barrier
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=6))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    model, meta = load_model_for_sampling(args.ckpt, model_name=args.model, num_classes=args.num_classes)
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
    if state.is_main_process:
        print(f"sampling {args.num} images from {meta['model']} on {state.num_processes} process(es): {sampler_kwargs}")
    path = generate_samples(model, meta, lambda x: vae.decode(x.to(vae.dtype)).sample.float(), args.out, args.num,
                            args.batch, sampler_kwargs, seed=args.seed, rank=state.process_index,
                            world=state.num_processes, write_png=args.png, num_classes=args.num_classes,
                            barrier=state.wait_for_everyone)
    if state.is_main_process:
        print(f"wrote {path}")
    return 0
