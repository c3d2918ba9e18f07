"""What a resumed run must share with the run it continues, and what a resume may change.

A resume refuses a config whose architecture, objective or data stream differs from the saved
``config.yaml`` (naming the key), and applies the config's optimizer settings over those restored
with the optimizer state, recording each change (docs/design.md section 10).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ahpa.config import Config, to_dict
from ahpa.errors import AhpaError

# What a resumed run must share with the run it continues: the architecture and objective
# (whole sections) and what fixes the data stream and the random draws (single keys).
RESUME_SECTIONS = ("model", "prior", "teacher", "align", "vae", "transport", "text")
RESUME_KEYS = ("data.source", "data.path", "data.resolution", "train.global_batch", "train.seed")


def check_resume_config(out: Path, cfg: Config) -> None:
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    now = to_dict(cfg)
    keys = [f"{section}.{key}" for section in RESUME_SECTIONS for key in now[section]] + list(RESUME_KEYS)
    for dotted in keys:
        section, key = dotted.split(".")
        value = now[section][key]
        if before.get(section, {}).get(key, value) != value:
            raise AhpaError(
                f"{out} holds a run with {dotted}={before[section][key]!r}, but this command asks for {value!r}. "
                f"Resume with the same settings (see {saved}) or choose a new --out directory."
            )


# Optimizer settings that a resume applies over the ones restored with the optimizer state (issue 9 item 5).
RESUME_OPTIMIZER_KEYS = {"lr": "train.lr", "betas": "train.betas", "weight_decay": "train.weight_decay"}


def apply_optimizer_settings(optimizer, intended: list[dict], cfg: Config) -> dict[str, list]:
    """Set the config's lr (per group), betas and weight decay on ``optimizer``; returns what changed,
    ``{"train.lr": [before, after], ...}``."""
    t = cfg.train
    changed = {}
    for group, plan in zip(optimizer.param_groups, intended):
        wanted = {"lr": plan.get("lr", t.lr), "betas": tuple(t.betas), "weight_decay": t.weight_decay}
        for key, value in wanted.items():
            before = tuple(group[key]) if key == "betas" else group[key]
            if before != value:
                changed[RESUME_OPTIMIZER_KEYS[key]] = [list(before) if key == "betas" else before,
                                                       list(value) if key == "betas" else value]
            group[key] = value
    return changed
