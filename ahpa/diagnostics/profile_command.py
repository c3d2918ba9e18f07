"""``ahpa profile`` (paper Table 6): the command and its table; counts from :mod:`ahpa.diagnostics.profile`,
steps per second from :mod:`ahpa.diagnostics.profile_speed`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ahpa.diagnostics.profile import count_costs, load_method
from ahpa.diagnostics.profile_speed import autocast_dtype, available_bytes, measure_speed, persistent_bytes
from ahpa.errors import AhpaError
from ahpa.io import write_json_atomic


# ---------------------------------------------------------------------- report
def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _delta(value: float, base: float) -> str:
    return "" if base == 0 or value == base else f" ({100 * (value / base - 1):+.0f}%)"


def format_table(result: dict) -> str:
    methods = result["methods"]
    base = methods[0]
    head = ["method", "backbone", "extra", "teacher", "GFLOPs (DiT)", "+attn", "fwd+bwd (FlopCounter)",
            "it/s", "ms/it", "peak mem"]
    rows = [head]
    for m in methods:
        timed = "iters_per_s" in m
        peak = m.get("peak_memory_bytes")
        rows.append([
            m["method"], _fmt_params(m["backbone_params"]), _fmt_params(m["extra_trainable_params"]),
            _fmt_params(m["teacher_params"]) if m["teacher_params"] else "-",
            f"{m['gflops_dit']:.2f}{_delta(m['gflops_dit'], base['gflops_dit'])}",
            f"{m['gflops_dit_with_attention']:.2f}",
            f"{m['flopcounter_fwd_bwd_gflops']:.1f}",
            f"{m['iters_per_s']:.3g}{_delta(m['iters_per_s'], base['iters_per_s'])}" if timed else "-",
            f"{m['ms_per_iter']:.1f}" if timed else "-",
            f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{m['method']}: teacher {m['teacher_model']} (the cost does not depend on the weights)"
              for m in methods if m.get("teacher_model")]
    note = (f"{result['model']} at {result['resolution']} px on {result['device']}; GFLOPs per image (DiT: forward "
            "MACs of linear+conv, attention matmuls excluded, teacher included, VAE excluded; FlopCounter: 2 x MACs, "
            "SDPA included, forward+backward)")
    if result.get("timing"):
        t = result["timing"]
        note += (f"; speed at global batch {t['batch']} ({t['precision']}), median of {t['rounds']} rounds x "
                 f"{t['iters']} iterations after {t['warmup']} warm-up, {t['order']}")
    return "\n".join(lines + [note])


def run_profile(args: argparse.Namespace) -> int:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise AhpaError("--methods is empty; pass e.g. --methods vanilla,ahpa")
    for key in ("batch", "rounds", "iters"):
        if getattr(args, key) < 1:
            raise AhpaError(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise AhpaError(f"--warmup must be non-negative, got {args.warmup}")
    if args.out and Path(args.out).is_dir():
        raise AhpaError(f"--out {args.out} is a directory; pass a file name such as profile.json")
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AhpaError(f"--device {args.device} but CUDA is not available here; drop --device or pass --device cpu")
    methods = [load_method(name, args.model, args.resolution, args.overrides) for name in names]
    seen: dict[str, int] = {}
    for m in methods:  # "vanilla,vanilla" is an A/A check of the timing noise
        seen[m.label] = seen.get(m.label, 0) + 1
        if seen[m.label] > 1:
            m.label = f"{m.label}#{seen[m.label]}"
    for m in methods:
        m.info = {"method": m.label, "config": m.config, "teacher": m.teacher, **count_costs(m, args.resolution)}
    if not args.counts_only:
        need = [persistent_bytes(m.info) for m in methods]
        free = available_bytes(device)
        total = max(need) if args.sequential else sum(need)
        if free is not None and total > 0.9 * free:
            raise AhpaError(f"the weights, gradients, AdamW moments and EMA of {'one method' if args.sequential else 'all methods at once'} "
                            f"need about {total / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are free on {device}; "
                            + ("profile fewer or smaller methods" if args.sequential else
                               "pass --sequential (methods timed one after another, not alternated) or fewer methods"))
        if device.type == "cuda" and methods[0].cfg.train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        measure_speed(methods, batch=args.batch, device=device, resolution=args.resolution, warmup=args.warmup,
                      rounds=args.rounds, iters=args.iters, sequential=args.sequential)
    result = {
        "model": args.model, "resolution": args.resolution,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "counts": "per image (batch 1), on the meta device",
        "timing": None if args.counts_only else {
            "batch": args.batch, "warmup": args.warmup, "rounds": args.rounds, "iters": args.iters,
            "order": "sequential" if args.sequential else "alternating",
            "precision": str(autocast_dtype(methods[0].cfg, device) or "fp32").replace("torch.", ""),
            "step": "TrainingModule forward + backward + grad clip + AdamW + EMA (teacher forward included)",
        },
        "methods": [m.info for m in methods],
    }
    print(format_table(result))
    if args.out:
        write_json_atomic(args.out, result, indent=2)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="training cost per method: parameters, GFLOPs, it/s, memory (Table 6)")
    p.add_argument("--model", default="SiT-XL/2", help="backbone, e.g. SiT-XL/2 (default), SiT-B/2")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--methods", default="vanilla,ahpa",
                   help="comma-separated: vanilla, ahpa, repa, sra2 (configs/sit-{b2,l2,xl2}-METHOD.yaml) or config YAML paths")
    p.add_argument("--batch", type=int, default=32, help="global batch of the timed step on this device (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per method first (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds, alternating between methods (default 5)")
    p.add_argument("--iters", type=int, default=10, help="iterations per method per round (default 10)")
    p.add_argument("--sequential", action="store_true", help="time methods one after another (one in memory at a time)")
    p.add_argument("--counts-only", action="store_true", help="parameters and GFLOPs only, no timing")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every method's config")
    p.set_defaults(func=run_profile)
