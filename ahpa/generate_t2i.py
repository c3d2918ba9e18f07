"""``ahpa sample`` for a text-to-image MMDiT checkpoint (paper Appendix C, Table 5).

Prompts (``--prompts``):

- ``coco-val``: one prompt per val2014 image in image-id order, its first caption
  (REPA's protocol: 40,504 samples, compared with the 256 px val2014 reference);
- ``coco-random``: ``--num`` captions drawn at random from all val2014 captions
  (U-ViT's protocol: 30K), seeded by ``--seed``;
- a text file: one prompt per line.

Sample i gets prompt i and its noise from (seed, i) alone, as ``generate.py``:
parts are written atomically and a restart skips what exists.  The assembled
``samples_{N}.npz`` holds ``arr_0`` (uint8 NHWC) and ``prompts`` (a unicode
array, readable without pickle), so PickScore needs no side file.  The CFG null
condition is the empty prompt's embedding the checkpoint holds; prompts longer
than 77 CLIP tokens are truncated and counted in ``sampling.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ahpa.errors import AhpaError
from ahpa.evaluation.npz import save_npz_atomic, to_uint8
from ahpa.generate import (
    PARTS_DIR,
    PNG_DIR,
    _check_manifest,
    _lock_sample_dir,
    _write_pngs,
    assembly_bytes,
    check_sampler_arguments,
    latents_to_vae,
    refuse_nonfinite,
    samples_path,
    verify_ema_file,
    weights_digest,
    written_indices,
)
from ahpa.sampling import noise_for_indices, sample, sde_seeds

PROTOCOLS = ("coco-val", "coco-random")
PROMPTS_KEY = "prompts"


def is_t2i_checkpoint(path: str) -> bool:
    """True for an ahpa checkpoint of an MMDiT (its meta names the model)."""
    from ahpa.models.checkpoints import read_meta

    p = Path(path)
    if p.suffix == ".pt" or not (p.is_dir() or p.suffix == ".safetensors"):
        return False
    try:
        return str(read_meta(p).get("model", "")).startswith("MMDiT")
    except AhpaError:
        return False


def load_mmdit_for_sampling(path: str) -> tuple[torch.nn.Module, dict]:
    from safetensors.torch import load_file

    from ahpa.models.checkpoints import _resolve, read_meta
    from ahpa.models.mmdit import build_mmdit

    file = _resolve(path)
    meta = read_meta(file)
    with torch.device("meta"):
        model = build_mmdit(meta["model"], meta["input_size"], in_channels=meta["in_channels"],
                            context_tokens=meta["context_tokens"], context_dim=meta["context_dim"])
    state = load_file(str(file))
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise AhpaError(f"{file}: tensor '{missing[0]}' of {meta['model']} is missing; the checkpoint is damaged")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval(), meta


def read_prompts(spec: str, coco: str | None, num: int | None, seed: int) -> list[str]:
    """The prompt list of a protocol or a file (validated before anything is written)."""
    if spec in PROTOCOLS:
        if not coco:
            raise AhpaError(f"--prompts {spec} needs --coco /path/to/coco (annotations/captions_val2014.json)")
        from ahpa.data.coco import CocoCaptions

        captions = CocoCaptions(coco, "val2014")
        if spec == "coco-val":
            prompts = captions.first_captions()
            return prompts[:num] if num else prompts
        return captions.random_captions(num or 30_000, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise AhpaError(f"--prompts {spec!r} is neither {' nor '.join(PROTOCOLS)} nor a text file (one prompt per line)")
    prompts = [line.rstrip("\n") for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise AhpaError(f"prompt file {path} holds no prompt (one per line)")
    return prompts[:num] if num else prompts


def assemble_t2i(out_dir: Path, prompts: list[str]) -> Path:
    num = len(prompts)
    images, present = None, np.zeros(num, dtype=bool)
    gather = out_dir / f".samples_{num}.gather.npy"
    try:
        for part in sorted((out_dir / PARTS_DIR).glob("part_*.npz")):
            with np.load(part) as data:
                idx = data["indices"]
                keep = idx < num
                if images is None:
                    images = np.lib.format.open_memmap(gather, mode="w+", dtype=np.uint8, shape=(num, *data["arr_0"].shape[1:]))
                images[idx[keep]] = data["arr_0"][keep]
                present[idx[keep]] = True
        if images is None or not present.all():
            raise AhpaError(f"{(~present).sum()} of {num} samples are missing from {out_dir / PARTS_DIR}; rerun the same command")
        return save_npz_atomic(samples_path(out_dir, num), images, **{PROMPTS_KEY: np.asarray(prompts, dtype=np.str_)})
    finally:
        del images
        gather.unlink(missing_ok=True)


@torch.no_grad()
def generate_t2i_samples(model, meta: dict, decode_fn: Callable, encoder, prompts: list[str], out_dir, batch: int,
                         sampler_kwargs: dict, seed: int = 0, rank: int = 0, world: int = 1, barrier=None,
                         write_png: bool = False) -> Path | None:
    """Sample i from prompt i and the noise of (seed, i); this rank's share, then (rank 0) the ``.npz``."""
    import hashlib

    out_dir = Path(out_dir)
    check_sampler_arguments(len(prompts), batch, sampler_kwargs, seed)
    kwargs = {"time_convention": meta.get("time_convention", "repa"), **sampler_kwargs}
    settings = {"seed": seed, "sampler": kwargs, "model": meta, "text_encoder": encoder.source,
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "num": len(prompts),
                "weights_sha256": weights_digest(model)}
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, settings)
    final = samples_path(out_dir, len(prompts))
    if final.is_file():
        return final if rank == 0 else None
    done = written_indices(out_dir / PARTS_DIR)
    todo = [i for i in range(rank, len(prompts), world) if i not in done]
    device = next(model.parameters()).device
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    truncated = 0
    bar = tqdm(total=len(todo), desc=f"sampling (rank {rank})", unit="img", disable=rank != 0)
    for start in range(0, len(todo), batch):
        indices = todo[start : start + batch]
        context, trunc = encoder.encode([prompts[i] for i in indices])
        truncated += trunc.truncated
        context = context[:, : meta["context_tokens"]].to(device)
        noise = noise_for_indices(indices, seed, shape, device)
        seeds = sde_seeds(indices, seed) if kwargs.get("mode") == "sde" else None
        latents = sample(model, context, noise, seeds=seeds, **kwargs)
        images = to_uint8(decode_fn(latents_to_vae(latents.float(), meta)))
        if write_png:
            _write_pngs(out_dir / PNG_DIR, indices, images)
        save_npz_atomic(out_dir / PARTS_DIR / f"part_{indices[0]:08d}_{len(indices)}.npz", images,
                        indices=np.asarray(indices, dtype=np.int64))
        bar.update(len(indices))
    bar.close()
    if truncated and rank == 0:
        print(f"note: {truncated} prompts of this run exceed 77 CLIP tokens and were truncated to 77")
    if barrier is not None:
        barrier()
    elif len(written_indices(out_dir / PARTS_DIR) & set(range(len(prompts)))) < len(prompts):
        return None
    return assemble_t2i(out_dir, prompts) if rank == 0 else None


def run_t2i(args: argparse.Namespace) -> int:
    """``ahpa sample`` on an MMDiT checkpoint (called by ``generate.run``)."""
    from datetime import timedelta

    from accelerate import PartialState

    from ahpa.io import check_output_dir
    from ahpa.priors.text import load_clip_text_encoder
    from ahpa.priors.vae import load_vae, vae_downsample_factor

    if not args.prompts:
        raise AhpaError("an MMDiT checkpoint samples from prompts: pass --prompts coco-val|coco-random (with --coco) or a prompt file")
    if args.num_classes is not None or args.model is not None:
        raise AhpaError("--num-classes and --model are for class-conditional checkpoints; an MMDiT samples from --prompts")
    if args.num is not None and args.num < 1:
        raise AhpaError(f"--num must be at least 1 (got {args.num})")
    prompts = read_prompts(args.prompts, args.coco, args.num, args.seed)  # --num: all prompts when not given
    kwargs = dict(mode=args.mode, method=args.method, steps=args.steps, cfg_scale=args.cfg_scale,
                  guidance_interval=(args.guidance_low, args.guidance_high))
    check_sampler_arguments(len(prompts), args.batch, kwargs, args.seed)
    check_output_dir(args.out, "--out")
    verify_ema_file(args.ckpt)
    model, meta = load_mmdit_for_sampling(args.ckpt)
    refuse_nonfinite(model, args.ckpt)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=6))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    model = model.to(state.device)
    encoder = load_clip_text_encoder(args.text_encoder or meta.get("text_encoder", "openai/clip-vit-large-patch14"),
                                     device=state.device)
    meta = dict(meta, vae=args.vae or meta.get("vae") or "stabilityai/sd-vae-ft-ema")
    if args.time_convention != "auto":
        meta["time_convention"] = args.time_convention
    vae = load_vae(meta["vae"], device=state.device)
    kwargs["path"] = args.path or meta.get("path", "linear")
    config = getattr(vae, "config", None)
    side = meta["input_size"] * (vae_downsample_factor(vae) if config is not None and hasattr(config, "block_out_channels") else 8)
    lock = _lock_sample_dir(Path(args.out), state, need_bytes=assembly_bytes(Path(args.out), len(prompts), side, args.png))
    try:
        if state.is_main_process:
            print(f"sampling {len(prompts)} images ({args.prompts}) from {meta['model']} on {state.num_processes} process(es): {kwargs}")
        path = generate_t2i_samples(model, meta, lambda x: vae.decode(x.to(vae.dtype)).sample.float(), encoder, prompts,
                                    args.out, args.batch, kwargs, seed=args.seed, rank=state.process_index,
                                    world=state.num_processes, barrier=state.wait_for_everyone, write_png=args.png)
    finally:
        if lock is not None:
            lock.release()
    if state.is_main_process:
        print(f"wrote {path}")
    return 0
