"""``ahpa study``: methods x seeds x milestones -> train, sample, evaluate, tables and plots.

The paper's results are tables of methods against training steps (Tables 2, 3,
D.15; Fig. H.6).  A study is a small YAML (``configs/studies/*.yaml``)::

    name: b2-table3
    methods:                      # one row each: a run config plus overrides
      - {name: vanilla, config: configs/sit-b2-vanilla.yaml}
      - {name: sra2, config: configs/sit-b2-sra2.yaml, optional: true}   # skipped with a note if missing
    seeds: [0]
    milestones: [100000, 200000, 400000]
    samples: 50000                # per-index seeds (ahpa.sampling): the same noise and labels for every run
    sampler: {mode: ode, method: euler, steps: 250, cfg_scale: 1.0}
    reference: {kind: inception, path: VIRTUAL_imagenet256_labeled.npz}   # or {kind: digits, split: train}
    overrides: [train.grid_steps=10]   # for every method (command-line overrides come last)

It drives the existing pieces and nothing else: training is :class:`ahpa.train.Trainer`
(resuming from its own checkpoints), sampling :func:`ahpa.generate.generate_samples`
(resuming from its part files), evaluation :func:`ahpa.evaluation.command.evaluate`
or :func:`ahpa.evaluation.digits.digits_metrics`.  Layout of ``OUT``::

    runs/<method>-s<seed>/           training runs (ckpt_every divides every milestone)
    samples/<method>-s<seed>/<step>/ sampling directories (samples_<N>.npz)
    evals/<method>-s<seed>/<step>.metrics.json   the metric of one milestone
    evals/<method>-s<seed>/<step>.json           + losses and router weights: the milestone is done
    grids/<method>/<step>.png        the first samples of the first seed, one row per class (Fig. H.6)
    results.csv  results.md  fid_vs_steps.png

Rerunning the same command continues every unfinished run and skips every
finished milestone; ``--print-commands`` writes the same work as shell commands
for a cluster (their outputs land where the study looks, so a later
``ahpa study`` collects them); ``--jobs N`` runs N runs at once as subprocesses
(one GPU each when there are GPUs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import numpy as np
import yaml

from ahpa.config import PRESETS, Config, load_config, to_dict
from ahpa.errors import AhpaError
from ahpa.io import atomic_open, write_json_atomic, write_text_atomic

STUDY_PRESETS = PRESETS / "studies"
# Recipe keys every method of one study must share (a table compares methods, not recipes).
SHARED_KEYS = ("train.global_batch", "train.steps", "data.source", "data.path", "data.resolution",
               "vae.path", "vae.scaling_factor", "vae.latent_norm")
ROUTER_T = (0.1, 0.5, 0.9)  # t at which the router's group weights are recorded (0 = data, 1 = noise)
LOSS_WINDOW = 0.1  # losses at a milestone: mean of the logged values over its last 10% of steps
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
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise AhpaError(f"study file '{path}' is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise AhpaError(f"study file '{path}' must be a mapping (name:, methods:, seeds:, milestones:, ...)")
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


# ---------------------------------------------------------------------- statistics
def mean_interval(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% Student-t interval, n); half-width NaN for n < 2.

    ``mean +- t_{0.975, n-1} * s / sqrt(n)`` with the sample standard deviation s (ddof 1).
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=np.float64)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return float(x.mean()), half, n


# ---------------------------------------------------------------------- one run
def run_config(study: Study, method: Method, seed: int, out: Path, steps: int) -> Config:
    cfg = load_config(method.config, study.overrides + method.overrides + _run_overrides(study, out, method, seed, steps))
    return cfg


def _run_overrides(study: Study, out: Path, method: Method, seed: int, steps: int) -> list[str]:
    every = study.ckpt_every
    return [f"train.out={out / 'runs' / run_name(method, seed)}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.ckpt_every={every}", f"train.keep_last={study.milestones[-1] // every + 1}", "train.max_minutes=0"]


def _step_dir(step: int) -> str:
    from ahpa.checkpointing import step_dir_name

    return step_dir_name(step)


def eval_paths(out: Path, method: Method, seed: int, step: int) -> tuple[Path, Path, Path]:
    """(sampling dir, metrics json, record json) of one milestone."""
    name = run_name(method, seed)
    base = out / "evals" / name / _step_dir(step)
    return out / "samples" / name / _step_dir(step), base.with_suffix(".metrics.json"), base.with_suffix(".json")


def train_to(study: Study, method: Method, seed: int, out: Path, step: int, log=print) -> Path:
    """Train (or resume) the run up to ``step``; return the checkpoint of that step."""
    import ahpa.train
    from ahpa.checkpointing import latest_checkpoint

    run_dir = out / "runs" / run_name(method, seed)
    ckpt = run_dir / "checkpoints" / _step_dir(step)
    if (ckpt / "state.json").is_file():
        return ckpt
    latest = latest_checkpoint(run_dir)
    at = int(json.loads((latest / "state.json").read_text())["step"]) if latest else 0
    if at > step:
        raise AhpaError(f"{run_dir} is at step {at}, past milestone {step}, whose checkpoint is gone; "
                        f"raise train.keep_last or remove {run_dir} to retrain it")
    log(f"[study] {run_name(method, seed)}: training {at} -> {step}")
    cfg = run_config(study, method, seed, out, step)
    metrics = ahpa.train.Trainer(cfg, show_progress=False).run()
    if metrics["steps"] != step or not (ckpt / "state.json").is_file():
        raise AhpaError(f"training of {run_dir} stopped at step {metrics['steps']} before milestone {step}; rerun the study to continue")
    return ckpt


def sample_and_evaluate(study: Study, ckpt: Path, sample_dir: Path, metrics_path: Path) -> dict:
    """Samples of one checkpoint (resumable, per-index seeds) and their metric, written atomically."""
    import torch

    import ahpa.generate as generate
    from ahpa.models.checkpoints import load_model_for_sampling
    from ahpa.priors.vae import load_vae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_model_for_sampling(ckpt)
    model = model.to(device).eval()
    meta = dict(meta, vae=meta.get("vae") or "stabilityai/sd-vae-ft-ema")  # as `ahpa sample` records it
    vae = load_vae(meta["vae"], device=device)
    s = study.sampler
    kwargs = dict(mode=s["mode"], method=s["method"], steps=int(s["steps"]), cfg_scale=float(s["cfg_scale"]),
                  guidance_interval=(float(s["guidance_low"]), float(s["guidance_high"])), path=meta.get("path", "linear"))
    npz = generate.generate_samples(model, meta, lambda x: vae.decode(x.to(vae.dtype)).sample.float(), sample_dir,
                                    study.samples, study.sample_batch, kwargs, seed=study.sample_seed)
    ref = study.reference
    if ref["kind"] == "digits":
        from ahpa.evaluation.digits import digits_metrics

        with np.load(npz) as data:
            metrics = digits_metrics(data["arr_0"], data["arr_1"], ref=ref["split"])
    else:
        from ahpa.evaluation.command import evaluate

        metrics = evaluate(npz, ref["path"], progress=False)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, metrics, indent=2)
    return metrics


def milestone_record(study: Study, method: Method, seed: int, step: int, ckpt: Path, metrics: dict) -> dict:
    """One results.csv row: metrics, the losses logged before the milestone, the router weights."""
    state = json.loads((ckpt / "state.json").read_text())
    window = max(1, int(round(step * LOSS_WINDOW)))
    logged = [r for r in state.get("history", []) if step - window < r["step"] <= step]
    row = {"method": method.name, "seed": seed, "step": step}
    for key in primary_metrics(study):
        row[key] = metrics[key]
    row["num_samples"] = metrics["num_samples"]
    row["loss_diffusion"] = float(np.mean([r["loss_diffusion"] for r in logged])) if logged else math.nan
    row["loss_align"] = float(np.mean([r["loss_align"] for r in logged])) if logged else math.nan
    row |= router_summary(ckpt)
    return row


def primary_metrics(study: Study) -> list[str]:
    return ["cfid", "accuracy"] if study.reference["kind"] == "digits" else ["fid", "sfid", "inception_score", "precision", "recall"]


def load_objective(ckpt: Path):
    """The alignment objective (router + heads) of a checkpoint, or None for vanilla runs."""
    import torch
    from safetensors.torch import load_file

    from ahpa.config import config_from_dict
    from ahpa.models.checkpoints import read_meta
    from ahpa.models.sit import build_sit
    from ahpa.priors.hierarchy import HierarchicalVAEPrior
    from ahpa.priors.vae import load_vae
    from ahpa.train import build_objective

    if not (ckpt / "objective.safetensors").is_file():
        return None
    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    meta = read_meta(ckpt)
    with torch.device("meta"):
        sit = build_sit(cfg.model.name, input_size=meta["input_size"], in_channels=meta["in_channels"],
                        num_classes=cfg.model.num_classes)
    prior = HierarchicalVAEPrior(load_vae(cfg.vae.path), groups=cfg.prior.groups, grid=sit.grid,
                                 grouping=cfg.prior.grouping, split=cfg.prior.split, resample=cfg.prior.resample)
    objective = build_objective(cfg, sit, dict(prior.group_shapes))
    objective.load_state_dict(load_file(str(ckpt / "objective.safetensors")))
    return objective.eval()


def router_summary(ckpt: Path) -> dict:
    """gamma_<g> at ROUTER_T, the mean largest layer weight per group (1 = one layer), and the
    largest change of any gamma over t in [0, 1] (0 = flat in t).  Empty for vanilla."""
    import torch

    objective = load_objective(ckpt)
    if objective is None:
        return {}
    row = {}
    w = objective.router_weights(torch.tensor(ROUTER_T))
    for g in objective.groups:
        for i, t in enumerate(ROUTER_T):
            row[f"gamma_{g}_t{t}"] = float(w[f"gamma/{g}"][i])
    dense = objective.router_weights(torch.linspace(0, 1, 21))
    for g in objective.groups:
        row[f"intra_max_{g}"] = float(dense[f"intra/{g}"].max(1).values.mean())
    row["gamma_t_spread"] = float(max(dense[f"gamma/{g}"].max() - dense[f"gamma/{g}"].min() for g in objective.groups))
    return row


def save_grid(npz: Path, path: Path, per_class: int = 8) -> None:
    """The first ``per_class`` samples of each class (index i has label i % C), one row per class."""
    import torch
    from torchvision.utils import save_image

    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    classes = sorted(set(labels.tolist()))[:10]
    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:per_class]
        rows.extend(idx.tolist() + [None] * (per_class - len(idx)))
    tiles = torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255 if i is not None
                         else torch.zeros(images.shape[-1], *images.shape[1:3]) for i in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        save_image(tiles, f, format="png", nrow=per_class, padding=1)


def run_one(study: Study, method: Method, seed: int, out: Path, log=print) -> list[dict]:
    """Every milestone of one (method, seed) run: train to it, sample, evaluate, record (skipping what is done)."""
    rows = []
    for step in study.milestones:
        sample_dir, metrics_path, record_path = eval_paths(out, method, seed, step)
        if record_path.is_file():
            rows.append(json.loads(record_path.read_text()))
            continue
        ckpt = train_to(study, method, seed, out, step, log)
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
        else:
            log(f"[study] {run_name(method, seed)}: sampling {study.samples} and evaluating at step {step}")
            metrics = sample_and_evaluate(study, ckpt, sample_dir, metrics_path)
        if seed == study.seeds[0]:
            from ahpa.generate import samples_path

            save_grid(samples_path(sample_dir, study.samples), out / "grids" / method.name / f"{_step_dir(step)}.png")
        row = milestone_record(study, method, seed, step, ckpt, metrics)
        write_json_atomic(record_path, row, indent=2)
        log(f"[study] {run_name(method, seed)} step {step}: " + ", ".join(f"{k} {row[k]:.4g}" for k in primary_metrics(study) if row.get(k) is not None))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- tables
def collect(study: Study, out: Path) -> list[dict]:
    rows = []
    for method, seed in study.runs():
        for step in study.milestones:
            record = eval_paths(out, method, seed, step)[2]
            if record.is_file():
                rows.append(json.loads(record.read_text()))
    order = {m.name: i for i, m in enumerate(study.methods)}
    return sorted(rows, key=lambda r: (order[r["method"]], r["seed"], r["step"]))


def _fmt(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def write_results(study: Study, out: Path, rows: list[dict]) -> None:
    """results.csv (one row per run and milestone), results.md (mean and 95% interval), fid_vs_steps.png."""
    columns = ["method", "seed", "step"]
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r[k]) if k in r else "" for k in columns})
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.md", results_markdown(study, rows))
    plot_metric_vs_steps(study, rows, out / "fid_vs_steps.png")


def _cell(values, digits: int = 3) -> str:
    mean, half, n = mean_interval(values)
    if n == 0:
        return "—"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {half:.{digits}f}" if n > 1 else "") + (f" (n={n})" if n != 1 or len(values) != n else "")


def results_markdown(study: Study, rows: list[dict]) -> str:
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [f"Seeds {study.seeds}; {study.samples} samples per milestone ({study.sampler['mode']} {study.sampler['method']}, "
              f"{study.sampler['steps']} steps, CFG {study.sampler['cfg_scale']}); reference: "
              + (f"digits classifier, {study.reference['split']} split" if study.reference["kind"] == "digits" else study.reference["path"])
              + ". Cells: mean ± half-width of the 95% Student-t interval over seeds (n = seeds with a result).", ""]
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["step"]), []).append(r)
    metrics = primary_metrics(study) + ["loss_diffusion", "loss_align"]
    names = {"cfid": "classifier FID (lower is better)", "accuracy": "class accuracy of samples (higher is better)",
             "fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision", "recall": "recall",
             "loss_diffusion": "diffusion loss (last 10% of steps)", "loss_align": "alignment loss x lambda (last 10% of steps)"}
    for metric in metrics:
        if not any(r.get(metric) is not None for r in rows):
            continue
        lines += [f"## {names.get(metric, metric)}", "", "| method | " + " | ".join(f"{m:,} steps" for m in study.milestones) + " |",
                  "|---|" + "---|" * len(study.milestones)]
        for method in study.methods:
            cells = [_cell([r.get(metric) for r in by.get((method.name, m), [])]) for m in study.milestones]
            lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
        lines.append("")
    router_keys = sorted({k for r in rows for k in r if k.startswith(("gamma_", "intra_max_"))})
    if router_keys:
        last = study.milestones[-1]
        lines += [f"## Router at {last:,} steps", "",
                  "gamma_<group>_t<t>: the group's weight at t (0 = data, 1 = noise; uniform = 1); intra_max: mean largest "
                  "layer weight within the group (1 = one layer); gamma_t_spread: largest change of a gamma over t (0 = flat in t).", "",
                  "| method | " + " | ".join(router_keys) + " |", "|---|" + "---|" * len(router_keys)]
        for method in study.methods:
            group = by.get((method.name, last), [])
            if any(k in r for r in group for k in router_keys):
                lines.append(f"| {method.name} | " + " | ".join(_cell([r.get(k) for r in group], 2) for k in router_keys) + " |")
        lines.append("")
    missing = [f"{m.name} seed {s}" for m, s in study.runs() if not any(r["method"] == m.name and r["seed"] == s and r["step"] == study.milestones[-1] for r in rows)]
    notes = [f"- {m.name}: {m.note}" for m in study.skipped] + ([f"- unfinished runs: {', '.join(missing)} (rerun the study to continue)"] if missing else [])
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def plot_metric_vs_steps(study: Study, rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    metric = primary_metrics(study)[0]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for method in study.methods:
        xs, ys, es = [], [], []
        for m in study.milestones:
            mean, half, n = mean_interval([r.get(metric) for r in rows if r["method"] == method.name and r["step"] == m])
            if n:
                xs.append(m), ys.append(mean), es.append(0.0 if math.isnan(half) else half)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method.name)
    ax.set_xlabel("training steps")
    ax.set_ylabel({"cfid": "classifier FID", "fid": "FID"}.get(metric, metric))
    ax.set_title(f"{study.name}: mean and 95% interval over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=120)


# ---------------------------------------------------------------------- commands
def print_commands(study: Study, out: Path, study_arg: list[str]) -> str:
    """Shell commands doing the study's work on a cluster; a later ``ahpa study`` collects their outputs."""
    q = shlex.quote
    lines = [f"# ahpa study {study.name}: {len(study.methods)} methods x {len(study.seeds)} seeds, milestones {study.milestones}",
             f"# Each block is one job (train, then sample and evaluate each milestone); the outputs land in {out}."]
    lines += [f"# skipped: {m.name}: {m.note}" for m in study.skipped]

    def rel(p: Path) -> str:  # configs inside the working directory are shown relative to it
        return os.path.relpath(p) if Path(p).resolve().is_relative_to(Path.cwd()) else str(p)

    s = study.sampler
    for method, seed in study.runs():
        name = run_name(method, seed)
        lines += ["", f"# {name}"]
        extra = study.overrides + method.overrides + _run_overrides(study, out, method, seed, study.milestones[-1])
        lines.append("accelerate launch -m ahpa.cli train --config " + q(rel(method.config)) + " " + " ".join(q(o) for o in extra))
        for step in study.milestones:
            sample_dir, metrics_path, _ = eval_paths(out, method, seed, step)
            ckpt = out / "runs" / name / "checkpoints" / _step_dir(step)
            lines.append(f"accelerate launch -m ahpa.cli sample --ckpt {q(str(ckpt))} --out {q(str(sample_dir))} --num {study.samples} "
                         f"--batch {study.sample_batch} --mode {s['mode']} --method {s['method']} --steps {s['steps']} "
                         f"--cfg-scale {s['cfg_scale']} --guidance-low {s['guidance_low']} --guidance-high {s['guidance_high']} --seed {study.sample_seed}")
            npz = sample_dir / f"samples_{study.samples}.npz"
            if study.reference["kind"] == "digits":
                lines.append(f"python -m ahpa.evaluation.digits evaluate {q(str(npz))} --ref {study.reference['split']} --out {q(str(metrics_path))}")
            else:
                lines.append(f"mkdir -p {q(str(metrics_path.parent))} && ahpa evaluate {q(str(npz))} --ref {q(str(study.reference['path']))} --out {q(str(metrics_path))}")
    lines += ["", "# then, to write results.csv / results.md / fid_vs_steps.png from these outputs:",
              "ahpa study " + " ".join(q(a) for a in study_arg) + f" --out {q(str(out))}"]
    return "\n".join(lines) + "\n"


def _run_jobs(study: Study, out: Path, jobs: int, study_arg: list[str]) -> None:
    import torch

    gpus = torch.cuda.device_count()
    pending = [run_name(m, s) for m, s in study.runs()]
    running: list[tuple[subprocess.Popen, str, int]] = []
    failed = []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    slots = list(range(jobs))
    while pending or running:
        while pending and slots:
            name, slot = pending.pop(0), slots.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            cmd = [sys.executable, "-m", "ahpa.cli", "study", *study_arg, "--out", str(out), "--run", name]
            log = open(out / "logs" / f"{name}.log", "a")
            print(f"[study] started {name} (log {log.name})", flush=True)
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), name, slot))
            log.close()
        proc, name, slot = running[0]
        for item in running:  # wait for whichever ends first
            if item[0].poll() is not None:
                proc, name, slot = item
                break
        else:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        running.remove((proc, name, slot))
        slots.append(slot)
        if proc.returncode:
            failed.append(name)
        print(f"[study] {name} {'failed (see its log)' if proc.returncode else 'finished'}", flush=True)
    if failed:
        raise AhpaError(f"runs failed: {', '.join(failed)}; see {out / 'logs'}; rerun the study to continue them")


def run(args: argparse.Namespace) -> int:
    if bool(args.preset) == bool(args.config):
        raise AhpaError(f"pass exactly one of --preset NAME ({', '.join(list_presets())}) or --config STUDY.yaml")
    if args.preset:
        path = STUDY_PRESETS / f"{args.preset}.yaml"
        if not path.is_file():
            raise AhpaError(f"unknown study preset '{args.preset}'; presets: {', '.join(list_presets())}")
        study_arg = ["--preset", args.preset]
    else:
        path = Path(args.config)
        study_arg = ["--config", str(path.resolve())]
    if args.ref:
        study_arg += ["--ref", args.ref]
    study_arg += list(args.overrides)
    if args.jobs < 1:
        raise AhpaError(f"--jobs must be at least 1, got {args.jobs}")
    study = load_study(path, args.overrides, args.ref)
    out = Path(args.out or f"studies/{study.name}").resolve()
    for m in study.skipped:
        print(f"[study] note: {m.name} skipped: {m.note}", file=sys.stderr)
    if args.print_commands:
        sys.stdout.write(print_commands(study, out, study_arg))
        return 0
    names = {run_name(m, s): (m, s) for m, s in study.runs()}
    if args.run and args.run not in names:
        raise AhpaError(f"--run {args.run} is not a run of this study; runs: {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "study.yaml", yaml.safe_dump(study.raw, sort_keys=False))
    if args.run:
        run_one(study, *names[args.run], out)
        return 0
    if args.jobs > 1:
        _run_jobs(study, out, args.jobs, study_arg)
    else:
        for method, seed in study.runs():
            run_one(study, method, seed, out, log=lambda msg: print(msg, flush=True))
    rows = collect(study, out)
    write_results(study, out, rows)
    print(f"[study] wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'fid_vs_steps.png'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="methods x seeds x milestones: train, sample, evaluate, tables (resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a study in configs/studies/ (toy, b2-table3, b2-ablations)")
    p.add_argument("--config", help="a study YAML")
    p.add_argument("--out", help="study directory (default studies/NAME)")
    p.add_argument("--ref", help="override reference.path (inception) or reference.split (digits)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, as subprocesses (one GPU each when GPUs exist)")
    p.add_argument("--print-commands", action="store_true", help="print the per-run shell commands for a cluster instead of running")
    p.add_argument("--run", help=argparse.SUPPRESS)  # one run only (what --jobs launches)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every method (e.g. data.path=/data/cache)")
    p.set_defaults(func=run)
