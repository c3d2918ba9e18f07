"""Text-to-image metrics of Table 5: COCO FID and PickScore (paper Appendix C).

- COCO FID: the samples' Inception pool3 statistics (the ADM-exact extractor of
  ``inception.py``) against reference statistics of val2014 preprocessed exactly
  as the training images (U-ViT's centre square crop + LANCZOS to the sample
  resolution).  The reference statistics are built once and cached, keyed by the
  annotation file list, the resolution and the Inception weights.
- PickScore (docs/baselines.md "Text-to-image"): ``yuvalkirstain/PickScore_v1``
  (a CLIP-H model) with the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor;
  a pair's score is ``exp(logit_scale) * cos(text_emb, image_emb)``; the table
  reports the mean over the generated (prompt, image) pairs.  The prompts are read
  from the sample file's ``prompts`` array (``ahpa sample --prompts``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

# Upward import, on purpose: the reference images must be preprocessed exactly as the training images
# (U-ViT's centre crop + LANCZOS, docs/baselines.md "Text-to-image"), and that preprocessing is the data
# layer's; a copy here could drift from what the model was trained on.
from ahpa.data.coco import CocoImages
from ahpa.errors import AhpaError
from ahpa.evaluation.arguments import check_arguments
from ahpa.evaluation.features import cached_features, default_cache_dir
from ahpa.evaluation.inception import load_inception
from ahpa.evaluation.metrics import feature_statistics, frechet_distance
from ahpa.evaluation.npz import PROMPTS_KEY, open_npz_images
from ahpa.io import atomic_dir, write_json_atomic
from ahpa.priors.text import quiet_transformers, resolve_local_model

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
REF_VERSION = 1  # bump when the reference preprocessing changes


def coco_reference_images(coco_root: str | os.PathLike, resolution: int, split: str = "val2014"):
    """(CocoImages, file list hash): the reference images, in id order, with the training preprocessing."""
    images = CocoImages(coco_root, split, resolution)
    return images, images.file_list_hash()


def coco_reference_statistics(coco_root: str | os.PathLike, extractor, resolution: int = 256, split: str = "val2014",
                              cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                              progress: bool = True) -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, cache entry) of the pool3 features of ``split`` at ``resolution``, built once."""
    images, file_hash = coco_reference_images(coco_root, resolution, split)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cache / f"coco-{split}-{resolution}-{file_hash[:16]}-{extractor.weights_id}-r{REF_VERSION}"
    if not (entry / "stats.npz").is_file():
        feats = np.zeros((len(images), 2048), dtype=np.float64)
        failed = []
        with tqdm(total=len(images), unit="img", desc=f"COCO {split} reference", disable=not progress) as bar:
            for start in range(0, len(images), batch_size):
                results = [images.load(i) for i in range(start, min(len(images), start + batch_size))]
                failed += [r.path for r in results if r.item is None]
                if failed:
                    raise AhpaError(f"reference image {failed[0]} cannot be decoded ({results[0].error}); "
                                    "replace it (the reference must be the whole split)")
                pixels = torch.stack([r.item["image"] for r in results]).to(extractor.device)
                feats[start : start + len(results)] = extractor(pixels)["pool"].double().cpu().numpy()
                bar.update(len(results))
        mu, sigma = feature_statistics(feats)
        try:
            with atomic_dir(entry) as tmp:
                np.savez(tmp / "stats.npz", mu=mu, sigma=sigma)
                (tmp / "meta.json").write_text(json.dumps({"coco": str(coco_root), "split": split, "images": len(images),
                                                           "resolution": resolution, "weights": extractor.source}))
        except OSError:  # another run wrote the same entry first
            if not (entry / "stats.npz").is_file():
                raise
    with np.load(entry / "stats.npz") as data:
        return data["mu"], data["sigma"], entry


class PickScorer:
    """``exp(logit_scale) * cos(text, image)`` per (prompt, image) pair with a CLIP model and processor."""

    def __init__(self, model, processor, source: str = ""):
        self.model, self.processor, self.source = model.requires_grad_(False).eval(), processor, source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object

    @torch.no_grad()
    def scores(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """Per-pair scores ``[N]`` of uint8 NHWC ``images`` and their ``prompts``."""
        pil = [Image.fromarray(im) for im in images]
        image_in = self.processor(images=pil, return_tensors="pt")
        text_in = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = self._tensor(self.model.get_image_features(pixel_values=image_in["pixel_values"].to(self.device)))
        txt = self._tensor(self.model.get_text_features(**{k: v.to(self.device) for k, v in text_in.items()}))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def load_pickscore(model_path: str = PICKSCORE, processor_path: str = PICKSCORE_PROCESSOR, device="cpu") -> PickScorer:
    """PickScore_v1 and the CLIP-H processor from local paths or the HF cache (never downloaded)."""
    from transformers import AutoProcessor, CLIPModel  # lazy: transformers takes seconds to import, `ahpa evaluate` needs it only here

    model_dir = resolve_local_model(model_path, "PickScore model", need_tokenizer=False)
    proc_dir = resolve_local_model(processor_path, "PickScore processor (CLIP-ViT-H-14)", processor=True)
    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(proc_dir, local_files_only=True)
            model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise AhpaError(f"cannot load PickScore from {model_dir} / {proc_dir}: {err}") from None
    return PickScorer(model.to(device), processor, source=f"{model_path} + {processor_path}")


def sample_prompts(npz_path: str | os.PathLike) -> list[str]:
    """The ``prompts`` array of a sample file, or one clear error."""
    with np.load(npz_path, allow_pickle=False) as data:
        if PROMPTS_KEY not in data.files:
            raise AhpaError(f"{npz_path} holds no '{PROMPTS_KEY}' array, so PickScore has no text to score against; "
                            "draw the samples with `ahpa sample --prompts ...` (it stores them)")
        prompts = [str(p) for p in data[PROMPTS_KEY]]
        n = data["arr_0"].shape[0] if "arr_0" in data.files else -1
    if len(prompts) != n:
        raise AhpaError(f"{npz_path} holds {n} images but {len(prompts)} prompts; the file is damaged")
    return prompts


def pickscore_of_file(npz_path: str | os.PathLike, scorer: PickScorer, batch_size: int = 64, progress: bool = True) -> dict:
    """Mean PickScore of a sample file's (prompt, image) pairs."""
    prompts = sample_prompts(npz_path)
    images = open_npz_images(npz_path)
    total, n = 0.0, 0
    with tqdm(total=len(prompts), unit="img", desc="PickScore", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            s = scorer.scores(batch, prompts[n : n + len(batch)])
            total += float(s.double().sum())
            n += len(batch)
            bar.update(len(batch))
    return {"pickscore": total / n, "pickscore_pairs": n, "pickscore_weights": scorer.source}


def run_t2i_eval(args: argparse.Namespace) -> int:
    """``ahpa evaluate SAMPLES.npz --coco-ref COCO [--pickscore PATH --pickscore-processor PATH]``."""
    if args.ref:
        raise AhpaError("pass either --ref (an ADM reference batch) or --coco-ref (COCO val2014 statistics), not both")
    if args.csv:
        raise AhpaError("--csv collects ADM metrics (--ref); text-to-image results go to --out or SAMPLES.t2i.json")
    # Every input is checked before any weights are looked up or anything is written.
    device = check_arguments(args, suffix=".t2i.json")
    samples = [open_npz_images(p) for p in args.samples]
    if args.pickscore:
        for p in args.samples:
            sample_prompts(p)  # a file without prompts
        # missing weights are reported before the (long) FID pass, not after it
        resolve_local_model(args.pickscore, "PickScore model", need_tokenizer=False)
        resolve_local_model(args.pickscore_processor or PICKSCORE_PROCESSOR, "PickScore processor (CLIP-ViT-H-14)", processor=True)
    if args.coco_ref:
        for s in samples:
            coco_reference_images(args.coco_ref, s.resolution[0])
    results = [{"samples": str(s.path), "num_samples": len(s)} for s in samples]
    if args.coco_ref:
        extractor = load_inception(args.inception, device)
        for s, r in zip(samples, results):
            mu_r, sigma_r, entry = coco_reference_statistics(args.coco_ref, extractor, s.resolution[0],
                                                             cache_dir=args.cache_dir, batch_size=args.batch)
            mu, sigma = feature_statistics(cached_features(s, extractor, args.cache_dir, args.batch)["pool"])
            r |= {"coco_fid": frechet_distance(mu, sigma, mu_r, sigma_r), "reference": str(entry),
                  "weights_source": extractor.source}
    if args.pickscore:
        scorer = load_pickscore(args.pickscore, args.pickscore_processor or PICKSCORE_PROCESSOR, device)
        for s, r in zip(samples, results):
            r |= pickscore_of_file(s.path, scorer, args.batch)
    if args.out:
        write_json_atomic(args.out, results[0] if len(results) == 1 else {"results": results}, indent=2)
    else:
        for r in results:
            write_json_atomic(Path(r["samples"]).with_suffix(".t2i.json"), r, indent=2)
    for r in results:
        parts = [f"COCO FID {r['coco_fid']:.3f}" if "coco_fid" in r else "", f"PickScore {r['pickscore']:.3f}" if "pickscore" in r else ""]
        print(f"{r['samples']}: {'  '.join(p for p in parts if p)}  ({r['num_samples']} samples)", file=sys.stdout)
    return 0
