"""Reading a run: the one place that resolves a path a user gives, owns the file names of a checkpoint,
verifies what it reads, and loads the model, the EMA, the alignment objective, the config and the meta.

A path may be

- a run directory (``RUN/``, holding ``checkpoints/``): its newest complete checkpoint;
- a checkpoint directory (``RUN/checkpoints/0050000/``);
- a weights file: an ``ema.safetensors`` / ``model.safetensors`` (inside a checkpoint or exported),
  or a published SiT / REPA ``.pt``.

Every weights file read from a training checkpoint is checked against the size and sha256 its
``manifest.json`` records (the write side is :mod:`ahpa.checkpointing`), and weights holding a
NaN/Inf are refused.  Sampling, evaluation, the diagnostics and the study all read through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ahpa.build import build_for_shapes, build_objective
from ahpa.checkpointing import MANIFEST, first_nonfinite, latest_checkpoint
from ahpa.config import Config, config_from_dict, parse_overrides, set_key, validate
from ahpa.errors import AhpaError
from ahpa.io import file_sha256
from ahpa.models.checkpoints import META_KEY, load_published_or_ahpa_sit
from ahpa.models.mmdit import build_mmdit

EMA_FILE = "ema.safetensors"  # EMA weights + meta: all that sampling needs (the export)
MODEL_FILE = "model.safetensors"  # online weights
OBJECTIVE_FILE = "objective.safetensors"  # router + projection heads (absent for vanilla)
CONFIG_FILE = "config.yaml"
WEIGHTS = {"ema": EMA_FILE, "online": MODEL_FILE}
WHAT_TO_PASS = "pass a run directory, RUN/checkpoints/<step>/, its ema.safetensors, or a published SiT/REPA .pt"


# ---------------------------------------------------------------------- paths
def checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run directory -> its newest complete checkpoint; a checkpoint directory -> itself."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise AhpaError(f"run directory {p} holds no complete checkpoint; pass RUN/checkpoints/<step>")
        return found
    if not (p / CONFIG_FILE).is_file() or not (p / MODEL_FILE).is_file():
        raise AhpaError(f"'{p}' is not a checkpoint directory (needs {CONFIG_FILE} and {MODEL_FILE}) nor a run directory with checkpoints/")
    return p


def weights_file(path: str | os.PathLike, weights: str = "ema") -> Path:
    """The weights file a path names: a file as given, or the ``weights`` file ("ema" | "online") of a run or checkpoint."""
    p = Path(path)
    if p.is_dir():
        p = (checkpoint_dir(p) if (p / "checkpoints").is_dir() else p) / WEIGHTS[weights]
    if not p.is_file():
        raise AhpaError(f"checkpoint '{p}' does not exist; {WHAT_TO_PASS}")
    return p


def verify_file(file: Path) -> None:
    """A weights file inside a training checkpoint must match the size and sha256 its manifest records."""
    try:
        record = json.loads((file.parent / MANIFEST).read_text())["files"][file.name]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest (a published or older file): nothing to check against
    if file.stat().st_size != record["bytes"] or file_sha256(file) != record["sha256"]:
        raise AhpaError(f"{file} does not match the size/sha256 in {file.parent / MANIFEST}: the file is damaged; "
                        "use another checkpoint of the run")


def refuse_nonfinite(model: nn.Module, where) -> None:
    bad = first_nonfinite(model)
    if bad is not None:
        raise AhpaError(f"{where} holds NaN/Inf weights (first: tensor '{bad}'): its training diverged and its samples "
                        "would be blank; use an earlier checkpoint")


# ---------------------------------------------------------------------- config and meta
def read_config(ckpt: Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a checkpoint was trained with, plus ``section.key=value`` overrides."""
    path = Path(ckpt) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError:
        raise AhpaError(f"{path} is missing: {ckpt} is not a checkpoint of an ahpa run") from None
    except yaml.YAMLError as err:
        raise AhpaError(f"{path} is not valid YAML: {err}") from None
    cfg = config_from_dict(data)
    for key, value in parse_overrides(overrides or []):
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def read_meta(path: str | os.PathLike) -> dict:
    """The meta json a weights file carries (model, sizes, VAE, latent normalisation, conditioning); {} if absent."""
    file = weights_file(path)
    if file.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AhpaError(f"cannot read safetensors file '{file}' ({e}): it is not a safetensors checkpoint or it is truncated; {WHAT_TO_PASS}") from None
    return json.loads(metadata[META_KEY]) if META_KEY in metadata else {}


def is_text_to_image(path: str | os.PathLike) -> bool:
    """True for an ahpa checkpoint of an MMDiT (its meta names the model)."""
    p = Path(path)
    if p.suffix == ".pt" or not (p.is_dir() or p.suffix == ".safetensors"):
        return False
    try:
        return str(read_meta(p).get("model", "")).startswith("MMDiT")
    except AhpaError:
        return False


# ---------------------------------------------------------------------- modules
def load_state(module: nn.Module, file: Path, what: str) -> None:
    """Load a safetensors file into ``module``, verified against its checkpoint manifest; a mismatch names the first key."""
    if not file.is_file():
        raise AhpaError(f"{file} is missing: the checkpoint has no {what}")
    verify_file(file)
    state = load_file(str(file))
    own = module.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise AhpaError(f"{what} in {file} does not fit the architecture of its {CONFIG_FILE} (first mismatch: '{bad[0]}')")
    module.load_state_dict(state)


def load_backbone(path: str | os.PathLike, weights: str = "ema", model_name: str | None = None,
                  num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """A float32 SiT or MMDiT in eval mode on the CPU, and its meta, from any path this module accepts.

    Verified against the checkpoint manifest and refused when it holds NaN/Inf."""
    file = weights_file(path, weights)
    verify_file(file)
    meta = read_meta(file)
    if str(meta.get("model", "")).startswith("MMDiT"):
        with torch.device("meta"):
            model = build_mmdit(meta["model"], meta["input_size"], in_channels=meta["in_channels"],
                                context_tokens=meta["context_tokens"], context_dim=meta["context_dim"])
        state = load_file(str(file))
        missing = sorted(set(model.state_dict()) - set(state))
        if missing:
            raise AhpaError(f"{file}: tensor '{missing[0]}' of {meta['model']} is missing; the checkpoint is damaged")
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        model = model.eval()
    else:
        model, meta = load_published_or_ahpa_sit(file, meta, model_name=model_name, num_classes=num_classes)
    refuse_nonfinite(model, path)
    return model, meta


def load_objective(path: str | os.PathLike, cfg: Config | None = None, group_shapes: dict | None = None):
    """(config, trained alignment objective in eval mode) of a run or checkpoint; the objective is None for vanilla.

    The backbone is built on the meta device (the objective needs only its width, grid and depth) and the
    group shapes come from the VAE's architecture (``ahpa.build.build_for_shapes``), unless given."""
    ckpt = checkpoint_dir(path)
    cfg = cfg or read_config(ckpt)
    if cfg.align.method == "vanilla":
        return cfg, None
    with torch.device("meta"):
        built = build_for_shapes(cfg)
    objective = build_objective(cfg, built.model, group_shapes or built.group_shapes)
    if len(objective.state_dict()):
        load_state(objective, ckpt / OBJECTIVE_FILE, "alignment objective")
    return cfg, objective.eval()
