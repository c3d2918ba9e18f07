"""MMDiT (text-to-image, App. C) training-step time and parameter count, beside SiT of the same size.

One run times, alternating after a warm-up, the median of a full training step (forward at the
alignment depth, flow-matching loss + a cosine loss on the hidden tokens, backward, AdamW step)
of an MMDiT and of the SiT of the same registry size, at the same batch and latent size.  The MMDiT
reads a random text context of ``--tokens`` x ``--context-dim`` (CLIP: 77 x 768).  Prints the
parameter counts, both step times and their ratio.  ``--forward-only``: inference forward passes
(no grad, no optimizer) instead, for sizes whose AdamW state does not fit (MMDiT-B/2 on a laptop).

    python benchmarks/mmdit_step.py                                    # MMDiT-T/2 vs SiT-T/2, 4x8x8 latent, batch 8
    python benchmarks/mmdit_step.py --model B/2 --latent 32 --batch 1 --forward-only --reps 3
    python benchmarks/mmdit_step.py --model B/2 --latent 32 --batch 32 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ahpa.models.mmdit import build_mmdit
from ahpa.models.sit import build_sit, count_parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="T/2", help="registry size/patch, e.g. T/2, S/2, B/2")
    p.add_argument("--latent", type=int, default=8, help="latent side (toy 8; 256 px: 32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--context-dim", type=int, default=768)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--forward-only", action="store_true")
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    mmdit = build_mmdit(f"MMDiT-{args.model}", args.latent, context_tokens=args.tokens, context_dim=args.context_dim).to(dev)
    sit = build_sit(f"SiT-{args.model}", args.latent, num_classes=1000).to(dev)
    B, C, S = args.batch, 4, args.latent
    x, t = torch.randn(B, C, S, S, device=dev), torch.rand(B, device=dev)
    conds = {"MMDiT": torch.randn(B, args.tokens, args.context_dim, device=dev), "SiT": torch.randint(0, 1000, (B,), device=dev)}
    models = {"MMDiT": mmdit, "SiT": sit}
    depth = {k: m.default_alignment_depth for k, m in models.items()}
    opts = {} if args.forward_only else {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name: str) -> None:
        model, y = models[name], conds[name]
        if args.forward_only:
            with torch.no_grad():
                model.eval()(x, t, y)
            return
        v, hidden = model.train()(x, t, y, hidden_depths=(depth[name],), force_drop_ids=torch.zeros(B, device=dev))
        loss = F.mse_loss(v, x) - F.cosine_similarity(hidden[depth[name]], hidden[depth[name]].detach().roll(1, -1), dim=-1).mean()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # CPU: the process's CPU time (user + sys of this 1-process run ~ its wall time on an idle core; a busy machine
    # inflates wall time but not CPU time); CUDA: wall time after synchronising.
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    times = {k: [] for k in models}
    for name in models:  # warm-up
        step(name)
    for _ in range(args.reps):
        for name in models:
            sync()
            t0 = clock()
            step(name)
            sync()
            times[name].append(clock() - t0)
    what = ("forward (no grad)" if args.forward_only else "training step (fwd + bwd + AdamW)") + (" wall" if dev.type == "cuda" else " CPU time")
    for name, m in models.items():
        print(f"{m.name}: {count_parameters(m):,} parameters; median {what} {statistics.median(times[name]):.4f} s "
              f"(batch {B}, latent {C}x{S}x{S}{f', context {args.tokens}x{args.context_dim}' if name == 'MMDiT' else ''}, "
              f"{torch.get_num_threads()} threads on {dev})")
    print(f"ratio MMDiT / SiT: {statistics.median(times['MMDiT']) / statistics.median(times['SiT']):.2f}")


if __name__ == "__main__":
    main()
