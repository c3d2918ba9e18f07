"""Training checkpoints that survive a kill at any moment.

Layout (one directory per saved step)::

    RUN/checkpoints/0050000/
        ema.safetensors        EMA SiT weights + meta: all that sampling needs (the export)
        model.safetensors      online SiT weights
        objective.safetensors  router + projection head(s) (absent for vanilla)
        optimizer.pt           AdamW state (loaded with weights_only=True)
        rng.pt                 per-rank RNG states
        state.json             step, data position, metrics
        config.yaml            resolved run config
    RUN/checkpoints/latest     text file naming the newest complete directory

A checkpoint is written into a hidden temporary directory, fsynced, and renamed
(:func:`ahpa.io.atomic_dir`); ``latest`` is replaced atomically afterwards.  A kill
before the rename leaves the previous checkpoint untouched; a stale temporary is
removed on the next save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ahpa.errors import AhpaError
from ahpa.io import atomic_dir, remove_stale_temps, write_text_atomic


def _state_dict_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def step_dir_name(step: int) -> str:
    return f"{step:07d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    objective: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    rng_states: list[dict],
    state: dict,
    meta: dict,
    config_yaml: str,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    remove_stale_temps(final)
    # overwrite: the same step saved again (e.g. final save after a periodic one)
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(_state_dict_for_safetensors(ema), tmp / "ema.safetensors", metadata={"ahpa_meta": json.dumps(meta)})
        save_file(_state_dict_for_safetensors(model), tmp / "model.safetensors")
        if objective is not None and len(objective.state_dict()) > 0:
            save_file(_state_dict_for_safetensors(objective), tmp / "objective.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
    write_text_atomic(root / "latest", final.name + "\n")
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("[0-9]*") if p.is_dir() and (p / "state.json").is_file())
    return complete[-1] if complete else None


def _load_into(module: torch.nn.Module, path: Path, what: str) -> None:
    state = load_file(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            k = wrong[0]
            details.append(f"'{k}' is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in this run")
        if missing:
            details.append(f"{len(missing)} missing keys (first: '{missing[0]}')")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (first: '{unexpected[0]}')")
        raise AhpaError(
            f"{what} in {path} does not fit this run's architecture: {'; '.join(details)}. "
            "Resume with the config the run was started with (its config.yaml), or start a new run in another --out directory."
        )
    module.load_state_dict(state)


def load_checkpoint(
    ckpt: Path,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    objective: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> tuple[dict, list[dict]]:
    """Restore weights and optimizer in place; return (state.json dict, rng states)."""
    ckpt = Path(ckpt)
    _load_into(model, ckpt / "model.safetensors", "the model")
    _load_into(ema, ckpt / "ema.safetensors", "the EMA model")
    has_objective = objective is not None and len(objective.state_dict()) > 0
    if has_objective != (ckpt / "objective.safetensors").is_file():
        raise AhpaError(
            f"checkpoint {ckpt} was saved {'with' if not has_objective else 'without'} alignment weights, "
            "but this run is configured the other way (align.method / align.router differ); resume with the run's own config.yaml"
        )
    if has_objective:
        _load_into(objective, ckpt / "objective.safetensors", "the alignment objective")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    state = json.loads((ckpt / "state.json").read_text())
    return state, rng
