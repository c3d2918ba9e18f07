"""``ahpa sample``: draw N images from a checkpoint into an ADM ``.npz`` (docs/design.md section 7).

Sample i has class label ``i % num_classes`` (an MMDiT checkpoint: prompt i of ``--prompts``, paper
Appendix C) and its noise from (seed, i) alone, so the result does not depend on the batch size or the
number of processes.  Each finished batch is written atomically to ``OUT/parts/``; a restart skips
every sample already there.  When all N exist, ``OUT/samples_{N}.npz`` holds ``arr_0`` (uint8 images in
index order) and ``arr_1`` (labels), or ``prompts`` for a text-to-image model.  ``OUT/sampling.json``
records the settings and the sha256 of the model's weights; a rerun with other settings or another
checkpoint is refused, so one ``.npz`` never mixes checkpoints.

    ahpa sample --ckpt RUN/checkpoints/0400000 --out OUT --mode sde --cfg-scale 1.8 --guidance-high 0.7
    ahpa sample --ckpt T2I_RUN/checkpoints/0150000 --out OUT --prompts coco-val --coco COCO --mode sde --cfg-scale 2
    accelerate launch -m ahpa.cli sample ...   # several GPUs, the same .npz
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

import ahpa.priors.vae as vaes  # by module: tests replace vaes.load_vae
from ahpa import preemption
from ahpa.errors import AhpaError
from ahpa.generate.conditions import ClassCondition, Condition, PromptCondition, read_prompts
from ahpa.generate.engine import (
    assembly_bytes,
    check_sampler_arguments,
    check_speed_levers,
    generate_samples,
    lock_sample_dir,
    vae_decoder,
)
from ahpa.io import check_output_dir
from ahpa.priors.text import CLIP_L14, load_clip_text_encoder
from ahpa.runs import is_text_to_image, load_backbone
from ahpa.sampling_speed import PRECISIONS

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of the published SiT / REPA checkpoints
DEFAULT_NUM = 50_000  # ADM's protocol (docs/design.md section 7)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="draw samples from a checkpoint into an ADM .npz",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="a run directory (its newest checkpoint), RUN/checkpoints/<step>/, its ema.safetensors, or a published SiT/REPA .pt")
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


def _check_flags(args: argparse.Namespace, text: bool) -> None:
    """Flags that do not fit this kind of checkpoint, before anything is loaded or written."""
    if args.num is not None and args.num < 1:
        raise AhpaError(f"--num must be at least 1 (got {args.num})")
    if text:
        check_speed_levers(PromptCondition, args.precision, args.compile)
        if not args.prompts:
            raise AhpaError("an MMDiT checkpoint samples from prompts: pass --prompts coco-val|coco-random (with --coco) or a prompt file")
        if args.num_classes is not None or args.model is not None:
            raise AhpaError("--num-classes and --model are for class-conditional checkpoints; an MMDiT samples from --prompts")
    else:
        if args.prompts or args.coco or args.text_encoder:
            raise AhpaError(f"--prompts/--coco/--text-encoder are for text-to-image (MMDiT) checkpoints; {args.ckpt} is a class-conditional model")
        if args.num_classes is not None:
            ClassCondition(args.num_classes)  # refuses fewer than one class


def image_side(vae: nn.Module, meta: dict) -> int:
    """Side of the decoded images: the latent side times the VAE's downsampling (SD-VAE's 8 for a decoder
    without a diffusers config)."""
    config = getattr(vae, "config", None)
    return meta["input_size"] * (vaes.vae_downsample_factor(vae) if config is not None and hasattr(config, "block_out_channels") else 8)


def sampling_vae(requested: str | None, meta: dict, where) -> str:
    """The VAE that decodes: the one the weights file names (build.weights_meta), else ``--vae``, else SD-VAE.

    A ``--vae`` that contradicts the file's VAE is refused in one line naming both (the latents would be decoded
    by another VAE than they were trained in); one with the same weights (sha256) under another name is fine.
    Files written before ahpa recorded the VAE's identity (no ``vae_sha256``/``latent_norm``) take ``--vae`` as before."""
    recorded = meta.get("vae")
    if requested is None or recorded is None or str(requested) == str(recorded) or "latent_norm" not in meta:
        return requested or recorded or DEFAULT_VAE
    want = meta.get("vae_sha256")
    if want is not None and vaes.vae_weights_sha256(requested) == want:
        return requested
    raise AhpaError(f"--vae {requested} contradicts the VAE {where} was trained with: {recorded}"
                    + (f" (weights sha256 {want[:12]}...)" if want else "")
                    + "; drop --vae (the weights file names its VAE) or pass that one")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState  # lazy: accelerate takes a second to import; only sampling needs it

    text = is_text_to_image(args.ckpt)
    _check_flags(args, text)
    prompts = read_prompts(args.prompts, args.coco, args.num, args.seed) if text else None  # --num None: all prompts
    num = len(prompts) if text else (DEFAULT_NUM if args.num is None else args.num)
    kwargs = dict(mode=args.mode, method=args.method, steps=args.steps, cfg_scale=args.cfg_scale,
                  guidance_interval=(args.guidance_low, args.guidance_high))
    check_sampler_arguments(num, args.batch, kwargs, args.seed)
    check_output_dir(args.out, "--out")
    # cpu=True: several CPU processes use gloo; a long timeout: on resume one rank may wait long at the barrier
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=6))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    model, meta = load_backbone(args.ckpt, model_name=args.model, num_classes=args.num_classes)
    condition: Condition
    if text:
        encoder = load_clip_text_encoder(args.text_encoder or meta.get("text_encoder", CLIP_L14), device=state.device)
        condition = PromptCondition(prompts, encoder, meta["context_tokens"])
    else:
        condition = ClassCondition(args.num_classes or meta["num_classes"])
    condition.check_guidance(model, args.cfg_scale, args.ckpt)
    model = model.to(state.device).eval()
    meta = dict(meta, vae=sampling_vae(args.vae, meta, args.ckpt))  # recorded in sampling.json
    if args.time_convention != "auto":
        meta["time_convention"] = args.time_convention
    vae = vaes.load_vae(meta["vae"], device=state.device)
    kwargs["path"] = args.path or meta.get("path", "linear")
    out = Path(args.out)
    lock = lock_sample_dir(out, state, need_bytes=assembly_bytes(out, num, image_side(vae, meta), args.png))
    try:
        with preemption.handlers():  # SIGTERM/SIGUSR1: stop between batches, keep the parts, exit 75
            if state.is_main_process:
                source = f" ({args.prompts})" if text else ""
                print(f"sampling {num} images{source} from {meta['model']} on {state.num_processes} process(es): {kwargs}")
            path = generate_samples(model, meta, vae_decoder(vae), out, num, args.batch, kwargs, seed=args.seed,
                                    rank=state.process_index, world=state.num_processes, write_png=args.png,
                                    condition=condition, barrier=state.wait_for_everyone, precision=args.precision,
                                    compile=args.compile)
    finally:
        if lock is not None:
            lock.release()
    if state.is_main_process:
        print(f"wrote {path}")
    return 0
