"""Per-step cost of the non-finite guard (ahpa/nonfinite.py), as a ratio measured in one run.

A training step of ``train.py`` (SiT forward + diffusion loss, backward, grad-norm clip,
AdamW, EMA) is timed with the guard (check + masked update + masked EMA, as the loop
runs it) and without it (the loop before issue 9), alternating the two so that
machine load hits both alike; the ratio of the medians is printed.

    OMP_NUM_THREADS=2 python benchmarks/nonfinite_guard.py            # toy (SiT-T/2, 8x8 latents) and SiT-B/2 (32x32)
    python benchmarks/nonfinite_guard.py --models SiT-T/2 --steps 40

On the CPU the foreach AdamW path reads the flag on the host, which is free there (CPU
kernels are synchronous); on CUDA the fused AdamW path decides on the device.  With
``--fused`` the fused path is timed on the CPU too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from ahpa.models.sit import build_sit
from ahpa.nonfinite import NonFiniteGuard
from ahpa.training_module import update_ema
from ahpa.transport import Transport

SETTINGS = {"SiT-T/2": dict(input_size=8, batch=64, classes=10), "SiT-B/2": dict(input_size=32, batch=4, classes=1000)}


def bench(name: str, steps: int, fused: bool, grad_clip: float) -> dict:
    s = SETTINGS[name]
    torch.manual_seed(0)
    model = build_sit(name, input_size=s["input_size"], in_channels=4, num_classes=s["classes"])
    ema = build_sit(name, input_size=s["input_size"], in_channels=4, num_classes=s["classes"]).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    guard = NonFiniteGuard("cpu")
    transport = Transport()
    x0 = torch.randn(s["batch"], 4, s["input_size"], s["input_size"])
    y = torch.randint(0, s["classes"], (s["batch"],))

    def step(guarded: bool) -> float:
        start = time.perf_counter()
        loss = transport.training_losses(model, x0, y)["loss"].mean()
        loss.backward()
        if guarded:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
            found = guard.check(loss, norm)
            guard.step(opt, found)
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, 0.9999, keep=guard.keep(found))
        else:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, 0.9999)
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        step(True), step(False)
    plain, guarded = [], []
    for i in range(steps):
        order = (True, False) if i % 2 else (False, True)
        for g in order:
            (guarded if g else plain).append(step(g))
    return {
        "model": name, "batch": s["batch"], "latent": s["input_size"], "grad_clip": grad_clip, "fused": fused,
        "steps_each": steps, "plain_ms": round(1e3 * statistics.median(plain), 2),
        "guarded_ms": round(1e3 * statistics.median(guarded), 2),
        "ratio_guarded_over_plain": round(statistics.median(guarded) / statistics.median(plain), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--fused", action="store_true", help="fused AdamW (the CUDA path) on the CPU")
    parser.add_argument("--grad-clip", type=float, default=2.0, help="0: no clipping (the guard then computes the norm)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        print(json.dumps(bench(name, args.steps, args.fused, args.grad_clip)))


if __name__ == "__main__":
    main()
