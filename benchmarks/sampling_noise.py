"""Share of SDE sampling time spent on the counter-based step noise, and images/s (one run).

    python benchmarks/sampling_noise.py                                   # CPU: SiT-S/2, batch 8, 10 steps
    python benchmarks/sampling_noise.py --model SiT-XL/2 --batch 64 --steps 50 --cfg-scale 1.8   # GPU

Times ``ahpa.sampling.sample`` (SDE, Euler-Maruyama) with the per-step noise calls timed separately
(synchronised on CUDA); prints noise time / total sampling time, and images/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ahpa.sampling as sampling
from ahpa.models.sit import build_sit
from ahpa.sampling import noise_for_indices, sample, sde_seeds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SiT-S/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_sit(args.model, input_size=args.input_size).to(device).eval()
    spent = []
    original = sampling.counter_normal

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = original(*a, **k)
        sync()
        spent.append(time.perf_counter() - t0)
        return out

    sampling.counter_normal = timed
    idx = list(range(args.batch))
    noise = noise_for_indices(idx, 0, (4, args.input_size, args.input_size), device)
    y = torch.tensor(idx, device=device) % 1000
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        sync()
        t0 = time.perf_counter()
        sample(model, y, noise, mode="sde", steps=args.steps, cfg_scale=args.cfg_scale, seeds=sde_seeds(idx, 0))
        sync()
        total = time.perf_counter() - t0
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": args.model,
              "batch": args.batch, "steps": args.steps, "noise_share": sum(spent) / total,
              "images_per_s": args.batch / total}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
