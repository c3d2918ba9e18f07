"""``ahpa profile``: the training cost of each method (paper Table 6 / App. I, Table I.21).

For one backbone and a list of methods (``vanilla``, ``ahpa``, ``repa``, ``sra2``
or any config YAML), in one run on the current device:

- parameters: the backbone (DiT/SiT count, frozen ``pos_embed`` included), the
  extra trainable parameters of the objective (router + heads; 0 at inference)
  and the frozen teacher, if the method has one;
- GFLOPs per image in two conventions.  (a) DiT's (DiT issue #14, which AHPA's
  114.46 for SiT-XL/2 follows; ``docs/baselines.md``, "The cost table"):
  multiply-accumulates of the forward pass of every ``nn.Linear`` and
  ``nn.ConvNd``, attention score/value matmuls excluded (also reported with them:
  DiT's 118.6), teacher forward included, VAE excluded (the paper precomputes
  the VAE features).  (b) ``torch.utils.flop_counter.FlopCounterMode`` totals
  (2 FLOPs per MAC, SDPA included) of the forward + backward of one training step;
- speed at a global batch: ms per iteration and iterations/s of the real
  training step (``TrainingModule`` forward, backward, gradient clipping, AdamW,
  EMA update; the teacher forward when the method has one), measured in rounds
  that alternate between the methods (A B A B ...), median over rounds;
- peak memory per method on CUDA (``torch.cuda.max_memory_allocated``).

The counts run on the ``meta`` device: shapes only, no memory, so SiT-XL/2 is
counted on any machine.  There SDPA runs its math decomposition (two bmm per
attention), which FlopCounterMode counts; on CPU the fused kernel
``_scaled_dot_product_flash_attention_for_cpu`` has no entry in torch's FLOP
registry and would be missed.  Inputs are random tensors of the training
shapes (latents, prior features from the prior's own group shapes, uint8
images for a teacher): data loading is not part of the cost, as in Table 6.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ahpa.build import (
    build_backbone,
    build_objective,
    build_prior,
    build_transport,
    latent_geometry,
    target_shapes,
    teacher_name,
    vae_architecture,
    vae_groups,
)
from ahpa.config import PRESETS, TEACHER_GROUP, Config, load_config
from ahpa.errors import AhpaError
from ahpa.io import write_json_atomic
from ahpa.models.sit import SIT_CONFIGS
from ahpa.priors.dinov2 import DINOv2Teacher
from ahpa.priors.vae import vae_downsample_factor
from ahpa.step import TrainingModule, update_ema

METHOD_NAMES = ("vanilla", "ahpa", "repa", "sra2")
# FlopCounterMode ops that are attention matmuls (fused SDPA kernels, or bmm of the math path).
_ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")


# ---------------------------------------------------------------------- counting
def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call of a linear or conv layer, from its output shape (DiT convention)."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    # Conv: each output element is a dot product over C_in / groups x kernel.
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


class MacCounter:
    """Forward hooks on every ``nn.Linear`` / ``nn.ConvNd`` under each named root:
    ``counter.macs[name]`` sums their multiply-accumulates while the context is open."""

    LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, **roots: nn.Module | None):
        self.roots = {name: root for name, root in roots.items() if root is not None}
        self.macs = {name: 0 for name in self.roots}
        self._handles: list = []

    def __enter__(self) -> "MacCounter":
        for name, root in self.roots.items():
            for module in root.modules():
                if isinstance(module, self.LAYERS):
                    self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            self.macs[name] += layer_macs(module, output)
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attention_flops(counter: FlopCounterMode, module_name: str = "Global") -> int:
    """FLOPs of the attention matmuls FlopCounterMode saw inside ``module_name``."""
    counts = counter.get_flop_counts().get(module_name, {})
    return sum(int(v) for op, v in counts.items() if any(key in str(op) for key in _ATTENTION_OPS))


# ---------------------------------------------------------------------- methods
def model_tag(model: str) -> str:
    """``SiT-XL/2`` -> ``xl2``: the naming rule of ``configs/sit-{tag}-{method}.yaml``."""
    if not model.startswith("SiT-") or "/" not in model:
        raise AhpaError(f"unknown model '{model}'; pass a SiT registry name such as SiT-XL/2")
    size, patch = model[len("SiT-"):].split("/", 1)
    return f"{size.lower()}{patch}"


def method_config_path(method: str, model: str) -> Path:
    """A method name or a YAML path -> the config file (checked to exist)."""
    if method.endswith((".yaml", ".yml")) or "/" in method:
        path = Path(method)
        if not path.is_file():
            raise AhpaError(f"config file '{method}' does not exist; pass a method ({', '.join(METHOD_NAMES)}) or an existing YAML path")
        return path
    if method not in METHOD_NAMES:
        raise AhpaError(f"unknown method '{method}'; choose one of {', '.join(METHOD_NAMES)} or pass a config YAML path")
    path = PRESETS / f"sit-{model_tag(model)}-{method}.yaml"
    if not path.is_file():
        raise AhpaError(f"method '{method}' for {model} needs the config {path}, which does not exist; "
                        f"write it, or pass a config YAML path in --methods")
    return path


@dataclass
class Method:
    label: str
    config: str
    cfg: Config
    latent_shape: tuple[int, int, int]  # (C, h, w) of the diffusion input
    group_shapes: dict[str, tuple[int, int]]  # what build_objective receives (teacher group included)
    teacher: str | None  # DINOv2 hub name, or None
    info: dict = field(default_factory=dict)  # the results


def load_method(method: str, model: str, resolution: int, overrides: list[str]) -> Method:
    if model not in SIT_CONFIGS:
        raise AhpaError(f"unknown model '{model}'; valid names: {', '.join(SIT_CONFIGS)}")
    path = method_config_path(method, model)
    # The profiler feeds random tensors: the data section only has to validate (toy needs no path).
    cfg = load_config(path, [f"model.name={model}", f"data.resolution={resolution}", "data.source=toy", *overrides])
    with torch.device("meta"):
        vae = vae_architecture(cfg)
    factor, patch = vae_downsample_factor(vae), SIT_CONFIGS[model]["patch_size"]
    if resolution % (factor * patch):
        raise AhpaError(f"--resolution {resolution} is not a multiple of {factor * patch} (VAE factor {factor} x patch {patch}) for {model}")
    latent_shape, grid = latent_geometry(cfg, vae)
    prior = build_prior(cfg, vae, grid) if vae_groups(cfg) else None
    shapes = target_shapes(cfg, prior, latent_shape, grid)
    shapes = {g: shapes[g] for g in cfg.prior.groups if g in shapes}  # the objective's target order
    label = Path(method).stem if method.endswith((".yaml", ".yml")) else method
    return Method(label, str(path), cfg, latent_shape, shapes, teacher_name(cfg))


def cost_teacher(name: str, grid: int) -> nn.Module:
    """REPA's frozen teacher for cost purposes: the project's DINOv2 prior, randomly initialised
    (the real architecture; the cost does not depend on the weights)."""
    teacher = DINOv2Teacher(name, grid=grid, weights="random").to(torch.get_default_device())  # meta when counting
    teacher.source = f"ahpa.priors.dinov2 {name} at {teacher.input_size} px, randomly initialised"
    return teacher.requires_grad_(False).eval()


@dataclass
class Built:
    module: nn.Module  # TrainingModule
    teacher: nn.Module | None


def build_method(method: Method) -> Built:
    """The SiT, its objective and the training module (and the teacher), on the current default device."""
    cfg = method.cfg
    sit = build_backbone(cfg, method.latent_shape)
    objective = build_objective(cfg, sit, method.group_shapes)
    teacher = cost_teacher(method.teacher, sit.grid) if method.teacher else None
    return Built(TrainingModule(sit, objective, build_transport(cfg)).train(), teacher)


def random_inputs(method: Method, batch: int, device, resolution: int) -> dict:
    """Random tensors of one training step's shapes (latents, t, eps, label dropout, features)."""
    cfg = method.cfg
    C, h, w = method.latent_shape
    grid = h // int(cfg.model.name.rsplit("/", 1)[1])
    x0 = torch.randn(batch, C, h, w, device=device)
    inputs = {
        "x0": x0, "y": torch.randint(0, cfg.model.num_classes, (batch,), device=device),
        "t": torch.rand(batch, device=device), "eps": torch.randn_like(x0),
        "drop": torch.rand(batch, device=device) < cfg.model.class_dropout,
        "features": {g: torch.randn(batch, L, Ck, grid, grid, device=device)
                     for g, (L, Ck) in method.group_shapes.items() if g != TEACHER_GROUP},
    }
    if method.teacher:
        inputs["images"] = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    return inputs


def _features(built: Built, inputs: dict, grid: int) -> dict | None:
    features = dict(inputs["features"])
    if built.teacher is not None:
        tokens = built.teacher(inputs["images"])  # [B, N, D], no grad
        features[TEACHER_GROUP] = tokens.transpose(1, 2).reshape(tokens.shape[0], 1, -1, grid, grid)
    return features or None


def count_costs(method: Method, resolution: int, *, backward: bool = True) -> dict:
    """Parameters and per-image counts in both conventions, on the meta device (batch 1).
    ``backward=False`` skips the FlopCounterMode backward pass (its total is then None)."""
    with torch.device("meta"):
        built = build_method(method)
        inputs = random_inputs(method, 1, "meta", resolution)
    module, teacher = built.module, built.teacher
    sit, objective = module.sit, module.objective
    grid = sit.grid
    macs = MacCounter(backbone=sit, objective=objective, teacher=teacher)
    with macs, FlopCounterMode(display=False) as fwd:
        features = _features(built, inputs, grid)
        teacher_attention = attention_flops(fwd) if teacher is not None else 0
        loss, _, _ = module(inputs["x0"], inputs["y"], inputs["t"], inputs["eps"], inputs["drop"], features)
    bwd_flops = None
    if backward:
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        bwd_flops = bwd.get_total_flops()
    backbone_attention = attention_flops(fwd, "TrainingModule.sit")
    dit = sum(macs.macs.values())
    attention = (backbone_attention + teacher_attention) // 2  # FLOPs -> MACs
    extra = sum(p.numel() for p in objective.parameters() if p.requires_grad) if objective is not None else 0
    return {
        "backbone_params": sum(p.numel() for p in sit.parameters()),
        "extra_trainable_params": extra,
        "teacher_params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
        "teacher_model": getattr(teacher, "source", type(teacher).__name__) if teacher is not None else None,
        "macs": {"backbone": macs.macs["backbone"], "objective": macs.macs.get("objective", 0),
                 "teacher": macs.macs.get("teacher", 0), "attention_matmuls": attention},
        "gflops_dit": dit / 1e9,
        "gflops_dit_with_attention": (dit + attention) / 1e9,
        "flopcounter_forward_gflops": fwd.get_total_flops() / 1e9,
        "flopcounter_fwd_bwd_gflops": (fwd.get_total_flops() + bwd_flops) / 1e9 if backward else None,
    }


# ---------------------------------------------------------------------- timing
def _autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Mixed precision as the Trainer resolves it (auto: bf16 on CUDA, fp32 elsewhere)."""
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" else "no"
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]


class StepRunner:
    """One method's real training step on a device, with its optimizer and EMA."""

    def __init__(self, method: Method, batch: int, device: torch.device, resolution: int):
        self.method, self.device, self.update_ema = method, device, update_ema
        cfg = method.cfg
        torch.manual_seed(cfg.train.seed)
        with device:
            self.built = build_method(method)
        self.module = self.built.module
        self.ema = copy.deepcopy(self.module.sit).requires_grad_(False).eval()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                           weight_decay=cfg.train.weight_decay)
        self.inputs = random_inputs(method, batch, device, resolution)
        self.dtype = _autocast_dtype(cfg, device)
        self.grid = self.module.sit.grid

    def step(self) -> None:
        cfg, i = self.method.cfg, self.inputs
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with amp:
            features = _features(self.built, i, self.grid)
            loss, _, _ = self.module(i["x0"], i["y"], i["t"], i["eps"], i["drop"], features)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema(self.ema, self.module.sit, cfg.train.ema_decay)

    def timed(self, iters: int) -> float:
        """Seconds per iteration over ``iters`` steps (device synchronised)."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            self.step()
        _sync(self.device)
        return (time.perf_counter() - start) / iters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _persistent_bytes(info: dict) -> int:
    """fp32 weights + grads + AdamW moments + EMA of the backbone; the objective without EMA; the teacher."""
    return 4 * (5 * info["backbone_params"] + 4 * info["extra_trainable_params"] + info["teacher_params"])


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_speed(methods: list[Method], *, batch: int, device: torch.device, resolution: int, warmup: int,
                  rounds: int, iters: int, sequential: bool, log: Callable[[str], None] | None = None) -> None:
    """Fill ``info["ms_per_iter"]``, ``"iters_per_s"``, ``"round_ms"`` and ``"peak_memory_bytes"`` of each method."""
    cuda = device.type == "cuda"
    log = log or (lambda line: print(line, flush=True))  # progress of a long run, visible at once

    def start(method: Method) -> StepRunner:
        base = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        runner = StepRunner(method, batch, device, resolution)
        for _ in range(warmup):
            runner.step()
        # Steady-state peak: AdamW's moments exist after the first step; other methods are idle.
        method.info["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(device) - base) if cuda and warmup else None
        return runner

    def record(method: Method, seconds: list[float]) -> None:
        ms = statistics.median(seconds) * 1e3
        method.info.update(ms_per_iter=ms, iters_per_s=1e3 / ms, round_ms=[s * 1e3 for s in seconds])

    if sequential:
        for method in methods:
            log(f"timing {method.label}: {warmup} warm-up + {rounds} x {iters} iterations at batch {batch}")
            runner = start(method)
            if cuda and not warmup:
                torch.cuda.reset_peak_memory_stats(device)
            seconds = []
            for r in range(rounds):
                seconds.append(runner.timed(iters))
                log(f"round {r + 1}/{rounds}: {method.label} {seconds[-1] * 1e3:.1f} ms")
            if cuda and not warmup:
                method.info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            record(method, seconds)
            del runner
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return
    runners = []
    for method in methods:
        log(f"building {method.label} and warming up ({warmup} iterations at batch {batch})")
        runners.append(start(method))
    seconds: list[list[float]] = [[] for _ in methods]
    for r in range(rounds):
        for k, runner in enumerate(runners):  # A B A B ...: drifts of the machine hit every method alike
            seconds[k].append(runner.timed(iters))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{m.label} {s[-1] * 1e3:.1f} ms" for m, s in zip(methods, seconds)))
    for method, s in zip(methods, seconds):
        record(method, s)


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
        need = [_persistent_bytes(m.info) for m in methods]
        free = _available_bytes(device)
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
            "precision": str(_autocast_dtype(methods[0].cfg, device) or "fp32").replace("torch.", ""),
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
