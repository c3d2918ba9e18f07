"""Per-sample gradient statistics for G-SNR (docs/design.md section 6, paper Sec. 3 and App. E.1).

G-SNR needs, for a batch of n samples, only the mean gradient ``g_bar`` and the
per-sample squared norms ``||g_i||^2``:

    tr(S) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1),   G-SNR = ||g_bar||^2 / tr(S)

so the n per-sample gradients never have to exist at once.  Three ways to get
``||g_i||^2``, chosen by ``method`` (``benchmarks/gsnr_methods.py`` measures them):

- ``"ghost"`` (default): one forward and one backward of ``sum_i loss_i`` for the
  whole batch.  Forward hooks keep each layer's input ``a_i`` and its output
  gradient ``b_i``; for a linear map ``W`` applied to the T tokens of sample i,
  ``grad_W loss_i = b_i^T a_i`` and ``||b_i^T a_i||_F^2 = sum_{s,u} (a_s . a_u)(b_s . b_u)``
  (Goodfellow 2015, "Efficient per-example gradient computations"; the "ghost
  norm" of Opacus' ghost clipping).  Supports ``nn.Linear``, ``nn.Conv2d``
  (via ``F.unfold``) and ``nn.Embedding``: every parameter of SiT upstream of the
  aligned block, of the projection heads and of the MLP routers.  Anything else is
  refused with one line (use ``"vmap"``).
- ``"vmap"``: ``torch.func.vmap(torch.func.grad(...))`` over chunks of
  ``chunk_size`` samples; only one chunk of per-sample gradients exists at a time.
  Scaled dot-product attention is forced onto its math kernel inside the probe: it
  is the one backend whose vmapped backward is the plain composite of matmuls and
  softmax on every device (checked against ``"loop"`` in the tests).
- ``"loop"``: one forward and backward per sample: the reference.

``module(batch)`` must return one loss per sample, ``[b]``, with sample i's loss
depending on sample i only (SiT has no batch statistics).  Every tensor leaf of
``batch`` (nested dicts allowed) has the sample dimension first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from ahpa.errors import AhpaError

METHODS = ("ghost", "vmap", "loop")
GHOST_MODULES = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass
class GradStats:
    """Per-sample gradient statistics of one batch for one parameter set."""

    n: int
    mean: dict[str, torch.Tensor]  # g_bar, per parameter
    sq_norms: torch.Tensor  # ||g_i||^2, [n] float64

    @property
    def mean_sq(self) -> float:
        """``||g_bar||^2`` (float64 sum)."""
        return float(sum(g.double().pow(2).sum() for g in self.mean.values()))

    @property
    def sum_sq(self) -> float:
        """``sum_i ||g_i||^2``."""
        return float(self.sq_norms.sum())

    @property
    def trace_cov(self) -> float:
        """Unbiased ``tr(S) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1)``."""
        return (self.sum_sq - self.n * self.mean_sq) / (self.n - 1)

    @property
    def gsnr(self) -> float:
        """Per-sample G-SNR ``||g_bar||^2 / tr(S)``; ``n * gsnr`` is the batch-mean form."""
        trace = self.trace_cov
        return self.mean_sq / trace if trace > 0 else float("inf")


def _batch_size(batch) -> int:
    sizes = set()
    tree_map(lambda x: sizes.add(x.shape[0]) if torch.is_tensor(x) else None, batch)
    if len(sizes) != 1:
        raise AhpaError(f"per-sample gradients need one batch size across the batch tensors, got sizes {sorted(sizes)}")
    return sizes.pop()


def _slice(batch, start: int, stop: int):
    return tree_map(lambda x: x[start:stop] if torch.is_tensor(x) else x, batch)


def _owner(module: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return prefix, module.get_submodule(prefix), attr


@contextlib.contextmanager
def math_attention():
    """Scaled dot-product attention on the math kernel (see the module docstring)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _only_grad(module: nn.Module, params: dict[str, nn.Parameter]):
    """Gradients only for ``params`` during the probe (no graph for the rest); restored after."""
    before = {n: p.requires_grad for n, p in module.named_parameters()}
    chosen = {id(p) for p in params.values()}
    for p in module.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(before[n])


def grad_stats(module: nn.Module, params: dict[str, nn.Parameter], batch, method: str = "ghost",
               chunk_size: int = 8) -> GradStats:
    """``g_bar`` and ``||g_i||^2`` of the per-sample losses ``module(batch)`` w.r.t. ``params``
    (names as in ``module.named_parameters()``)."""
    if method not in METHODS:
        raise AhpaError(f"unknown per-sample gradient method '{method}'; choose one of: {', '.join(METHODS)}")
    if not params:
        raise AhpaError("the parameter set for G-SNR is empty; choose another --params")
    n = _batch_size(batch)
    if n < 2:
        raise AhpaError(f"G-SNR needs at least 2 samples per batch (the covariance), got {n}")
    if chunk_size < 1:
        raise AhpaError(f"chunk size must be at least 1, got {chunk_size}")
    with _only_grad(module, params):
        if method == "ghost":
            return _ghost(module, params, batch, n)
        if method == "vmap":
            return _vmap(module, params, batch, n, chunk_size)
        return _loop(module, params, batch, n)


def _grads(loss: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), got)}


def _loop(module, params, batch, n) -> GradStats:
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        g = _grads(module(_slice(batch, i, i + 1)).sum(), params)
        norms[i] = sum(v.double().pow(2).sum() for v in g.values()).cpu()
        for k, v in g.items():
            total[k] += v
    return GradStats(n, {k: v / n for k, v in total.items()}, norms)


def _vmap(module, params, batch, n, chunk_size) -> GradStats:
    names = list(params)
    detached = {k: p.detach() for k, p in params.items()}

    def one_loss(p, sample):
        single = tree_map(lambda x: x.unsqueeze(0) if torch.is_tensor(x) else x, sample)
        return functional_call(module, p, (single,)).sum()

    per_sample = vmap(grad(one_loss), in_dims=(None, 0))
    total = {k: torch.zeros_like(p) for k, p in detached.items()}
    norms = []
    with math_attention():
        for start in range(0, n, chunk_size):
            g = per_sample(detached, _slice(batch, start, min(n, start + chunk_size)))
            norms.append(sum(g[k].double().flatten(1).pow(2).sum(1) for k in names).cpu())
            for k in names:
                total[k] += g[k].sum(0)
            del g
    return GradStats(n, {k: v / n for k, v in total.items()}, torch.cat(norms))


# ---------------------------------------------------------------------- ghost norms

def _pairwise_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||b_i^T a_i||_F^2`` for ``a [n, T, p]``, ``b [n, T, q]``: Gram matrices when
    ``T^2 <= p q``, else the per-sample product itself (whichever is cheaper)."""
    a, b = a.double(), b.double()
    T, p, q = a.shape[1], a.shape[2], b.shape[2]
    if T * T <= p * q:
        return (torch.einsum("nsp,nup->nsu", a, a) * torch.einsum("nsq,nuq->nsu", b, b)).sum((1, 2))
    return torch.einsum("nsq,nsp->nqp", b, a).pow(2).sum((1, 2))


def _ghost_norms(mod: nn.Module, attrs: list[str], x: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if isinstance(mod, nn.Linear):
        a, b = x.reshape(n, -1, mod.in_features), gout.reshape(n, -1, mod.out_features)
    elif isinstance(mod, nn.Conv2d):
        a = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride).transpose(1, 2)
        b = gout.flatten(2).transpose(1, 2)
    else:  # Embedding: sample i's gradient puts sum_{s: idx_s = r} b_s in row r
        idx, b = x.reshape(n, -1), gout.reshape(n, -1, mod.embedding_dim).double()
        same = (idx[:, :, None] == idx[:, None, :]).double()
        if mod.padding_idx is not None:
            keep = (idx != mod.padding_idx).double()
            same = same * keep[:, :, None] * keep[:, None, :]
        return (same * torch.einsum("nsq,nuq->nsu", b, b)).sum((1, 2))
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    if "weight" in attrs:
        out += _pairwise_sq_norm(a, b)
    if "bias" in attrs:
        out += b.double().sum(1).pow(2).sum(1)
    return out


def _ghost(module, params, batch, n) -> GradStats:
    owners: dict[str, tuple[nn.Module, list[str]]] = {}
    for name in params:
        prefix, mod, attr = _owner(module, name)
        if not isinstance(mod, GHOST_MODULES) or attr not in ("weight", "bias"):
            raise AhpaError(f"parameter '{name}' ({type(mod).__name__}) is not supported by the ghost-norm method "
                            "(Linear, Conv2d, Embedding only); use --method vmap")
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
            raise AhpaError(f"'{prefix}' is a grouped or non-zero-padded Conv2d, not supported by the ghost-norm method; use --method vmap")
        if isinstance(mod, nn.Embedding) and mod.max_norm is not None:
            raise AhpaError(f"'{prefix}' is an Embedding with max_norm, not supported by the ghost-norm method; use --method vmap")
        owners.setdefault(prefix, (mod, []))[1].append(attr)
    inputs: dict[str, list] = {p: [] for p in owners}
    gouts: dict[str, list] = {p: [] for p in owners}

    def hook(prefix):
        def fn(mod, args, output):
            inputs[prefix].append(args[0].detach())
            if output.requires_grad:
                output.register_hook(lambda g: gouts[prefix].append(g.detach()))
        return fn

    handles = [mod.register_forward_hook(hook(p)) for p, (mod, _) in owners.items()]
    try:
        loss = module(batch)
        if loss.shape != (n,):
            raise AhpaError(f"the probe must return one loss per sample, [{n}], got {tuple(loss.shape)}")
        total = _grads(loss.sum(), params)
    finally:
        for h in handles:
            h.remove()
    norms = torch.zeros(n, dtype=torch.float64, device=loss.device)
    for prefix, (mod, attrs) in owners.items():
        if len(inputs[prefix]) > 1 or len(gouts[prefix]) > 1:
            raise AhpaError(f"'{prefix}' runs more than once per forward; its per-sample norms do not add up; use --method vmap")
        if gouts[prefix]:  # no gradient reached it: its per-sample gradients are zero
            norms += _ghost_norms(mod, attrs, inputs[prefix][0], gouts[prefix][0])
    return GradStats(n, {k: v / n for k, v in total.items()}, norms.cpu())
