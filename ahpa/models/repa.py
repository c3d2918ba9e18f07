"""Continue training from a REPA training checkpoint (``train.init_from``), projector included.

REPA (``train.py``) saves ``{"model", "ema", "opt", "args", "steps"}``: the online SiT
with its projector ``projectors.0 = Sequential(Linear(D, 2048), SiLU, Linear(2048, 2048),
SiLU, Linear(2048, z_dim))`` in ``model``, the EMA copy (projector too) in ``ema``,
AdamW's state over ``model.parameters()`` in ``opt`` and the step count.  Here the SiT
keys are REPA's own (docs/design.md section 1), and the projector becomes the objective's
``mlp3`` head on the same block (its Linear layers are 1x1 convolutions:
``weight[..., None, None]``).  The optimizer state is mapped parameter by
parameter: REPA's AdamW indexes ``model.parameters()``, whose order is the order
of the parameter keys of ``model`` (REPA's SiT has no buffers; its frozen
``pos_embed`` Parameter holds index 0 without state), so index ``i`` of ``opt``
belongs to the ``i``-th key of ``model``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ahpa.errors import AhpaError
from ahpa.models.checkpoints import convert_state_dict, strip_prefixes, torch_load

_PROJECTOR = re.compile(r"^projectors\.(\d+)\.(\d+)\.(weight|bias)$")


def read_repa_checkpoint(path: str | Path) -> dict:
    """The dict of a REPA training checkpoint (``model`` at least), with prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise AhpaError(f"train.init_from='{path}' does not exist; pass a REPA training checkpoint (e.g. exps/NAME/checkpoints/0400000.pt)")
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model", ckpt.get("ema")), dict):
        raise AhpaError(f"'{path}' is not a REPA training checkpoint (no 'model' or 'ema' state dict)")
    out = dict(ckpt)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), dict):
            out[key] = {strip_prefixes(k): v for k, v in ckpt[key].items()}
    if not any(_PROJECTOR.match(k) for k in out.get("model", out.get("ema"))):
        raise AhpaError(f"'{path}' has no REPA projector ('projectors.0.*'); it is a plain SiT checkpoint: sample from it with `ahpa sample`, "
                        "or train without train.init_from")
    return out


def _head_key(key: str, depth: int) -> str | None:
    m = _PROJECTOR.match(key)
    if m is None:
        return None
    if m.group(1) != "0":
        raise AhpaError(f"the REPA checkpoint has projector '{key}' of a second teacher; only one teacher (projectors.0) is supported")
    return f"heads.{depth}.{m.group(2)}.{m.group(3)}"


def _as_head(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A Linear weight [out, in] as a 1x1 conv weight [out, in, 1, 1] (biases unchanged)."""
    return value.reshape(like.shape) if value.numel() == like.numel() else value


def init_from_repa(path: str | Path, *, sit: nn.Module, ema: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                   module: nn.Module) -> tuple[int, str]:
    """Load SiT, EMA, projector and AdamW state of a REPA checkpoint into a fresh run.

    ``module`` is the TrainingModule whose trainable parameters the optimizer holds
    (in ``module.parameters()`` order).  Returns (REPA's step count, a one-line summary).
    """
    ckpt = read_repa_checkpoint(path)
    if objective is None or list(getattr(objective, "groups", [])) != ["dinov2"]:
        raise AhpaError("train.init_from loads a REPA checkpoint: the run must align to the DINOv2 teacher alone "
                        "(prior.groups=[dinov2], e.g. configs/sit-xl2-repa.yaml)")
    if len(objective.depths) != 1:
        raise AhpaError(f"a REPA checkpoint has one projector; set one alignment depth (align.depths), not {objective.depths}")
    depth = objective.depths[0]
    args = ckpt.get("args")
    repa_depth = getattr(args, "encoder_depth", None)
    if repa_depth is not None and int(repa_depth) != depth:
        raise AhpaError(f"the REPA checkpoint was trained with --encoder-depth {repa_depth}, this run aligns block {depth}; set align.depths=[{repa_depth}]")
    head = objective.heads[str(depth)]
    if not (isinstance(head, nn.Sequential) and len(head) == 5 and all(isinstance(head[i], nn.Conv2d) and head[i].kernel_size == (1, 1) for i in (0, 2, 4))):
        raise AhpaError("a REPA projector loads into align.head=mlp3 only (Linear-SiLU-Linear-SiLU-Linear); set align.head=mlp3")
    online = ckpt.get("model", ckpt.get("ema"))
    averaged = ckpt.get("ema", online)

    def load(target: nn.Module, state: dict, what: str) -> None:
        sit_state = convert_state_dict(state)
        own = target.state_dict()
        missing = sorted(set(own) - set(sit_state))
        wrong = [k for k in own if k in sit_state and sit_state[k].shape != own[k].shape]
        extra = sorted(set(sit_state) - set(own))
        if missing or wrong or extra:
            first = (f"tensor '{wrong[0]}' is {list(sit_state[wrong[0]].shape)} there, {list(own[wrong[0]].shape)} here" if wrong
                     else f"it lacks '{missing[0]}'" if missing else f"it has extra tensor '{extra[0]}'")
            raise AhpaError(f"the {what} SiT of '{path}' does not fit this run's {getattr(target, 'name', 'model')}: {first}; set model.name (and data.resolution) to the checkpoint's")
        target.load_state_dict({k: v.to(own[k].dtype) for k, v in sit_state.items()})

    load(sit, online, "online")
    load(ema, averaged, "EMA")
    head_state = head.state_dict()
    loaded = {}
    for key, value in online.items():
        name = _head_key(key, depth)
        if name is None:
            continue
        local = name.split(".", 2)[2]
        if local not in head_state or head_state[local].numel() != value.numel():
            raise AhpaError(f"REPA projector tensor '{key}' {list(value.shape)} does not fit this run's head (teacher width or model width differ; "
                            f"head expects {list(head_state[local].shape) if local in head_state else 'no such tensor'})")
        loaded[local] = _as_head(value, head_state[local]).to(head_state[local].dtype)
    if set(loaded) != set(head_state):
        raise AhpaError(f"the REPA checkpoint lacks projector tensors {sorted(set(head_state) - set(loaded))}")
    head.load_state_dict(loaded)

    note = "AdamW state loaded"
    opt = ckpt.get("opt")
    if isinstance(opt, dict) and opt.get("state") is not None:
        _load_optimizer(opt, online, depth, module, optimizer, path)
    else:
        note = "no optimizer state in the file: AdamW moments start fresh"
    steps = int(ckpt.get("steps", 0) or 0)
    return steps, f"initialised from REPA checkpoint {path} (step {steps}; SiT, EMA and projector on block {depth}; {note})"


def _load_optimizer(opt: dict, online: dict, depth: int, module: nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Map REPA's AdamW state (indexed by REPA's parameter order) onto this run's optimizer."""
    repa_keys = [k for k in online if isinstance(online[k], torch.Tensor)]
    indices = [i for g in opt["param_groups"] for i in g["params"]]
    if len(indices) != len(repa_keys):
        raise AhpaError(f"the optimizer state of '{path}' indexes {len(indices)} parameters but its model has {len(repa_keys)} tensors; "
                        "it is not a checkpoint of REPA's train.py (or remove 'opt' from it to start AdamW afresh)")
    own = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    position = {n: i for i, (n, _) in enumerate(own)}
    sit_names = {k: v for k, v in zip(convert_state_dict({k: online[k] for k in repa_keys if not k.startswith("projectors.")}),
                                      [k for k in repa_keys if not k.startswith("projectors.")])}
    ours_of_repa = {repa: f"sit.{ours}" for ours, repa in sit_names.items()}
    ours_of_repa |= {k: f"objective.{_head_key(k, depth)}" for k in repa_keys if k.startswith("projectors.")}
    state = {}
    for index, key in zip(indices, repa_keys):
        entry = opt["state"].get(index)
        if entry is None:  # frozen pos_embed, or never updated
            continue
        name = ours_of_repa.get(key)
        if name not in position:
            raise AhpaError(f"REPA optimizer state for '{key}' has no trainable counterpart here ({name}); check model.name and align.head")
        param = own[position[name]][1]
        state[position[name]] = {k: (v.reshape(param.shape) if isinstance(v, torch.Tensor) and v.numel() == param.numel() and v.ndim > 0 else v)
                                 for k, v in entry.items()}
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})  # this run's lr, betas
