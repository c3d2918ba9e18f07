"""Skip training steps whose loss or gradient is not finite, without a host sync per step.

One step of the loop (``train.py``)::

    norm = clip_grad_norm_(params, max_norm)      # the total gradient norm, a device tensor
    found = guard.check(loss, norm)               # device bool: loss or norm is NaN/Inf
    guard.step(optimizer, found)                  # the AdamW update, or nothing when found
    update_ema(ema, model, decay, keep=guard.keep(found))   # EMA lerp weight x 0 when found

A non-finite gradient has a non-finite total norm, so the two scalars cover every
parameter.  How the update is skipped depends on the optimizer:

- fused AdamW (CUDA, also CPU): its kernel honours ``optimizer.found_inf``, the
  attribute GradScaler sets: parameters, moments and the step count stay
  bit-identical, decided on the device (no host sync);
- foreach / for-loop AdamW on the CPU: the flag is read on the host, which costs
  nothing there (CPU kernels run synchronously) and the step is not called;
- foreach AdamW on an accelerator: its step count lives on the host
  (``capturable=False``), so the flag is read there: one sync per step.  Use fused
  AdamW on GPUs (the CUDA default of the training loop).

Counters (total skipped, current streak of consecutive skips) stay on the device
and are read only at log steps, where the loop synchronises anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrappers."""
    while hasattr(optimizer, "optimizer"):  # AcceleratedOptimizer subclasses torch's Optimizer
        optimizer = optimizer.optimizer
    return optimizer


class NonFiniteGuard:
    def __init__(self, device: torch.device | str, reduce=None, skipped: int = 0):
        """``reduce``: for several processes, a function summing a device tensor over ranks
        (accelerate's ``reduce``), so that every rank skips the same steps."""
        self.device = torch.device(device)
        self.reduce = reduce
        self.skipped = torch.tensor(skipped, dtype=torch.int64, device=self.device)
        self.streak = torch.zeros((), dtype=torch.int64, device=self.device)

    def check(self, loss: Tensor, grad_norm: Tensor | float) -> Tensor:
        """Device bool scalar: the step is non-finite (on any rank).  Updates the counters."""
        finite = torch.isfinite(loss.detach().float()).all()
        if isinstance(grad_norm, Tensor):
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: clip_grad_norm_ returns a DTensor; reduce a plain tensor
                grad_norm = grad_norm.full_tensor()
            finite = finite & torch.isfinite(grad_norm.detach().float()).all()
        found = ~finite
        if self.reduce is not None:
            found = self.reduce(found.float()) > 0
        self.skipped += found
        self.streak = (self.streak + 1) * found
        return found

    def step(self, optimizer, found: Tensor) -> None:
        inner = _inner(optimizer)
        scaler_driven = getattr(optimizer, "scaler", None) is not None  # fp16: GradScaler skips non-finite steps itself
        if scaler_driven:
            optimizer.step()
        elif inner.param_groups and all(group.get("fused") for group in inner.param_groups):
            inner.found_inf, inner.grad_scale = found.float(), None
            try:
                optimizer.step()
            finally:
                del inner.found_inf, inner.grad_scale
        elif not bool(found):  # host read: free on the CPU, one sync elsewhere (module docstring)
            optimizer.step()

    @staticmethod
    def keep(found: Tensor) -> Tensor:
        """1.0 for a finite step, 0.0 for a skipped one (multiplies the EMA lerp weight)."""
        return (~found).float()

    def counts(self) -> tuple[int, int]:
        """(total skipped, current streak): reads the device counters (call at log steps)."""
        return int(self.skipped), int(self.streak)
