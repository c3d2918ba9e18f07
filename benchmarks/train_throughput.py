"""Training throughput and model-FLOPs utilisation (MFU) of vanilla SiT and SiT + AHPA, one run.

MFU = achieved model FLOPs / the card's dense bf16 peak.  Model FLOPs per image =
3 x (forward FLOPs of the vanilla SiT) = 3 x 2 x forward MACs (the DiT/SiT convention;
AHPA's extra FLOPs are not counted as model FLOPs, so its MFU shows its overhead).  The
forward FLOPs are counted by ``torch.utils.flop_counter``.  A step is the whole training step
of ``ahpa.train``: the TrainingModule forward (optionally compiled), backward, gradient
clipping and AdamW (fused on CUDA), with cached-feature tensors already on the device.

    python benchmarks/train_throughput.py --model SiT-XL/2 --batch 256 --compile     # one H100/H200
    python benchmarks/train_throughput.py --model SiT-T/2 --input-size 8 --batch 8    # CPU smoke run

Prints one JSON object: per method step time, images/s, MFU, and the ratio AHPA / vanilla.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from ahpa.align.objective import AlignmentObjective
from ahpa.models.sit import build_sit
from ahpa.training_module import TrainingModule
from ahpa.transport import Transport

# Dense bf16 tensor-core peak, TFLOPS (vendor data sheets; SXM parts unless named).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIE": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key.lower() in name.lower():
            return name, value
    return name, None


def forward_flops(model, x, t, y) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method, args, device):
    torch.manual_seed(0)
    sit = build_sit(args.model, input_size=args.input_size, num_classes=1000).to(device)
    objective = None
    if method == "ahpa":
        groups = {"G3": (4, 512), "G4": (4, 512)}
        objective = AlignmentObjective(sit.hidden_size, sit.grid, groups, depths=[sit.default_alignment_depth]).to(device)
    sit.activation_checkpointing = args.activation_checkpointing
    module = TrainingModule(sit, objective, Transport()).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(module, fullgraph=True) if args.compile else module
    return module, forward, opt, params


def inputs(method, module, args, device):
    B, s = args.batch, args.input_size
    g = torch.Generator(device=device).manual_seed(1)
    feats = None
    if method == "ahpa":
        grid = module.sit.grid
        feats = {k: torch.randn(B, 4, 512, grid, grid, device=device, generator=g) for k in ("G3", "G4")}
    return (torch.randn(B, 4, s, s, device=device, generator=g), torch.randint(0, 1000, (B,), device=device, generator=g),
            torch.rand(B, device=device, generator=g), torch.randn(B, 4, s, s, device=device, generator=g),
            torch.rand(B, device=device, generator=g) < 0.1, feats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px, 64 = 512 px)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--methods", default="vanilla,ahpa")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    card, peak = peak_tflops(device)
    result = {"device": card, "peak_bf16_tflops": peak, "model": args.model, "batch": args.batch,
              "input_size": args.input_size, "compile": args.compile, "methods": {}}
    model_flops = None
    for method in args.methods.split(","):
        module, forward, opt, params = build(method, args, device)
        batch = inputs(method, module, args, device)
        if model_flops is None:
            with amp:
                model_flops = 3 * forward_flops(module.sit, batch[0][:1], batch[2][:1], batch[1][:1])
        times = []
        for i in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            with amp:
                loss, _, _ = forward(*batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        rate = args.batch / step
        result["methods"][method] = {"step_s": step, "images_per_s": rate,
                                     "mfu": rate * model_flops / (peak * 1e12) if peak else None,
                                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        del module, forward, opt, params, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    result["model_flops_per_image"] = model_flops
    m = result["methods"]
    if "vanilla" in m and "ahpa" in m:
        result["ahpa_over_vanilla_step_time"] = m["ahpa"]["step_s"] / m["vanilla"]["step_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
