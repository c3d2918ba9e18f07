"""The timed half of ``ahpa profile`` (paper Table 6): training steps per second of each method, interleaved
rounds on one device, and the memory check before them.  The counting half is :mod:`ahpa.diagnostics.profile`."""

from __future__ import annotations

import copy
import gc
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from ahpa.config import Config
from ahpa.diagnostics.profile import Method, build_method, random_inputs, step_features
from ahpa.training_module import update_ema


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
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
        self.dtype = autocast_dtype(cfg, device)
        self.grid = self.module.sit.grid

    def step(self) -> None:
        cfg, i = self.method.cfg, self.inputs
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with amp:
            features = step_features(self.built, i, self.grid)
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


def persistent_bytes(info: dict) -> int:
    """fp32 weights + grads + AdamW moments + EMA of the backbone; the objective without EMA; the teacher."""
    return 4 * (5 * info["backbone_params"] + 4 * info["extra_trainable_params"] + info["teacher_params"])


def available_bytes(device: torch.device) -> int | None:
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


