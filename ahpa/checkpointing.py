"""Training checkpoints that survive a kill at any moment.

Layout (one directory per saved step)::

    RUN/checkpoints/0050000/
        ema.safetensors        EMA SiT weights + meta: all that sampling needs (the export)
        model.safetensors      online SiT weights + the same meta (build.weights_meta)
        objective.safetensors  router + projection head(s) (absent for vanilla)
        optimizer.pt           AdamW state (loaded with weights_only=True)
        rng.pt                 per-rank RNG states
        state.json             step, data position, metrics
        config.yaml            resolved run config
        manifest.json          size and sha256 of each file above, and that the weights are finite
    RUN/checkpoints/latest     text file naming the newest complete directory

A checkpoint is written into a hidden temporary directory, fsynced, and renamed
(:func:`ahpa.io.atomic_dir`); ``latest`` is replaced atomically afterwards.  A kill
before the rename leaves the previous checkpoint untouched; a stale temporary is
removed on the next save.

Integrity: ``manifest.json`` is written last, inside the temporary directory, so
a checkpoint is complete exactly when its manifest is.  A resume verifies sizes
and checksums (:func:`verify_checkpoint`) and falls back to the newest checkpoint
that verifies, saying so in one line (:func:`resume_from_latest`); checkpoints
written before manifests existed load "unverified".  Weights with a NaN/Inf are
never written, and rotation never deletes the newest checkpoint known to be finite.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ahpa.errors import AhpaError, disk_full
from ahpa.io import atomic_dir, file_sha256, remove_stale_temps, write_text_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED = ("ema.safetensors", "model.safetensors", "optimizer.pt", "rng.pt", "state.json")


def _state_dict_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def step_dir_name(step: int) -> str:
    return f"{step:07d}"


def first_nonfinite(module: torch.nn.Module | None) -> str | None:
    """Name of the first floating-point tensor of ``module``'s state holding a NaN or Inf, or None."""
    if module is None:
        return None
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


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
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``.

    Refuses (AhpaError, nothing written) weights with a NaN or Inf."""
    root = Path(run_dir) / "checkpoints"
    for what, module in (("the EMA model", ema), ("the model", model), ("the alignment objective", objective)):
        bad = first_nonfinite(module)
        if bad is not None:
            last = latest_checkpoint(run_dir)
            raise AhpaError(f"not saving step {step}: {what}'s tensor '{bad}' holds NaN/Inf; the last checkpoint "
                            f"({last or 'none'}) is kept. Lower train.lr or check the data, then resume")
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    remove_stale_temps(final)
    try:
        # overwrite: the same step saved again (e.g. final save after a periodic one)
        with atomic_dir(final, overwrite=True) as tmp:
            # both weights files carry what sampling needs (build.weights_meta): either one samples on its own
            save_file(_state_dict_for_safetensors(ema), tmp / "ema.safetensors", metadata={"ahpa_meta": json.dumps(meta)})
            save_file(_state_dict_for_safetensors(model), tmp / "model.safetensors", metadata={"ahpa_meta": json.dumps(meta)})
            if objective is not None and len(objective.state_dict()) > 0:
                save_file(_state_dict_for_safetensors(objective), tmp / "objective.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(rng_states, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
            files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
            manifest = {"format": MANIFEST_FORMAT, "step": step, "finite": True, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: the commit point
        write_text_atomic(root / "latest", final.name + "\n")
    except Exception as err:  # ENOSPC, EDQUOT, EROFS... (a full disk in any library's error type, errors.disk_full):
        if not isinstance(err, OSError) and not disk_full(err):  # the atomic write left the previous checkpoint intact
            raise
        reason = (err.strerror if isinstance(err, OSError) else None) or disk_full(err) or err
        raise AhpaError(f"could not write checkpoint {final} ({reason}); the previous checkpoint "
                        f"({latest_checkpoint(run_dir) or 'none'}) is intact. Free space, then rerun to resume") from None
    _prune(root, keep_last)
    return final


def _manifest(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    doomed = complete[: max(0, len(complete) - keep_last)]
    kept = complete[len(doomed):]
    # never delete the newest checkpoint known to hold finite weights (older runs: no manifest, unknown)
    if not any((_manifest(p) or {}).get("finite") for p in kept):
        finite = [p for p in doomed if (_manifest(p) or {}).get("finite")]
        if finite:
            doomed.remove(finite[-1])
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(ckpt: Path, checksums: bool = True) -> tuple[bool, str | None]:
    """(verified, problem): problem is None for a usable checkpoint; verified is False when
    it has no manifest (written before ahpa recorded them) and only presence was checked."""
    ckpt = Path(ckpt)
    if not (ckpt / MANIFEST).exists():
        missing = [name for name in REQUIRED if not (ckpt / name).is_file()]
        if missing:
            return False, f"{missing[0]} is missing"
        try:
            cfg = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            cfg = {}
        if (cfg.get("align") or {}).get("method", "vanilla") != "vanilla" and not (ckpt / "objective.safetensors").is_file():
            return False, "objective.safetensors is missing (its config.yaml trains an alignment objective)"
        return False, None
    manifest = _manifest(ckpt)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return True, f"{MANIFEST} is unreadable"
    for name, record in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            return True, f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return True, f"{name} has {size} bytes, its manifest says {record['bytes']} (truncated?)"
        if checksums and file_sha256(path) != record["sha256"]:
            return True, f"{name} does not match its sha256 in {MANIFEST} (corrupted)"
    return True, None


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (the ``latest`` pointer's target leading)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target in found:
            found.remove(target)
            found.insert(0, target)
    return found


def resume_from_latest(run_dir: Path, load: Callable[[Path], object], log: Callable[[str], None] = print):
    """Verify and ``load`` the newest checkpoint that works; (checkpoint, load's result) or (None, None).

    A damaged one (missing or truncated file, checksum mismatch, unreadable state) is
    skipped, and one line names what was wrong and which checkpoint was used instead.
    Errors about the run's settings (AhpaError from ``load``) are not damage: they propagate."""
    damaged: list[str] = []
    for ckpt in checkpoint_candidates(run_dir):
        verified, problem = verify_checkpoint(ckpt)
        if problem is None:
            try:
                result = load(ckpt)
            except AhpaError:
                raise
            except Exception as err:  # safetensors / zip / pickle / json errors of a damaged file
                problem = f"cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
        if problem is not None:
            damaged.append(f"{ckpt.name}: {problem}")
            continue
        notes = []
        if damaged:
            notes.append(f"skipped damaged checkpoint(s) {'; '.join(damaged)}; resuming from {ckpt} instead")
        if not verified:
            notes.append(f"{ckpt} has no {MANIFEST} (saved by an older ahpa): loaded unverified")
        if notes:
            log("note: " + "; ".join(notes))
        return ckpt, result
    if damaged:
        raise AhpaError(f"no checkpoint of {run_dir} can be resumed ({'; '.join(damaged)}); restore them from a backup, "
                        f"or move {Path(run_dir) / 'checkpoints'} away to start the run over")
    return None, None


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
