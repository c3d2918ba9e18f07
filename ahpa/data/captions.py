"""Captioned training batches: ``batch["y"]`` becomes the text context ``[b, T, 768]`` (Appendix C).

A :class:`CaptionSource` wraps any image source of ``batches.py`` whose ``y`` is an
image (or caption-class) index into a caption table, and replaces ``y`` by the
CLIP embedding of one caption per image, drawn from the step's generator
(:func:`ahpa.data.coco.draw_caption_rows`).  Embeddings come from a text cache
written by ``ahpa extract --coco`` (:func:`extract_text_cache`), or are encoded on
the device with the text encoder.  The empty prompt's embedding is
``null_context``, the null condition the MMDiT holds for CFG and dropout.

Text cache layout (``OUT/text/``): ``shards/<k>.safetensors`` (``context`` float16
``[n, 77, 768]``, rows of the flat caption table in order), ``progress/<k>.json``
(a shard's commit point, so a killed run resumes), and ``text.json`` (the manifest,
written last: captions, per-image offsets, the encoder, the truncation count,
the shards' sizes and sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ahpa.config import Config
from ahpa.data.coco import draw_caption_rows
from ahpa.errors import AhpaError
from ahpa.io import atomic_path, file_sha256, remove_stale_temps, write_json_atomic
from ahpa.priors.text import load_clip_text_encoder

TEXT_MANIFEST = "text.json"
TEXT_FORMAT = "ahpa-text-cache"


class TensorTextStore:
    """Embeddings held in memory ``[n_captions, T, D]`` (the toy set)."""

    def __init__(self, embeddings: Tensor):
        self.embeddings = embeddings

    def lookup(self, rows: Tensor, device) -> Tensor:
        return self.embeddings[rows.cpu()].to(device, torch.float32)


class EncoderTextStore:
    """Captions encoded on the fly by the text encoder (no text cache)."""

    def __init__(self, encoder, captions: list[str]):
        self.encoder, self.captions = encoder, captions

    def lookup(self, rows: Tensor, device) -> Tensor:
        emb, _ = self.encoder.encode([self.captions[i] for i in rows.tolist()])
        return emb.to(device, torch.float32)


class CachedTextStore:
    """Rows of a text cache's safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_text_manifest(path)
        self.bounds = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]])
        self._files: dict[int, object] = {}

    def _open(self, k: int):
        if k not in self._files:
            self._files[k] = safe_open(os.fspath(self.path / self.manifest["shards"][k]["file"]), framework="pt")
        return self._files[k]

    def null_context(self) -> Tensor:
        """The empty prompt's embedding written beside the shards (``null.safetensors``)."""
        return load_file(os.fspath(self.path / "null.safetensors"))["context"]

    def lookup(self, rows: Tensor, device) -> Tensor:
        out = []
        for r in rows.tolist():
            k = int(np.searchsorted(self.bounds, r, side="right") - 1)
            i = r - int(self.bounds[k])
            out.append(self._open(k).get_slice("context")[i : i + 1])
        return torch.cat(out).to(device, torch.float32)


def read_text_manifest(path: str | os.PathLike) -> dict:
    file = Path(path) / TEXT_MANIFEST
    if not file.is_file():
        raise AhpaError(f"'{path}' is not a finished text cache ({TEXT_MANIFEST} missing); run `ahpa extract --coco ...` "
                        "(rerun the same command to finish an interrupted one)")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != TEXT_FORMAT:
        raise AhpaError(f"{file} is not an ahpa text cache (format {manifest.get('format')!r})")
    for shard in manifest["shards"]:
        f = Path(path) / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["bytes"]:
            raise AhpaError(f"text cache shard {f} is missing or has the wrong size; re-extract the text cache")
    return manifest


def extract_text_cache(captions: list[str], offsets: np.ndarray, encoder, out: str | os.PathLike, *,
                       shard_size: int = 4096, batch_size: int = 256, progress: bool = True,
                       stop_after: int | None = None, describe: dict | None = None) -> dict | None:
    """Embed every caption once into a resumable, verified text cache; returns the manifest when complete.

    ``stop_after``: return after this many shards, as if killed (tests).
    """
    out = Path(out)
    plan = {"format": TEXT_FORMAT, "encoder": encoder.describe(), "count": len(captions), "shard_size": shard_size,
            "captions_sha256": captions_hash(captions), **(describe or {})}
    for sub in ("shards", "progress"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    remove_stale_temps(plan_file)
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        changed = sorted(k for k in plan.keys() | old.keys() if plan.get(k) != old.get(k))
        if changed:
            raise AhpaError(f"'{out}' holds a text cache made with other settings ({', '.join(changed)} differ); "
                            "use the original settings or another directory")
    else:
        write_json_atomic(plan_file, plan)
    if (out / TEXT_MANIFEST).is_file():
        return read_text_manifest(out)
    num_shards = (len(captions) + shard_size - 1) // shard_size
    report = {"truncated": 0, "examples": []}
    done = 0
    bar = tqdm(total=len(captions), unit="caption", desc="text embeddings", disable=not progress)
    for k in range(num_shards):
        lo, hi = k * shard_size, min(len(captions), (k + 1) * shard_size)
        record_file = out / "progress" / f"{k:06d}.json"
        shard_file = out / "shards" / f"{k:06d}.safetensors"
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if shard_file.is_file() and shard_file.stat().st_size == record["bytes"]:
                bar.update(hi - lo)
                continue
        remove_stale_temps(shard_file)
        remove_stale_temps(record_file)
        emb, trunc = encoder.encode(captions[lo:hi], batch_size=batch_size)
        with atomic_path(shard_file) as tmp:
            save_file({"context": emb.to("cpu", torch.float16).contiguous()}, tmp)
        record = {"file": f"shards/{k:06d}.safetensors", "count": hi - lo, "bytes": shard_file.stat().st_size,
                  "sha256": file_sha256(shard_file), "truncated": trunc.truncated, "examples": trunc.examples}
        write_json_atomic(record_file, record)
        bar.update(hi - lo)
        done += 1
        if stop_after is not None and done >= stop_after:
            bar.close()
            return None
    bar.close()
    records = [json.loads((out / "progress" / f"{k:06d}.json").read_text()) for k in range(num_shards)]
    for r in records:
        report["truncated"] += r["truncated"]
        report["examples"] = (report["examples"] + r["examples"])[:3]
    null, _ = encoder.encode([""])
    manifest = {**plan, "captions": list(captions), "offsets": [int(o) for o in offsets],
                "truncated": report["truncated"], "truncated_examples": report["examples"],
                "shards": [{k: r[k] for k in ("file", "count", "bytes", "sha256")} for r in records]}
    with atomic_path(out / "null.safetensors") as tmp:
        save_file({"context": null.to("cpu", torch.float32).contiguous()}, tmp)
    write_json_atomic(out / TEXT_MANIFEST, manifest)
    if report["truncated"] and progress:
        print(f"ahpa extract: {report['truncated']} of {len(captions)} captions exceed 77 CLIP tokens and were truncated "
              f"(first: {report['examples'][0][:80]!r})")
    return manifest


def verify_text_cache(path: str | os.PathLike) -> list[str]:
    """Problems of a finished text cache (sha256 of every shard), empty when sound."""
    manifest = read_text_manifest(path)
    return [f"{s['file']}: sha256 mismatch" for s in manifest["shards"] if file_sha256(Path(path) / s["file"]) != s["sha256"]]


def captions_hash(captions: list[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()


class CaptionSource:
    """An image source with captions: ``y`` (image index) -> text context of one drawn caption."""

    def __init__(self, inner, offsets: np.ndarray, captions: list[str], store, null: Tensor, context_tokens: int):
        self.inner, self.store, self.captions = inner, store, captions
        self.offsets = torch.as_tensor(np.asarray(offsets), dtype=torch.long)
        self.context_tokens = int(context_tokens)
        if not 1 <= self.context_tokens <= null.shape[1]:
            raise AhpaError(f"text.context_tokens={context_tokens} must lie in 1..{null.shape[1]}")
        self.null_context = null[:, : self.context_tokens].float().cpu()
        self.context_shape = tuple(self.null_context.shape[1:])
        self.num_classes = 0  # no class labels: the condition is text
        self.step = 0

    def __getattr__(self, name):  # latent_shape, group_shapes, decode, sample_latent, ... of the image source
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def start(self, step: int) -> None:
        self.step = step
        self.inner.start(step)

    def caption_rows(self, image_index: Tensor, step: int) -> Tensor:
        cfg = self.inner.cfg
        if int(image_index.max()) + 1 >= len(self.offsets):
            raise AhpaError(f"the image source has index {int(image_index.max())} but the caption table covers "
                            f"{len(self.offsets) - 1} images; the cache and the captions belong to different data")
        return draw_caption_rows(image_index, self.offsets, cfg.train.seed, step, cfg.train.global_batch,
                                 self.inner.rank, self.inner.per_rank)

    def embed_rows(self, rows: Tensor, device) -> Tensor:
        return self.store.lookup(rows, device)[:, : self.context_tokens]

    def next_batch(self) -> dict:
        batch = self.inner.next_batch()
        rows = self.caption_rows(batch["y"], self.step)
        self.step += 1
        return {**batch, "y": self.embed_rows(rows, self.inner.device), "caption_rows": rows}

    def grid_captions(self, rows: int = 10) -> list[int]:
        """Caption rows of the sample grid: the first caption of up to ``rows`` images spread over the table."""
        n = len(self.offsets) - 1
        picks = np.linspace(0, n - 1, min(rows, n)).round().astype(int)
        return [int(self.offsets[i]) for i in picks]


def toy_text_embeddings(cfg: Config, captions: list[str], device) -> tuple[Tensor, Tensor]:
    """Embeddings of the toy captions and of the empty prompt, cached in ``OUT/text_embeddings.safetensors``."""
    file = Path(cfg.train.out) / "text_embeddings.safetensors"
    key = json.dumps({"encoder": cfg.text.encoder, "captions": captions_hash(captions)})
    if file.is_file():
        with safe_open(os.fspath(file), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                data = load_file(os.fspath(file))
                return data["captions"], data["null"]
    encoder = load_clip_text_encoder(cfg.text.encoder, device=device)
    emb, report = encoder.encode(list(captions) + [""])
    if report.line():
        print(f"note: {report.line()}")
    emb = emb.cpu()
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp:
        save_file({"captions": emb[:-1].contiguous(), "null": emb[-1:].contiguous()}, tmp, metadata={"key": key})
    return emb[:-1], emb[-1:]
