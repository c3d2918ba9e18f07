"""Optional speed levers of ``ahpa sample``: bf16 model forwards and a compiled model.

- ``precision="bf16"`` runs each model forward under ``torch.autocast(dtype=bfloat16)`` (matmuls
  and attention in bf16, with float32 accumulation; norms and softmax as autocast decides) and
  returns its velocity in float32.  The ODE/SDE state, the time grid, guidance and the step noise
  stay as they are (float64 in :mod:`ahpa.sampling`): only the network's arithmetic changes.
  Samples differ from float32 ones; ``benchmarks/sampling_precision.py`` measures by how much.
- ``compile=True`` wraps the model in ``torch.compile`` (inductor unless another ``backend`` is
  named).  Values equal the eager ones to float rounding, not bitwise.

Both are off by default.  A sample directory records them in its ``sampling.json`` when they are
on (:func:`manifest_entries`), so one ``.npz`` never mixes bf16 and float32 samples; directories
written without them resume as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ahpa.errors import AhpaError

PRECISIONS = ("float32", "bf16")


class AutocastForward(nn.Module):
    """``model(x, t, y)`` under bf16 autocast on the input's device type; float32 out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.num_classes = model.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.model(x, t, y)
        return out.float()


def check_speed_options(precision: str, compile: bool) -> None:
    if precision not in PRECISIONS:
        raise AhpaError(f"unknown sampling precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if not isinstance(compile, bool):
        raise AhpaError(f"compile must be true or false, got {compile!r}")


def speed_wrapped(model: nn.Module, precision: str = "float32", compile: bool = False,
                  backend: str = "inductor") -> nn.Module:
    """The model the sampler should call: ``model`` itself with both options off."""
    check_speed_options(precision, compile)
    if precision == "bf16":
        model = AutocastForward(model)
    if compile:
        num_classes = model.num_classes
        model = torch.compile(model, backend=backend)
        model.num_classes = num_classes
    return model


def manifest_entries(precision: str = "float32", compile: bool = False) -> dict:
    """What ``sampling.json`` records about these options: nothing when both are off (as before)."""
    entries = {}
    if precision != "float32":
        entries["precision"] = precision
    if compile:
        entries["compile"] = True
    return entries
