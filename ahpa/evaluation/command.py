"""``ahpa evaluate``: ADM's FID / sFID / IS / precision / recall for ``.npz`` samples (docs/design.md section 7).

    ahpa evaluate SAMPLES.npz [SAMPLES2.npz ...] --ref VIRTUAL_imagenet256_labeled.npz \\
        [--out results.json] [--csv results.csv] [--inception PATH] [--batch 64] [--device cuda]

The reference's precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` are used when
present, as ADM's evaluator does; its images still give the precision/recall
manifold.  Features are cached (see :mod:`ahpa.evaluation.features`), so a rerun
after an error or with new sample files only extracts what is new.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ahpa.errors import AhpaError
from ahpa.evaluation.arguments import check_arguments
from ahpa.evaluation.features import cached_features, default_cache_dir
from ahpa.evaluation.inception import InceptionFeatures, load_inception
from ahpa.evaluation.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from ahpa.evaluation.npz import NpzImages, open_npz_images
from ahpa.evaluation.t2i import run_t2i_eval
from ahpa.io import write_json_atomic, write_text_atomic

ADM_NUM_SAMPLES = 50_000
CSV_FIELDS = ["samples", "num_samples", "fid", "sfid", "inception_score", "precision", "recall", "reference", "weights_source"]


def _statistics(images: NpzImages, features: np.ndarray, mu_key: str, sigma_key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu, sigma, origin): precomputed arrays stored in the file when present (ADM), else from features."""
    if mu_key in images.keys and sigma_key in images.keys:
        mu, sigma = images.load(mu_key), images.load(sigma_key)
        if mu.shape != (features.shape[1],) or sigma.shape != (features.shape[1],) * 2:
            raise AhpaError(f"{images.path}: precomputed {mu_key}/{sigma_key} have shapes {mu.shape}/{sigma.shape}, expected ({features.shape[1]},)")
        return mu, sigma, "precomputed"
    mu, sigma = feature_statistics(features)
    return mu, sigma, "computed"


def _warn_sample_count(n: int, path: Path) -> str | None:
    if n >= ADM_NUM_SAMPLES:
        return None
    message = f"{path} has {n} samples, not {ADM_NUM_SAMPLES}: FID/sFID are biased upward and NOT comparable with published 50K numbers"
    print(f"\n{'!' * 80}\nWARNING: {message}\n{'!' * 80}\n", file=sys.stderr)
    return message


def evaluate(
    samples_path: str | Path,
    ref_path: str | Path,
    *,
    inception: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    extractor: InceptionFeatures | None = None,
    progress: bool = True,
) -> dict:
    """All ADM metrics of one sample batch against a reference batch, as a JSON-ready dict.

    ``extractor`` overrides the Inception lookup (tests pass a random-init one).
    """
    samples, reference = open_npz_images(samples_path), open_npz_images(ref_path)
    _check_resolution(samples, reference)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if extractor is None:
        extractor = load_inception(inception, device)
    warning = _warn_sample_count(len(samples), samples.path)
    start = time.perf_counter()
    ref_features = cached_features(reference, extractor, cache_dir, batch_size, progress)
    sample_features = cached_features(samples, extractor, cache_dir, batch_size, progress)

    mu_r, sigma_r, ref_origin = _statistics(reference, ref_features["pool"], "mu", "sigma")
    mu_rs, sigma_rs, _ = _statistics(reference, ref_features["spatial"], "mu_s", "sigma_s")
    mu, sigma, _ = _statistics(samples, sample_features["pool"], "mu", "sigma")
    mu_s, sigma_s, _ = _statistics(samples, sample_features["spatial"], "mu_s", "sigma_s")
    precision, recall = precision_recall(ref_features["pool"], sample_features["pool"], device=extractor.device)
    result = {
        "samples": str(samples.path),
        "reference": str(reference.path),
        "num_samples": len(samples),
        "num_reference": len(reference),
        "resolution": list(samples.resolution),
        "fid": frechet_distance(mu, sigma, mu_r, sigma_r),
        "sfid": frechet_distance(mu_s, sigma_s, mu_rs, sigma_rs),
        "inception_score": inception_score(sample_features["logits"]) if "logits" in sample_features else None,
        "precision": precision,
        "recall": recall,
        "reference_statistics": ref_origin,
        "weights_source": extractor.source,
        "weights_id": extractor.weights_id,
        "seconds": round(time.perf_counter() - start, 1),
        "warnings": [w for w in [warning] if w],
    }
    if result["inception_score"] is None:
        result["warnings"].append("Inception Score skipped: these Inception weights have no classifier layer (use torch-fidelity's weights)")
    return result


def _append_csv(path: Path, results: list[dict]) -> None:
    """Append one row per result (header on a new file); the file is replaced atomically."""
    old = path.read_text() if path.is_file() else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerows(results)
    write_text_atomic(path, old + buffer.getvalue())


def _check_resolution(samples: NpzImages, reference: NpzImages) -> None:
    if samples.resolution != reference.resolution:
        raise AhpaError(
            f"samples {samples.path} are {samples.resolution[0]}x{samples.resolution[1]} but reference {reference.path} is "
            f"{reference.resolution[0]}x{reference.resolution[1]}; use the reference batch of the sample resolution"
        )


def run(args: argparse.Namespace) -> int:
    if args.coco_ref or args.pickscore:  # text-to-image metrics (Table 5)
        return run_t2i_eval(args)
    if not args.ref:
        raise AhpaError("--ref REFERENCE.npz is required (or --coco-ref / --pickscore for text-to-image samples)")
    device = check_arguments(args)
    reference = open_npz_images(args.ref)  # bad input is reported before any weights are looked up
    for path in args.samples:
        _check_resolution(open_npz_images(path), reference)
    extractor = load_inception(args.inception, device)
    print(f"Inception weights: {extractor.source}", file=sys.stderr)
    results = [evaluate(path, args.ref, batch_size=args.batch, cache_dir=args.cache_dir, extractor=extractor) for path in args.samples]
    # All files are written only after every evaluation succeeded.
    if args.out:
        payload = results[0] if len(results) == 1 else {"reference": args.ref, "results": results}
        write_json_atomic(args.out, payload, indent=2)
    else:
        for result in results:
            write_json_atomic(Path(result["samples"]).with_suffix(".metrics.json"), result, indent=2)
    csv_path = args.csv or (None if len(results) == 1 else (Path(args.out).with_suffix(".csv") if args.out else Path("metrics.csv")))
    if csv_path:
        _append_csv(Path(csv_path), results)
    for r in results:
        is_text = "n/a" if r["inception_score"] is None else f"{r['inception_score']:.2f}"
        print(
            f"{r['samples']}: FID {r['fid']:.3f}  sFID {r['sfid']:.3f}  IS {is_text}  "
            f"precision {r['precision']:.3f}  recall {r['recall']:.3f}  ({r['num_samples']} samples)"
        )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID / sFID / IS / precision / recall of .npz samples (ADM evaluation suite)",
        description="ADM's FID / sFID / IS / precision / recall of .npz sample batches against a reference batch (docs/design.md section 7).",
    )
    parser.add_argument("samples", nargs="+", help="ADM .npz sample batches (arr_0: uint8 NHWC)")
    parser.add_argument("--ref", help="reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--out", help="JSON file for the results (default: SAMPLES.metrics.json beside each sample file)")
    parser.add_argument("--csv", help="CSV file to append one row per sample file to (default with several files: beside --out, or ./metrics.csv)")
    parser.add_argument("--inception", help="Inception weights: torch-fidelity's .pth or NVIDIA's TorchScript .pt (default: look them up)")
    parser.add_argument("--batch", type=int, default=64, help="images per Inception batch")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"feature cache (default: {default_cache_dir()})")
    t2i = parser.add_argument_group("text-to-image (paper Table 5)")
    t2i.add_argument("--coco-ref", help="COCO root: FID against val2014 statistics (built once with the training preprocessing, cached)")
    t2i.add_argument("--pickscore", help="PickScore_v1 model: local dir or cached HF id (yuvalkirstain/PickScore_v1)")
    t2i.add_argument("--pickscore-processor", help="its processor (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K, local or cached)")
    parser.set_defaults(func=run)
