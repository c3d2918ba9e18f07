"""The on-the-fly encoder (``data.source=images`` / ``repa``) against one SiT training step, measured in one run.

For SD-VAE's architecture (randomly initialised: the cost does not depend on the weights) or the tiny VAE:

1. FLOPs per image of the prior's one encoder pass (``FlopCounterMode`` on the ``meta`` device, the hooks and
   pooling included) and of one training step of the SiT (``ahpa.diagnostics.profile.count_costs``: forward +
   backward, the project's cost profile), and their ratio.
2. Seconds per image of the encoder pass in each variant of ``data.encoder_dtype`` / ``encoder_memory_format`` /
   ``encoder_compile`` (float32; bfloat16; bfloat16 + channels-last; ``--compile`` adds compiled variants), and
   of the real training step (``ahpa.diagnostics.profile_speed.StepRunner``: forward, backward, clipping, AdamW,
   EMA, the trainer's mixed precision), each the median over ``--iters`` timed repetitions after ``--warmup``.
   Ratios: encoder seconds / step seconds per image (the share the on-the-fly features add to a step), and each
   variant's speed-up over float32.

    python benchmarks/encoder_cost.py                                  # CUDA: SiT-XL/2, 256 px, batch 32
    OMP_NUM_THREADS=2 python benchmarks/encoder_cost.py --model SiT-S/2 --batch 2 --iters 2   # CPU
    python benchmarks/encoder_cost.py --vae tiny --model SiT-T/2 --resolution 32 --batch 2 --iters 1 --warmup 1  # seconds

Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

from ahpa.config import PRESETS
from ahpa.diagnostics.profile import count_costs, load_method
from ahpa.diagnostics.profile_speed import StepRunner
from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior
from ahpa.priors.vae import TINY_VAE_DIR, load_vae

VARIANTS = {  # name -> HierarchicalVAEPrior options (the values data.encoder_* resolve to)
    "float32": {"precision": "float32"},
    "bfloat16": {"precision": "bfloat16"},
    "bfloat16_channels_last": {"precision": "bfloat16", "channels_last": True},
}


def make_vae(kind: str, device) -> AutoencoderKL:
    if kind == "tiny":
        return load_vae("tiny", device=device)
    torch.manual_seed(0)
    return AutoencoderKL(**SD_VAE_CONFIG).requires_grad_(False).eval().to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="SiT-XL/2" if cuda else "SiT-S/2", help="SiT whose training step is the reference")
    p.add_argument("--method", default=str(PRESETS / "sit-xl2-ahpa.yaml"), help="config of the step (the model is overridden)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32 if cuda else 2)
    p.add_argument("--vae", choices=("sd", "tiny"), default="sd", help="SD-VAE's architecture (random init) or the tiny VAE")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the compiled variants (data.encoder_compile=true)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    vae_path = str(TINY_VAE_DIR) if args.vae == "tiny" else "stabilityai/sd-vae-ft-ema"
    method = load_method(args.method, args.model, args.resolution, [f"vae.path={vae_path}"])
    grid = method.latent_shape[1] // int(args.model.rsplit("/", 1)[1])
    groups = tuple(g for g in method.group_shapes if g.startswith("G")) or ("G3", "G4")

    # 1. FLOPs per image, shapes only
    with torch.device("meta"):
        meta_prior = HierarchicalVAEPrior(make_vae(args.vae, "meta"), groups=groups, grid=grid)
    with FlopCounterMode(display=False) as counter:
        meta_prior.walk(torch.empty(1, 3, args.resolution, args.resolution, device="meta"))
    encoder_gflops = counter.get_total_flops() / 1e9
    step_gflops = count_costs(method, args.resolution)["flopcounter_fwd_bwd_gflops"]

    # 2. Seconds per image, in the same run
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    variants = dict(VARIANTS)
    if args.compile:
        variants.update({f"{k}_compiled": {**v, "compile": True} for k, v in VARIANTS.items()})
    if device.type == "cpu":
        variants.pop("bfloat16_channels_last", None)  # channels-last is the CUDA setting of data.encoder_memory_format=auto
    encoder_s = {}
    for name, options in variants.items():
        prior = HierarchicalVAEPrior(make_vae(args.vae, device), groups=groups, grid=grid, **options)
        encoder_s[name] = timed(lambda prior=prior: prior(images), device, args.warmup, args.iters) / args.batch
    runner = StepRunner(method, args.batch, device, args.resolution)
    step_s = timed(runner.step, device, args.warmup, args.iters) / args.batch

    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model, "method": method.label, "resolution": args.resolution, "batch": args.batch, "vae": args.vae,
        "groups": list(groups), "encoder_gflops_per_image": encoder_gflops, "step_gflops_per_image": step_gflops,
        "encoder_over_step_flops": encoder_gflops / step_gflops,
        "step_s_per_image": step_s, "encoder_s_per_image": encoder_s,
        "encoder_over_step_time": {k: v / step_s for k, v in encoder_s.items()},
        "speedup_over_float32": {k: encoder_s["float32"] / v for k, v in encoder_s.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
