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

import math
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
from ahpa.models.sit import SIT_CONFIGS
from ahpa.priors.dinov2 import DINOv2Teacher
from ahpa.priors.vae import vae_downsample_factor
from ahpa.training_module import TrainingModule

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


def step_features(built: Built, inputs: dict, grid: int) -> dict | None:
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
        features = step_features(built, inputs, grid)
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
