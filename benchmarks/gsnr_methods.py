"""Per-sample gradient methods for G-SNR, measured in one run (docs/design.md section 6; ahpa/probe/per_sample.py).

For one batch of n samples at one t, times ``grad_stats`` with the ghost-norm method,
torch.func vmap in chunks, and the loop of single-sample backward passes, over the
default parameter set (embedders + blocks 1..d).  Prints each method's time and
peak memory (CUDA: max_memory_allocated; CPU: the per-sample gradient bytes each
method holds at once, from the parameter count), the ratios to the loop, the
agreement of G-SNR between methods, and the cost of one ``train.gsnr_every``
estimate in training steps (forward + backward + AdamW of the same batch).

    python benchmarks/gsnr_methods.py                              # SiT-T/2 toy shapes, n 16
    python benchmarks/gsnr_methods.py --model SiT-B/2 --n 8 --skip loop
    python benchmarks/gsnr_methods.py --model SiT-B/2 --n 64 --chunk 16    # on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from ahpa.align.objective import AlignmentObjective
from ahpa.probe.gsnr import AlignmentProbe, select_parameters, training_gsnr
from ahpa.probe.per_sample import grad_stats
from ahpa.models.sit import build_sit
from ahpa.transport import Transport


def parse_groups(text: str) -> dict[str, tuple[int, int]]:
    out = {}
    for item in text.split(","):
        name, shape = item.split(":")
        L, C = shape.lower().split("x")
        out[name] = (int(L), int(C))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SiT-T/2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--groups", default=None, help="default: tiny-VAE G3:2x64,G4:6x64 for SiT-T, SD-VAE G3:4x512,G4:4x512 otherwise")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip (loop is slow on big models)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.model.startswith("SiT-T")
    size = 8 if tiny else 32
    groups = parse_groups(args.groups or ("G3:2x64,G4:6x64" if tiny else "G3:4x512,G4:4x512"))
    torch.manual_seed(0)
    sit = build_sit(args.model, input_size=size, num_classes=10 if tiny else 1000)
    with torch.no_grad():  # trained-like weights: adaLN-Zero / zero output would give zero gradients
        for name, p in sit.named_parameters():
            if name != "pos_embed" and p.requires_grad:
                p.normal_(0, 0.02)
    obj = AlignmentObjective(sit.hidden_size, sit.grid, groups, [sit.default_alignment_depth])
    sit, obj = sit.to(dev), obj.to(dev)
    probe = AlignmentProbe(sit, obj, Transport())
    n = args.n
    g = torch.Generator(device=dev).manual_seed(0)
    batch = {"x0": torch.randn(n, 4, size, size, generator=g, device=dev), "y": torch.randint(0, 10, (n,), generator=g, device=dev),
             "t": torch.full((n,), 0.3, device=dev), "eps": torch.randn(n, 4, size, size, generator=g, device=dev),
             "drop": torch.zeros(n, dtype=torch.bool, device=dev),
             "features": {k: torch.randn(n, L, C, sit.grid, sit.grid, generator=g, device=dev) for k, (L, C) in groups.items()}}
    params = select_parameters(probe, "upstream")
    count = sum(p.numel() for p in params.values())
    print(f"{args.model}, n={n}, alignment depth {sit.default_alignment_depth}, upstream parameters {count / 1e6:.2f}M "
          f"({count * 4 / 1e6:.0f} MB per fp32 per-sample gradient), device {dev}")
    results = {}
    skip = set(args.skip.split(","))
    for method in ("ghost", "vmap", "loop"):
        if method in skip:
            continue
        grad_stats(probe, params, {k: (v[:2] if torch.is_tensor(v) else {a: b[:2] for a, b in v.items()}) for k, v in batch.items()},
                   method=method, chunk_size=args.chunk)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        stats = grad_stats(probe, params, batch, method=method, chunk_size=args.chunk)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        held = {"ghost": 1, "vmap": min(args.chunk, n), "loop": 1}[method] * count * 4  # per-sample gradient bytes at once
        mem = torch.cuda.max_memory_allocated() if dev.type == "cuda" else held
        results[method] = (seconds, mem, stats.gsnr)
        print(f"{method:>6}: {seconds:8.3f} s  {'peak' if dev.type == 'cuda' else 'per-sample grads held'} {mem / 2**20:9.1f} MiB  G-SNR {stats.gsnr:.6g}")
    base = results.get("loop") or results.get("vmap")
    for method, (s, m, gs) in results.items():
        print(f"ratio {method}/{'loop' if 'loop' in results else 'vmap'}: time {s / base[0]:.3f}, memory {m / base[1]:.3f}, "
              f"G-SNR rel. diff {abs(gs - base[2]) / abs(base[2]):.2e}")

    # one train.gsnr_every estimate (3 t values) in units of one training step of the same batch
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sit, self.objective, self.transport = sit, obj, Transport()

    module = Module()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = module.transport.training_losses(sit, batch["x0"], batch["y"], hidden_depths=tuple(obj.depths), t=batch["t"],
                                               eps=batch["eps"], model_kwargs={"force_drop_ids": batch["drop"]})
        loss = out["loss"] + obj(out["hidden"], batch["features"], batch["t"])[0]
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, reps=3):
        fn()
        best = float("inf")
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    t_step = timed(step)
    t_est = timed(lambda: training_gsnr(module, batch["x0"], batch, 0, 0, n=n))
    ratio = t_est / t_step
    print(f"train.gsnr_every: one estimate = {ratio:.2f} training steps; overhead {100 * ratio / 100:.2f}% at gsnr_every=100, "
          f"{100 * ratio / 1000:.3f}% at 1000; <= 5% needs gsnr_every >= {ratio / 0.05:.0f}")


if __name__ == "__main__":
    main()
