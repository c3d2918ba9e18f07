"""256 vs 512 px: encoder FLOPs and CPU seconds per image, cache bytes, and the on-the-fly cost
against the training step (one run).

Features from the cache (``data.source=cache``, the default) against features computed every
step from the images (``data.source=images``): the on-the-fly path runs SD-VAE's encoder, with
the hooks of ``ahpa.priors.hierarchy.HierarchicalVAEPrior``, on every image of every step.

1. Encoder FLOPs per image (``torch.utils.flop_counter``, the prior's pass: encoder, hooks,
   pooling) of SD-VAE's real architecture (random init; the cost does not depend on the weights),
   and the SiT training FLOPs per image (3 x forward, vanilla SiT) at the same resolution:
   their ratio is the extra compute the on-the-fly path adds to a step.
2. Seconds per image of that pass on this device (CPU time of this process on the CPU, run with
   one thread; synchronised wall time on CUDA), after one warm-up pass at 256 px.
3. Cache bytes per image (float16 G3+G4 and latent moments) and for ImageNet-1k's 1,281,167
   images; cached reads cost ~1 ms per image on one CPU core (``benchmarks/cache_throughput.py``).

    OMP_NUM_THREADS=1 python benchmarks/resolution_cost.py            # CPU: about 1 minute of CPU time
    python benchmarks/resolution_cost.py --batch 32 --bf16             # CUDA

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

from ahpa.data.cache import bytes_per_image
from ahpa.models.sit import build_sit
from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior

IMAGENET = 1_281_167


def flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--model", default="SiT-XL/2", help="SiT whose training FLOPs the encoder is compared with")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the timed pass (CUDA)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG).requires_grad_(False).eval().to(device)
    with torch.device("meta"):  # FLOPs are counted on shapes only
        meta_vae = AutoencoderKL(**SD_VAE_CONFIG).requires_grad_(False).eval()
    result = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads, CPU time)",
              "batch": args.batch, "bf16": args.bf16, "model": args.model, "resolutions": {}}
    warm = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=16)
    with amp:
        warm(torch.zeros(1, 3, 256, 256, device=device))
    for res in (int(r) for r in args.resolutions.split(",")):
        latent = res // 8
        with torch.device("meta"):
            sit = build_sit(args.model, input_size=latent)
        grid = sit.grid
        prior = HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=grid)
        meta_prior = HierarchicalVAEPrior(meta_vae, groups=("G3", "G4"), grid=grid)
        encoder_flops = flops(lambda: meta_prior(torch.empty(1, 3, res, res, device="meta")))
        one = torch.rand(1, 3, res, res, device=device) * 2 - 1
        m = torch.empty(1, 4, latent, latent, device="meta")
        sit_train_flops = 3 * flops(lambda: sit(m, torch.empty(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")))
        images = one.expand(args.batch, -1, -1, -1).contiguous()
        with amp:
            sync()
            t0 = clock()
            prior(images)
            sync()
            seconds = (clock() - t0) / args.batch
        cached = bytes_per_image("float16", prior.group_shapes, grid, (4, latent, latent))
        result["resolutions"][str(res)] = {
            "latent": [4, latent, latent], "token_grid": grid, "group_shapes": prior.group_shapes,
            "encoder_gflops_per_image": encoder_flops / 1e9, "sit_train_gflops_per_image": sit_train_flops / 1e9,
            "encoder_over_sit_train_flops": encoder_flops / sit_train_flops,
            "encoder_s_per_image": seconds, "encoder_images_per_s": 1 / seconds,
            "cache_mib_per_image": cached / 2**20, "cache_tib_imagenet": cached * IMAGENET / 2**40,
            "on_the_fly_encoder_hours_per_epoch_here": seconds * IMAGENET / 3600,
        }
    r = result["resolutions"]
    if "256" in r and "512" in r:
        result["flops_512_over_256"] = r["512"]["encoder_gflops_per_image"] / r["256"]["encoder_gflops_per_image"]
        result["seconds_512_over_256"] = r["512"]["encoder_s_per_image"] / r["256"]["encoder_s_per_image"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
