"""FID, sFID, Inception Score and precision/recall with ADM's semantics (docs/design.md section 7).

Each function mirrors the matching piece of openai/guided-diffusion's
``evaluations/evaluator.py``: ``FIDStatistics.frechet_distance``,
``Evaluator.compute_inception_score`` and ``ManifoldEstimator`` (itself from
Kynkäänniemi et al. 2019).  Features may be ``np.memmap`` arrays: everything
below reads them in blocks, so memory stays bounded for 50K samples.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from ahpa.errors import AhpaError


def feature_statistics(features: np.ndarray, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, ddof=1) as ``np.mean`` / ``np.cov(rowvar=False)``.

    Two passes over row blocks, so an on-disk feature file is never loaded whole.
    """
    n = len(features)
    if n < 2:
        raise AhpaError(f"need at least 2 images for a covariance, got {n}")
    mu = np.zeros(features.shape[1], dtype=np.float64)
    for start in range(0, n, block):
        mu += features[start : start + block].sum(axis=0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((features.shape[1],) * 2, dtype=np.float64)
    for start in range(0, n, block):
        centred = features[start : start + block].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64, with ADM's fallbacks.

    If ``sqrtm`` of the product is not finite (singular covariances), ``eps`` is
    added to both diagonals; a small imaginary part from round-off is dropped,
    a large one (diagonal |imag| > 1e-3) is an error.
    """
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise AhpaError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # ADM's disp=False: singularity is handled below, not printed
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals", stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise AhpaError(
                f"Frechet distance: sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):.3g}); "
                "the statistics are degenerate (too few images?)"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))) averaged over consecutive splits, as ADM.

    Splits are ``[0:5000], [5000:10000], ...`` in file order (no shuffle); a
    shorter last split is kept.  ``p(y|x)`` is the softmax of the bias-free
    logits; computed in float64 via log-softmax (ADM's float32 ``p * log p``
    would be NaN where a probability underflows to 0).
    """
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = torch.log_softmax(torch.tensor(np.asarray(logits[start : start + split_size]), dtype=torch.float64), dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def squared_distances(u: torch.Tensor, v: torch.Tensor, half: bool) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)], ``max(|u|^2 - 2 u.v + |v|^2, 0)``.

    ADM's DistanceBlock computes them from float16 copies of the features and
    uses float32 only when the float16 result overflows; ``half`` reproduces
    that rounding (fp16 inputs and output, fp32 arithmetic) on any device.
    """
    if half:
        u16, v16 = u.half().float(), v.half().float()
        d = ((u16 * u16).sum(1, keepdim=True) - 2 * u16 @ v16.T + (v16 * v16).sum(1)).clamp_min(0).half()
        if torch.isfinite(d).all():
            return d.float()
    return ((u * u).sum(1, keepdim=True) - 2 * u @ v.T + (v * v).sum(1)).clamp_min(0)


def _blocks(features: np.ndarray, size: int, device: torch.device):
    for start in range(0, len(features), size):
        yield start, torch.from_numpy(np.array(features[start : start + size], dtype=np.float32)).to(device)  # copy: memmaps are read-only


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 2048, half: bool = True, device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour, the point itself excluded.

    ADM takes element k (0-based) of the sorted distances to all points, where
    element 0 is the point itself.  Computed in [block x block] tiles keeping a
    running k+1 smallest, so memory is O(block^2) for any number of points.
    """
    if len(features) <= k:
        raise AhpaError(f"precision/recall with k={k} needs more than {k} images, got {len(features)}")
    device = torch.device(device)
    radii = torch.empty(len(features), dtype=torch.float32)
    for row_start, rows in _blocks(features, block, device):
        nearest = torch.full((len(rows), 0), float("inf"), device=device)
        for _, cols in _blocks(features, block, device):
            candidates = torch.cat([nearest, squared_distances(rows, cols, half)], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[row_start : row_start + len(rows)] = nearest[:, k].cpu()
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: torch.Tensor, block: int, half: bool, device: torch.device) -> float:
    """Fraction of ``points`` within radius of at least one of ``centres`` (ADM's ``d <= r``)."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for row_start, rows in _blocks(points, block, device):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for col_start, cols in _blocks(centres, block, device):
            r = radii[col_start : col_start + len(cols)].to(device)
            hit |= (squared_distances(rows, cols, half) <= r).any(dim=1)
        inside[row_start : row_start + len(rows)] = hit.cpu()
    return float(inside.double().mean())


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 2048, half: bool = True, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """ADM's improved precision and recall on pool_3 features.

    Precision: fraction of samples inside the reference manifold (union of
    k-NN balls around reference points); recall: fraction of reference points
    inside the sample manifold.
    """
    device = torch.device(device)
    ref_radii = manifold_radii(reference, k, block, half, device)
    sample_radii = manifold_radii(samples, k, block, half, device)
    precision = _coverage(samples, reference, ref_radii, block, half, device)
    recall = _coverage(reference, samples, sample_radii, block, half, device)
    return precision, recall
