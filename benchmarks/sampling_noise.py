"""Share of SDE sampling time spent on the counter-based step noise, and images/s (one run).

    python benchmarks/sampling_noise.py                                   # CPU: SiT-S/2, batch 8, 10 steps
    python benchmarks/sampling_noise.py --model SiT-XL/2 --batch 64 --steps 50 --cfg-scale 1.8 --bf16 --compile  # GPU

Times ``ahpa.sampling.sample`` (SDE, Euler-Maruyama) after one untimed warm-up call (first-call
costs such as lazy imports are excluded: a 50K-sample run pays them once), with the noise calls
(``ahpa.counter_rng.counter_normal``, each drawing a block of steps) timed separately: CPU time of
this process on the CPU (robust to other load; run it with one thread), wall time synchronised on
CUDA.  Also counts the non-view ATen ops the noise dispatches per step (a device-independent
proxy for GPU kernel launches), for the sampler's blocks of steps and for one step per call.
``--bf16`` and ``--compile`` are ``ahpa sample --precision bf16`` and ``--compile``
(:mod:`ahpa.sampling_speed`).  ``hours_50k_250_steps_one_device`` scales the measured time per
model step to ADM's 50K samples at the paper's 250 SDE steps.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ahpa.counter_rng as counter_rng
from ahpa.models.sit import build_sit
from ahpa.sampling import noise_for_indices, sample, sde_seeds
from ahpa.sampling_speed import speed_wrapped


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def noise_ops_per_step(keys, shape, steps: int, max_elements: int | None) -> float:
    noise = counter_rng.StepNoise(keys, shape, steps, max_elements=max_elements)
    with _CountOps() as counter:
        for s in range(steps):
            noise(s)
    return counter.ops / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-S/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the model forwards (default: on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; the warm-up compiles)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    bf16 = cuda if args.bf16 is None else args.bf16
    model = build_sit(args.model, input_size=args.input_size).to(device).eval()
    forward = speed_wrapped(model, "bf16" if bf16 else "float32", args.compile)
    spent = []
    original = counter_rng.counter_normal

    def timed(*a, **k):
        sync()
        t0 = clock()
        out = original(*a, **k)
        sync()
        spent.append(clock() - t0)
        return out

    idx = list(range(args.batch))
    shape = (4, args.input_size, args.input_size)
    noise = noise_for_indices(idx, 0, shape, device)
    y = torch.tensor(idx, device=device) % 1000
    run = lambda steps: sample(forward, y, noise, mode="sde", steps=steps, cfg_scale=args.cfg_scale,  # noqa: E731
                               seeds=sde_seeds(idx, 0))
    run(2)  # warm-up (guidance covers all t here, so one input shape: a compile happens here): imports, allocator
    counter_rng.counter_normal = timed
    try:
        sync()
        t0 = clock()
        run(args.steps)
        sync()
        total = clock() - t0
    finally:
        counter_rng.counter_normal = original
    keys = counter_rng.seed_keys(sde_seeds(idx, 0), device)
    stochastic = args.steps - 1
    result = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads, CPU time)",
              "model": args.model, "batch": args.batch, "input_size": args.input_size, "steps": args.steps,
              "cfg_scale": args.cfg_scale, "bf16": bf16, "compile": args.compile, "noise_share": sum(spent) / total,
              "noise_s_per_stochastic_step": sum(spent) / max(1, stochastic), "noise_calls": len(spent),
              "sampling_s": total, "images_per_s": args.batch / total,
              "hours_50k_250_steps_one_device": 50_000 / args.batch * total / args.steps * 250 / 3600,
              "noise_ops_per_step": noise_ops_per_step(keys, shape, stochastic, None) if stochastic else 0.0,
              "noise_ops_per_step_one_step_per_call": noise_ops_per_step(keys, shape, 1, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
