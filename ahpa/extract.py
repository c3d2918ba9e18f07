"""``ahpa extract``: the command of the feature-cache extractor (:mod:`ahpa.data.extract`).

It builds the VAE, the hierarchical prior and the optional teacher from the config and the flags
(:mod:`ahpa.build`), then runs the extractor; ``--verify`` checks a finished cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ahpa import preemption
from ahpa.build import build_prior, build_teacher, build_vae, latent_geometry
from ahpa.config import CHOICES, INCEPTION_GROUP, LATENT_GROUP, TEACHER_GROUP, TEACHER_GROUPS, Config, load_config
from ahpa.data.cache import read_manifest, verify_cache
from ahpa.data.captions import extract_text_cache, read_text_manifest, verify_text_cache
from ahpa.data.coco import CocoImages
from ahpa.data.extract import MANIFEST, extract_cache
from ahpa.data.projection import ProjectionSpec
from ahpa.errors import AhpaError
from ahpa.io import LOCK_FILE, RunLock, check_output_dir, lock_message
from ahpa.priors.text import load_clip_text_encoder


def run(args: argparse.Namespace) -> int:
    if args.verify:
        problems = verify_cache(args.verify, checksum=not args.quick)
        for problem in problems:
            print(f"  {problem}")
        if problems:
            raise AhpaError(f"feature cache '{args.verify}' failed verification ({len(problems)} problem(s) listed above); "
                            "rerun the `ahpa extract IMAGE_DIR --out CACHE` command to redo exactly the damaged shards "
                            "(add --checksums for a cache written before xxh3_64 checksums)")
        manifest = read_manifest(args.verify)
        print(f"ok: {manifest['count']} items in {len(manifest['shards'])} shards ({'sizes and headers' if args.quick else 'sha256'} verified)")
        text = Path(args.verify) / "text"
        if text.is_dir():  # the caption embeddings of `ahpa extract --coco`

            problems = [] if args.quick else verify_text_cache(text)  # sizes always (read_text_manifest), sha256 unless --quick
            for problem in problems:
                print(f"  {text}/{problem}")
            if problems:
                raise AhpaError(f"text cache '{text}' failed verification ({len(problems)} problem(s) listed above); "
                                f"delete {text} and rerun the `ahpa extract --coco` command to rebuild it")
            print(f"ok: {read_text_manifest(text)['count']} caption embeddings in {text} "
                  f"({'sizes' if args.quick else 'sha256'} verified)")
        return 0
    if not args.image_dir or not args.out:
        raise AhpaError("usage: ahpa extract IMAGE_DIR --out CACHE (or ahpa extract --verify CACHE)")
    for flag, value, low in (("--shard-size", args.shard_size, 1), ("--batch", args.batch, 1), ("--workers", args.workers, 0),
                             ("--resolution", args.resolution, 8), ("--grid", args.grid, 1)):
        if value is not None and value < low:
            raise AhpaError(f"{flag} must be at least {low} (got {value})")
    check_output_dir(args.out, "--out")
    cfg = load_config(args.config, [f"data.path={args.image_dir}"]) if args.config else Config()
    resolution = args.resolution or cfg.data.resolution
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    coco_images = text_encoder = None
    if args.coco:  # MS-COCO 2014 (App. C): y = the image's index; the CLIP embeddings of its captions go to OUT/text

        # a folder without captions, an image without a caption, missing CLIP weights: refused before anything is written
        coco_images = CocoImages(args.image_dir, args.coco_split, resolution)
        text_encoder = load_clip_text_encoder(args.text_encoder or cfg.text.encoder, device=device)
    elif args.text_encoder:
        raise AhpaError("--text-encoder is for --coco (the caption embeddings of an MS-COCO cache)")
    vae = build_vae(cfg, device, path=args.vae)
    grid = args.grid or latent_geometry(cfg, vae, resolution)[1]
    groups = args.groups.split(",") if args.groups else list(cfg.prior.groups)
    if args.teacher_layer:
        cfg.teacher.layer = args.teacher_layer
    teacher_name = args.teacher or (cfg.teacher.model if TEACHER_GROUP in groups else INCEPTION_GROUP if INCEPTION_GROUP in groups else None)
    teacher = None
    if teacher_name:  # a teacher's features beside the VAE's (group "dinov2" or "inception"); "latent" is derived, never stored
        teacher = build_teacher(cfg, grid, device, name=teacher_name, weights=args.teacher_weights)
    for key in ("grouping", "split", "resample"):  # the flags win over the config
        if getattr(args, key):
            setattr(cfg.prior, key, getattr(args, key))
    prior = build_prior(cfg, vae, grid, [g for g in groups if g not in (*TEACHER_GROUPS, LATENT_GROUP)])
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    projection = ProjectionSpec.parse(args.project, images=args.pca_images, seed=args.project_seed, normalize=cfg.prior.normalize,
                                      normalize_alpha=cfg.prior.normalize_alpha) if args.project else None
    # one writer per rank of a world size (ranks write disjoint shards); io.RunLock
    # SIGTERM/SIGUSR1: stop after the shard in flight is written, exit 75 (ahpa/preemption.py)
    with preemption.handlers(), RunLock(args.out, "ahpa extract", name=LOCK_FILE if world == 1 else f"{LOCK_FILE}.rank{rank}-of-{world}") as lock:
        if lock_message(lock):
            print(lock_message(lock))
        manifest = extract_cache(
            args.image_dir, args.out, prior, resolution, dtype=args.dtype, flip_both=args.flip_both,
            shard_size=args.shard_size, batch_size=args.batch, rank=rank, world=world, workers=workers,
            teacher=teacher, checksums=args.checksums, images=coco_images, projection=projection,
        )  # fmt: skip
        if coco_images is not None and manifest is not None:  # the caption embeddings, once the image cache is complete

            coco = coco_images.coco
            text = extract_text_cache(coco.flat, coco.offsets, text_encoder, Path(args.out) / "text",
                                      describe={"split": args.coco_split, "file_list_sha256": coco_images.file_list_hash()})
            print(f"wrote {Path(args.out) / 'text'}: {text['count']} caption embeddings of {len(coco)} images "
                  f"({text['truncated']} truncated to 77 CLIP tokens)")
    if manifest is not None:
        info = manifest["images"]
        print(
            f"wrote {args.out}: {manifest['count']} items in {len(manifest['shards'])} shards; "
            f"{len(info['failed'])} undecodable files skipped, {len(info['empty_classes'])} empty classes, "
            f"{sum(info['converted'].values())} converted to RGB, {info['upsampled']} upsampled (details in {MANIFEST})"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("extract", help="precompute latents and hierarchical VAE features into a feature cache")
    p.add_argument("image_dir", nargs="?", help="ImageNet-layout folder: one subfolder per class")
    p.add_argument("--out", help="cache directory (rerun the same command to resume)")
    p.add_argument("--verify", metavar="CACHE", help="check a finished cache (sizes, counts, sha256) instead of extracting")
    p.add_argument("--quick", action="store_true", help="with --verify: sizes and headers only, no sha256")
    p.add_argument("--checksums", action="store_true",
                   help="on a finished cache: also check each shard's sha256 (else sizes, headers and xxh3_64) and redo the damaged ones")
    p.add_argument("--config", help="YAML config; its data/vae/prior settings are defaults for the flags below")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: config, 256)")
    p.add_argument("--vae", help="VAE: local diffusers dir, cached HF repo id, or 'tiny' (default: config)")
    p.add_argument("--groups", help="comma-separated groups, e.g. G3,G4 (default: config)")
    p.add_argument("--split", choices=("4/4", "2/6", "6/2"), help="SD-VAE 512-channel layers in G3/G4")
    p.add_argument("--grouping", choices=("auto", "sd_vae", "resolution"))
    p.add_argument("--resample", choices=("area", "bilinear"))
    p.add_argument("--grid", type=int, help="token grid side (default: resolution / VAE factor / model patch)")
    p.add_argument("--teacher", choices=(*(f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")), INCEPTION_GROUP),
                   help="also cache a teacher's features: REPA's DINOv2 (group dinov2) or the evaluator's Inception-v3 (group "
                        "inception); default: the teacher group of the config's prior.groups")
    p.add_argument("--teacher-layer", choices=CHOICES["teacher.layer"],
                   help="Inception block for --teacher inception (default: config teacher.layer, Mixed_6e)")
    p.add_argument("--teacher-weights", help="DINOv2 weight file (default: config teacher.weights, else the torch-hub / HF cache)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "int8"), default="float16", help="feature storage")
    p.add_argument("--project", metavar="pca:K|random:K",
                   help="store K channels per group: P norm(F), one matrix per group (docs/projected-caches.md)")
    p.add_argument("--pca-images", type=int, default=1024, help="with --project pca:K: images the PCA is fitted on")
    p.add_argument("--project-seed", type=int, default=0, help="with --project: seed of the PCA image subset / random matrix")
    p.add_argument("--flip-both", action="store_true", help="also store the horizontally flipped image's features")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    p.add_argument("--batch", type=int, default=32, help="encoder batch size")
    p.add_argument("--workers", type=int, help="image decoding processes (default: min(8, CPUs))")
    p.add_argument("--coco", action="store_true", help="IMAGE_DIR is an MS-COCO 2014 root: also cache the CLIP embeddings of every caption (OUT/text)")
    p.add_argument("--coco-split", choices=("train2014", "val2014"), default="train2014", help="COCO split (with --coco)")
    p.add_argument("--text-encoder", help="CLIP text model for --coco (default: config text.encoder)")
    p.set_defaults(func=run)
