"""FSDP2 (``train.fsdp=true``) beside DDP: what the training loop needs to stay one loop.

:func:`shard_training_module` applies ``torch.distributed.fsdp.fully_shard`` to every
SiT block and to the root (the SiT embedders, final layer and the alignment
objective), as accelerate's FSDP2 plugin with ``transformer_based_wrap`` would;
parameters and AdamW moments become DTensors sharded along dim 0.  ahpa shards
itself, under accelerate's process group, because accelerate 1.15 applies its
FSDP plugin only to GPU-type process groups (``AcceleratorState`` skips it for
``MULTI_CPU``): one code path, tested with gloo on CPU, runs on GPUs.
The checkpoints keep the DDP format (full tensors, id-keyed AdamW state), so a
run may resume under the other strategy or another world size:

- saving: :func:`full_views` gathers (a collective on every rank) and hands
  ``save_checkpoint`` objects with the usual ``state_dict()``;
- resuming: :func:`sharded_load_views` take full tensors and keep this rank's rows;
- EMA: a full, unsharded copy on every rank; each rank updates the rows it owns
  (no communication per step, :func:`ema_pairs`) and :func:`sync_ema` gathers the
  other rows before a save or a sample grid.

Mixed precision: parameters stay float32 under FSDP (``param_dtype=None``) and
the step computes in bf16 under autocast, as DDP does, so the losses and the
router target stay float32 (docs/design.md section 4) and gradients are reduced in float32.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch without DTensor: FSDP2 is unavailable and nothing is sharded
    DTensor = ()


def shard_training_module(module: nn.Module) -> nn.Module:
    """FSDP2 in place: one ``fully_shard`` unit per SiT block (MMDiT: joint block), then the root (accelerate's
    ``transformer_based_wrap`` with ``SiTBlock``).  Parameters and gradient reductions stay float32;
    bf16 compute comes from autocast, as under DDP."""

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for sub in list(module.modules()):
        if type(sub).__name__ in ("SiTBlock", "JointBlock"):  # SiT's blocks, MMDiT's joint blocks
            fully_shard(sub, mp_policy=policy, reshard_after_forward=True)
    fully_shard(module, mp_policy=policy, reshard_after_forward=True)
    return module


def is_sharded(t) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def _rows(t) -> slice:
    """The dim-0 rows of the global tensor that this rank's shard of DTensor ``t`` holds."""
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return slice(offset[0], offset[0] + shape[0]) if shape else slice(None)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_sharded(t) else t


def _shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` cut to the rows of ``like``'s shard, as a DTensor of the same layout."""
    if not is_sharded(like):
        return full
    local = full[_rows(like)].to(like.to_local().device)
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


@torch.no_grad()
def ema_pairs(ema: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA tensors, model tensors) to lerp: whole tensors, or this rank's rows of sharded ones."""
    ema_out, model_out = [], []
    for e, p in zip(ema.parameters(), model.parameters()):
        if is_sharded(p):
            ema_out.append(e[_rows(p)])  # a view: the lerp writes into the EMA
            model_out.append(p.to_local().detach().to(e.dtype))
        else:
            ema_out.append(e)
            model_out.append(p.detach().to(e.dtype))
    return ema_out, model_out


@torch.no_grad()
def sync_ema(ema: nn.Module, model: nn.Module) -> None:
    """Collective: give every rank's EMA the rows the other ranks own."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if is_sharded(p):
            own = e[_rows(p)].to(p.to_local().device)
            shard = DTensor.from_local(own, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            e.copy_(shard.full_tensor())


class StateView:
    """Stands in for a module or optimizer in ``save_checkpoint``: a precomputed full state dict."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the module's state dict with full CPU tensors (same order on every rank)."""
    return {k: _full(v).detach().cpu() for k, v in module.state_dict().items()}


def full_optimizer_state(optimizer) -> dict:
    """Collective: the optimizer state dict with full tensors, in torch's id-keyed format."""
    sd = optimizer.state_dict()
    state = {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def full_views(model: nn.Module, objective: nn.Module | None, optimizer, plain_objective: nn.Module | None):
    """Collective: stand-ins for ``save_checkpoint`` (model, objective, optimizer) with full tensors.
    ``plain_objective`` (an unsharded copy) receives the objective's weights, for the router plot."""
    model_view = StateView(full_state_dict(model))
    objective_view = None
    if objective is not None:
        state = full_state_dict(objective)
        if plain_objective is not None:
            plain_objective.load_state_dict(state)
            objective_view = plain_objective
        else:
            objective_view = StateView(state)
    return model_view, objective_view, StateView(full_optimizer_state(optimizer))


class ShardedLoadView:
    """Stands in for a sharded module in ``load_checkpoint``: full tensors in, this rank's rows kept."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:  # DTensors report their global shapes: the shape check holds
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        own = self.module.state_dict()
        self.module.load_state_dict({k: _shard_like(v, own[k]) for k, v in state.items()})


class ShardedOptimizerLoadView:
    """Stands in for the optimizer in ``load_checkpoint``: full moments cut to each parameter's shard."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def load_state_dict(self, sd: dict) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            state[i] = {k: _shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

