"""Training cost of AHPA over vanilla SiT, with precomputed features (paper Table 6, App. I).

Both runs use the same SiT architecture, batch and optimizer (AdamW); AHPA adds
the hidden state at the alignment block, the router, the projection head and
the cosine loss.  Features are random tensors of the cached shapes, already on
the device (as after loading a batch from the feature cache).  Prints, from one
run: the median training-step time (forward + backward + AdamW step, the two
methods alternating after a warm-up), the peak-memory ratio (CUDA only), the
training FLOPs ratio (forward + backward, ``torch.utils.flop_counter``) and the
added parameters.  The last line is the step-time ratio AHPA / vanilla.  A third
method, AHPA whose router is trained by usefulness (``align.router_signal=usefulness``,
docs/design.md section 13: one more backward pass through the blocks above the
aligned one and one batched vector-Jacobian product through the head), alternates
with the two; its step-time ratio to AHPA's is printed before the last line.

    python benchmarks/alignment_overhead.py                          # toy: SiT-T/2, 4x8x8 latent, tiny-VAE groups
    python benchmarks/alignment_overhead.py --model SiT-B/2 --batch 8  # 256 px: 4x32x32 latent, SD-VAE G3+G4
    python benchmarks/alignment_overhead.py --model SiT-XL/2 --batch 32 --reps 20   # on a GPU

Group shapes default to those of the project's tiny VAE at grid 4 for SiT-T
models (G3 2x64, G4 6x64) and to SD-VAE's 4/4 split otherwise (G3 4x512, G4
4x512); ``--groups G3:4x512,G4:4x512`` sets them explicitly.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ahpa.align.objective import AlignmentObjective, extra_parameters
from ahpa.models.sit import build_sit
from ahpa.transport import Transport

TINY_VAE_GROUPS = "G3:2x64,G4:6x64"  # ahpa/data/tiny_vae.py encoder, 32 px images
SD_VAE_GROUPS = "G3:4x512,G4:4x512"  # docs/design.md section 2, split 4/4


def parse_groups(text: str) -> dict[str, tuple[int, int]]:
    """``"G3:4x512,G4:4x512"`` -> ``{"G3": (4, 512), "G4": (4, 512)}``."""
    shapes = {}
    for item in text.split(","):
        name, shape = item.split(":")
        layers, channels = shape.lower().split("x")
        shapes[name.strip()] = (int(layers), int(channels))
    return shapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters an optimizer trains and of its state (AdamW: two moments)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in params + state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SiT-T/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default 8 for SiT-T, else 32)")
    parser.add_argument("--groups", default=None, help="e.g. G3:4x512,G4:4x512 (default: see module docstring)")
    parser.add_argument("--depth", type=int, default=None, help="alignment block (default: the model's)")
    parser.add_argument("--router", default="dynamic")
    parser.add_argument("--head", default="conv3")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed steps of each method, alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a busy shared machine more threads make steps erratic)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (as train.mixed_precision=auto)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tiny = args.model.startswith("SiT-T")
    input_size = args.input_size or (8 if tiny else 32)
    group_shapes = parse_groups(args.groups or (TINY_VAE_GROUPS if tiny else SD_VAE_GROUPS))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    torch.manual_seed(0)
    sit = build_sit(args.model, input_size=input_size).to(device).train()
    depth = args.depth or sit.default_alignment_depth
    objective = AlignmentObjective(sit.hidden_size, sit.grid, group_shapes, [depth],
                                   router=args.router, head=args.head).to(device)
    useful = copy.deepcopy(objective)
    useful.router_signal, useful.router_entropy = "usefulness", 0.1  # as the toy-pc study runs it
    models = {"vanilla": sit, "ahpa": copy.deepcopy(sit), "useful": copy.deepcopy(sit)}
    objectives = {"ahpa": objective, "useful": useful}
    optimizers = {
        "vanilla": torch.optim.AdamW(models["vanilla"].parameters(), lr=1e-4, weight_decay=0.0),
        "ahpa": torch.optim.AdamW([*models["ahpa"].parameters(), *objective.parameters()], lr=1e-4, weight_decay=0.0),
        "useful": torch.optim.AdamW([*models["useful"].parameters(), *useful.parameters()], lr=1e-4, weight_decay=0.0),
    }
    transport = Transport()
    B, C = args.batch, sit.in_channels
    x0 = torch.randn(B, C, input_size, input_size, device=device)
    y = torch.randint(0, sit.num_classes, (B,), device=device)
    features = {g: torch.randn(B, L, Cg, sit.grid, sit.grid, device=device) for g, (L, Cg) in group_shapes.items()}

    def forward_backward(method: str) -> None:
        with autocast:
            if method == "vanilla":
                loss = transport.training_losses(models["vanilla"], x0, y)["loss"]
            else:
                out = transport.training_losses(models[method], x0, y, hidden_depths=(depth,))
                loss = out["loss"] + objectives[method](out["hidden"], features, out["t"], loss_diff=out["loss"])[0]
        loss.mean().backward()

    def step(method: str) -> None:
        forward_backward(method)
        optimizers[method].step()
        optimizers[method].zero_grad(set_to_none=True)

    def timed(fn: Callable[[], None]) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    methods = ("vanilla", "ahpa", "useful")
    flops = {}
    for m in methods:
        with FlopCounterMode(display=False) as counter:
            forward_backward(m)
        optimizers[m].zero_grad(set_to_none=True)
        flops[m] = counter.get_total_flops()

    peak: dict[str, float] = {}
    for m in methods:  # after the first step, so AdamW state is allocated for both
        step(m)
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(m)
            peak[m] = torch.cuda.max_memory_allocated() - base  # the step's activations, gradients, temporaries
    resident = {m: state_bytes(optimizers[m]) for m in methods}  # weights + AdamW moments
    for _ in range(args.warmup):
        for m in methods:
            step(m)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.reps):
        for m in methods:
            times[m].append(timed(lambda: step(m)))

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    n_sit = sum(p.numel() for p in sit.parameters())
    n_extra = extra_parameters(objective)
    print(f"device {name}, {args.model}, latent {C}x{input_size}x{input_size} (grid {sit.grid}), batch {B}, "
          f"groups {group_shapes}, block {depth}, router {args.router}, head {args.head}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.warmup} warm-up + {args.reps} alternating reps")
    median = {m: statistics.median(v) for m, v in times.items()}
    for m in methods:
        print(f"  {m:<8} step {median[m] * 1e3:9.1f} ms median (min {min(times[m]) * 1e3:.1f}, "
              f"max {max(times[m]) * 1e3:.1f}), {B / median[m]:8.2f} img/s, train GFLOPs/step {flops[m] / 1e9:10.2f}")
    print(f"  added parameters {n_extra:,} ({100 * n_extra / n_sit:.2f}% of {n_sit:,}; router "
          f"{sum(p.numel() for p in objective.router.parameters()):,}, heads {sum(p.numel() for p in objective.heads.parameters()):,})")
    print(f"  training FLOPs ratio ahpa / vanilla = {flops['ahpa'] / flops['vanilla']:.4f}")
    if peak:
        total = {m: peak[m] + resident[m] for m in methods}
        print(f"  peak memory ratio ahpa / vanilla = {total['ahpa'] / total['vanilla']:.4f} "
              f"({total['ahpa'] / 2**20:.0f} / {total['vanilla'] / 2**20:.0f} MiB: weights, AdamW state and the step's peak; "
              f"step peak alone {peak['ahpa'] / 2**20:.0f} / {peak['vanilla'] / 2**20:.0f} MiB)")
    else:
        print("  peak memory ratio: n/a on CPU (torch's CPU allocator keeps no peak statistics)")
    print(f"  fastest-step ratio ahpa / vanilla = {min(times['ahpa']) / min(times['vanilla']):.4f} (less sensitive to a busy machine)")
    print(f"  training FLOPs ratio usefulness / alignment router = {flops['useful'] / flops['ahpa']:.4f}")
    print(f"  step time ratio usefulness / alignment router = {median['useful'] / median['ahpa']:.4f} "
          f"(fastest-step ratio {min(times['useful']) / min(times['ahpa']):.4f})")
    print(f"step time ratio ahpa / vanilla = {median['ahpa'] / median['vanilla']:.4f}")


if __name__ == "__main__":
    main()
