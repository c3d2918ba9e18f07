"""SiT weights in and out: our ``ema.safetensors``, published SiT and REPA ``.pt`` files.

docs/design.md section 1: state dicts keep the public SiT/REPA key names, so a published
checkpoint loads into :class:`~ahpa.models.sit.SiT` after only removing wrapper
prefixes and REPA's projectors.  The architecture is read off the tensor shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ahpa.errors import AhpaError
from ahpa.io import atomic_path
from ahpa.models.sit import SIT_CONFIGS, SiT, build_sit

META_KEY = "ahpa_meta"  # safetensors metadata entry holding the json meta of an ema.safetensors
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# Published checkpoints were sampled with SD-VAE (ft-EMA) latents scaled by 0.18215.
_PUBLISHED_LATENTS = dict(vae="stabilityai/sd-vae-ft-ema", scaling_factor=0.18215, latent_shift=None,
                          latent_scale=None)


def strip_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _unwrap(checkpoint: Mapping) -> Mapping:
    """The model state dict inside a training checkpoint (``ema`` preferred over ``model``)."""
    if not isinstance(checkpoint, Mapping):
        raise AhpaError(f"expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    for key in ("ema", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def convert_state_dict(sd: Mapping) -> dict[str, Tensor]:
    """Plain SiT keys from an original SiT, REPA or ahpa state dict or training checkpoint.

    Takes ``ema`` from ``{"model", "ema", "opt", "args"}`` dicts, strips ``module.`` /
    ``_orig_mod.`` prefixes, drops REPA's ``projectors.*`` and renumbers REPA's legacy
    ``decoder_blocks.i`` as ``blocks.(encoder_depth + i)``.
    """
    state = {strip_prefixes(k): v for k, v in _unwrap(sd).items() if isinstance(v, Tensor)}
    state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    encoder_depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})

    def renumber(match: re.Match) -> str:
        return f"blocks.{encoder_depth + int(match.group(1))}."

    return {re.sub(r"^decoder_blocks\.(\d+)\.", renumber, k): v for k, v in state.items()}


def infer_architecture(state: Mapping[str, Tensor]) -> dict:
    """Architecture of a converted state dict, read from its tensor shapes.

    Returns model (registry name, or None when no registry size matches), depth,
    hidden_size, patch_size, in_channels, input_size, num_classes (embedding rows
    minus the null class), embedding_rows, learn_sigma.
    """
    required = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        keys = ", ".join(list(state)[:6]) or "none"
        raise AhpaError(f"not a SiT state dict: tensor '{missing[0]}' is missing (first keys: {keys}); "
                        "pass an ahpa ema.safetensors or a published SiT/REPA checkpoint")
    tokens, hidden = state["pos_embed"].shape[-2:]
    out_features = state["final_layer.linear.weight"].shape[0]
    _, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    grid = round(tokens**0.5)
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    arch = dict(depth=len(block_ids), hidden_size=hidden, patch_size=patch, in_channels=in_channels,
                input_size=grid * patch, num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                embedding_rows=state["y_embedder.embedding_table.weight"].shape[0],
                learn_sigma=out_features == 2 * in_channels * patch * patch)
    names = [n for n, c in SIT_CONFIGS.items()
             if (c["depth"], c["hidden_size"], c["patch_size"]) == (arch["depth"], hidden, patch)]
    return dict(model=names[0] if names else None, **arch)


def _describe(arch: dict) -> str:
    keys = ("depth", "hidden_size", "patch_size", "in_channels", "input_size", "num_classes", "learn_sigma")
    return ", ".join(f"{k}={arch[k]}" for k in keys) + (f" ({arch['model']})" if arch["model"] else "")


def _check_shapes(model: SiT, state: Mapping[str, Tensor], arch: dict, source: Path) -> None:
    """AhpaError naming the first tensor where ``state`` and ``model`` disagree."""
    expected = model.state_dict()
    problem = None
    # pos_embed last: its shape follows from patch size and input size, named by other tensors first.
    for key, tensor in sorted(expected.items(), key=lambda item: item[0] == "pos_embed"):
        if key not in state:
            problem = f"the checkpoint lacks tensor '{key}' that {model.name} needs"
        elif state[key].shape != tensor.shape:
            problem = (f"tensor '{key}' has shape {list(state[key].shape)} in the checkpoint but {model.name} "
                       f"(input_size={model.input_size}, num_classes={model.num_classes}) expects {list(tensor.shape)}")
        if problem:
            break
    extra = [k for k in state if k not in expected]
    if problem is None and extra:
        problem = f"the checkpoint has tensor '{extra[0]}' that {model.name} does not have"
    if problem:
        raise AhpaError(f"{source}: {problem}; the checkpoint looks like {_describe(arch)}; "
                        "pass the matching model name (or none, to infer it)")


_WHAT_TO_PASS = "pass a run directory, RUN/checkpoints/<step>/, its ema.safetensors, or a published SiT/REPA .pt"  # as ahpa.runs says


def torch_load(path: Path) -> Mapping:
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise AhpaError(f"'{path}' is not a PyTorch checkpoint; {_WHAT_TO_PASS}")
    # REPA and SiT training checkpoints carry their argparse.Namespace under "args".
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AhpaError(f"'{path}' holds Python objects besides tensors, which torch.load(weights_only=True) refuses for safety; if you trust "
                        "the file, re-save its weights alone, e.g. torch.save(ckpt['ema'], 'ema.pt'), and pass that") from None
    except Exception:  # torch raises many types on a damaged archive
        raise AhpaError(f"'{path}' is not a readable PyTorch checkpoint (damaged or truncated?); {_WHAT_TO_PASS}") from None


def save_ema_safetensors(model: nn.Module, path: str | os.PathLike, meta: dict) -> None:
    """Write ``model``'s weights (plain SiT keys) and ``meta`` as json to ``path``, atomically.

    ``meta``: what sampling needs, from :func:`ahpa.build.weights_meta` (the one definition all writers use)."""
    path = Path(path)
    state = {strip_prefixes(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {META_KEY: json.dumps(meta, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)


def load_published_or_ahpa_sit(path: Path, meta: dict, model_name: str | None = None, num_classes: int | None = None,
                               input_size: int | None = None) -> tuple[SiT, dict]:
    """A float32 SiT in eval mode on the CPU, and its meta (model, sizes, VAE, time_convention).

    ``path``: an ahpa ``.safetensors`` (with its ``meta``, read by :mod:`ahpa.runs`) or a published SiT /
    REPA ``.pt``.  Missing arguments are inferred from the tensor shapes.  A published
    checkpoint with REPA projectors is time_convention "repa" (t=0 data), one
    without is original SiT, "sit" (t=0 noise); ours record theirs in the meta.
    """
    if path.suffix == ".safetensors":
        try:
            raw = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise AhpaError(f"cannot read safetensors file '{path}' ({e}): it is not a safetensors checkpoint or it is truncated; {_WHAT_TO_PASS}") from None
    else:
        raw = _unwrap(torch_load(path))
        is_repa = any(strip_prefixes(k).startswith("projectors.") for k in raw)
        meta = dict(_PUBLISHED_LATENTS, time_convention="repa" if is_repa else "sit")
    state = convert_state_dict(raw)
    arch = infer_architecture(state)
    name = model_name or meta.get("model") or arch["model"]
    if name is None:
        raise AhpaError(f"{path}: the tensor shapes match no known SiT model; the checkpoint looks like "
                        f"{_describe(arch)}; known models: {', '.join(SIT_CONFIGS)}")
    # The meta knows a model trained without a null class; shapes alone assume one.
    classes = num_classes or meta.get("num_classes") or arch["num_classes"]
    with torch.device("meta"):  # shapes first, no initialisation; weights are assigned below
        model = build_sit(name, input_size or arch["input_size"], in_channels=arch["in_channels"], num_classes=classes,
                          class_dropout=0.1 if arch["embedding_rows"] == classes + 1 else 0.0,
                          learn_sigma=arch["learn_sigma"])
    _check_shapes(model, state, arch, path)
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    meta = dict(meta, model=name, input_size=model.input_size, in_channels=model.in_channels,
                num_classes=model.num_classes, learn_sigma=model.learn_sigma)
    meta.setdefault("time_convention", "repa")
    return model.eval(), meta
