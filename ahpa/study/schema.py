"""The study YAML (``configs/studies/*.yaml``): methods, seeds, milestones, sampler, reference.
Every method must load and share the recipe keys a comparison holds fixed."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from ahpa.checkpointing import step_dir_name
from ahpa.config import PRESETS, Config, load_config
from ahpa.errors import AhpaError
from ahpa.io import read_yaml_mapping

STUDY_PRESETS = PRESETS / "studies"
# Recipe keys every method of one study must share (a table compares methods, not recipes).
SHARED_KEYS = ("train.global_batch", "train.steps", "data.source", "data.path", "data.resolution",
               "vae.path", "vae.scaling_factor", "vae.latent_norm")
REFERENCE_KINDS = ("digits", "inception")
STUDY_KEYS = {"name", "description", "methods", "seeds", "milestones", "samples", "sample_batch", "sample_seed",
              "sampler", "reference", "overrides"}
SAMPLER_KEYS = {"mode", "method", "steps", "cfg_scale", "guidance_low", "guidance_high"}


@dataclass
class Method:
    name: str
    config: Path | None  # None: missing optional config (skipped)
    overrides: list[str]
    cfg: Config | None = None
    note: str = ""


@dataclass
class Study:
    name: str
    path: Path
    methods: list[Method]
    skipped: list[Method]
    seeds: list[int]
    milestones: list[int]
    samples: int
    sample_batch: int
    sample_seed: int
    sampler: dict
    reference: dict
    overrides: list[str]
    description: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def ckpt_every(self) -> int:
        return reduce(math.gcd, self.milestones + [c.cfg.train.ckpt_every for c in self.methods if c.cfg.train.ckpt_every > 0])

    def runs(self) -> list[tuple[Method, int]]:
        """Seed-major order: every method's first seed before any second seed (a partial study covers all rows)."""
        return [(m, s) for s in self.seeds for m in self.methods]


def run_name(method: Method, seed: int) -> str:
    return f"{method.name}-s{seed}"


# ---------------------------------------------------------------------- loading
def _resolve_config(name: str, study_path: Path) -> Path | None:
    path = Path(name)
    for candidate in (path, study_path.parent / path, PRESETS.parent / path, PRESETS / path.name):
        if candidate.is_file():
            return candidate.resolve()
    return None


def load_study(path: str | os.PathLike, cli_overrides: list[str] | None = None, reference_path: str | None = None) -> Study:
    """Read and check a study YAML: every config exists (or is optional), loads, and shares the recipe."""
    path = Path(path)
    if not path.is_file():
        raise AhpaError(f"study file '{path}' does not exist; pass --preset NAME ({', '.join(list_presets())}) or --config STUDY.yaml")
    raw = read_yaml_mapping(path, "study file", "name:, methods:, seeds:, milestones:, ...")
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise AhpaError(f"{path}: unknown study key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("methods", "seeds", "milestones", "samples", "reference"):
        if key not in raw:
            raise AhpaError(f"{path}: the study needs '{key}:'")
    seeds, milestones = raw["seeds"], raw["milestones"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise AhpaError(f"{path}: 'seeds' must be a list of distinct integers, got {seeds!r}")
    if (not isinstance(milestones, list) or not milestones or not all(isinstance(m, int) and m > 0 for m in milestones)
            or sorted(set(milestones)) != milestones):
        raise AhpaError(f"{path}: 'milestones' must be increasing positive training steps, got {milestones!r}")
    samples, batch = raw["samples"], raw.get("sample_batch", 250)
    if not isinstance(samples, int) or samples < 2 or not isinstance(batch, int) or batch < 1:
        raise AhpaError(f"{path}: 'samples' must be an integer >= 2 and 'sample_batch' >= 1")
    sampler = dict(mode="ode", method="euler", steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0) | (raw.get("sampler") or {})
    if set(sampler) - SAMPLER_KEYS:
        raise AhpaError(f"{path}: unknown sampler key(s) {', '.join(sorted(set(sampler) - SAMPLER_KEYS))}; known: {', '.join(sorted(SAMPLER_KEYS))}")
    reference = dict(raw["reference"] or {})
    if reference.get("kind") not in REFERENCE_KINDS:
        raise AhpaError(f"{path}: reference.kind must be one of {', '.join(REFERENCE_KINDS)}, got {reference.get('kind')!r}")
    if reference_path:
        reference["path" if reference["kind"] == "inception" else "split"] = reference_path
    if reference["kind"] == "inception" and not reference.get("path"):
        raise AhpaError(f"{path}: an inception reference needs reference.path (e.g. VIRTUAL_imagenet256_labeled.npz) or --ref")
    if reference["kind"] == "digits" and reference.setdefault("split", "train") not in ("train", "heldout"):
        raise AhpaError(f"{path}: a digits reference has split train or heldout, got {reference['split']!r}")
    study_overrides = [str(o) for o in (raw.get("overrides") or [])] + list(cli_overrides or [])

    methods, skipped, names = [], [], set()
    if not isinstance(raw["methods"], list) or not raw["methods"]:
        raise AhpaError(f"{path}: 'methods' must be a non-empty list of {{name:, config:, overrides:}}")
    for entry in raw["methods"]:
        if not isinstance(entry, dict) or "name" not in entry or "config" not in entry:
            raise AhpaError(f"{path}: every method needs name: and config:, got {entry!r}")
        name = str(entry["name"])
        if name in names or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise AhpaError(f"{path}: method names must be unique and made of letters, digits, '-', '_', '.'; got {name!r}")
        names.add(name)
        overrides = [str(o) for o in (entry.get("overrides") or [])]
        config = _resolve_config(str(entry["config"]), path)
        if config is None:
            if entry.get("optional"):
                skipped.append(Method(name, None, overrides, note=f"config {entry['config']} does not exist (yet): row skipped"))
                continue
            raise AhpaError(f"{path}: method '{name}': config file '{entry['config']}' does not exist "
                            "(mark the method 'optional: true' to skip it while it is missing)")
        try:
            cfg = load_config(config, study_overrides + overrides)
        except AhpaError as err:
            raise AhpaError(f"{path}: method '{name}' ({config}): {err}") from None
        methods.append(Method(name, config, overrides, cfg))
    if not methods:
        raise AhpaError(f"{path}: none of the methods' configs exist: {'; '.join(m.note for m in skipped)}")
    check_shared_recipe(methods)
    for m in methods:
        if m.cfg.train.steps < milestones[-1]:
            raise AhpaError(f"{path}: method '{m.name}' trains {m.cfg.train.steps} steps (train.steps), fewer than the last milestone {milestones[-1]}")
    return Study(name=str(raw.get("name", path.stem)), path=path.resolve(), methods=methods, skipped=skipped,
                 seeds=list(seeds), milestones=list(milestones), samples=samples, sample_batch=batch,
                 sample_seed=int(raw.get("sample_seed", 0)), sampler=sampler, reference=reference,
                 overrides=study_overrides, description=str(raw.get("description", "")), raw=raw)


def check_shared_recipe(methods: list[Method]) -> None:
    """Refuse a study whose methods differ in a recipe key that a comparison must hold fixed."""
    first = methods[0]
    for key in SHARED_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(first.cfg, section), name)
        for m in methods[1:]:
            other = getattr(getattr(m.cfg, section), name)
            if other != value:
                raise AhpaError(f"the study's methods disagree on {key}: '{first.name}' has {value!r} ({first.config.name}), "
                                f"'{m.name}' has {other!r} ({m.config.name}); a comparison needs the same {key} for every method")


def list_presets() -> list[str]:
    return sorted(p.stem for p in STUDY_PRESETS.glob("*.yaml"))


# ---------------------------------------------------------------------- the layout of OUT
def run_config(study: Study, method: Method, seed: int, out: Path, steps: int) -> Config:
    cfg = load_config(method.config, study.overrides + method.overrides + run_overrides(study, out, method, seed, steps))
    return cfg


def run_overrides(study: Study, out: Path, method: Method, seed: int, steps: int) -> list[str]:
    every = study.ckpt_every
    return [f"train.out={out / 'runs' / run_name(method, seed)}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.ckpt_every={every}", f"train.keep_last={study.milestones[-1] // every + 1}", "train.max_minutes=0"]


def step_dir(step: int) -> str:
    return step_dir_name(step)


def eval_paths(out: Path, method: Method, seed: int, step: int) -> tuple[Path, Path, Path]:
    """(sampling dir, metrics json, record json) of one milestone."""
    name = run_name(method, seed)
    base = out / "evals" / name / step_dir(step)
    return out / "samples" / name / step_dir(step), base.with_suffix(".metrics.json"), base.with_suffix(".json")


def primary_metrics(study: Study) -> list[str]:
    return ["cfid", "accuracy"] if study.reference["kind"] == "digits" else ["fid", "sfid", "inception_score", "precision", "recall"]
