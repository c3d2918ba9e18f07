"""One run of a study: train to each milestone, sample, evaluate, record (every step resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from ahpa.checkpointing import latest_checkpoint
from ahpa.errors import AhpaError
from ahpa.evaluation.command import evaluate
from ahpa.evaluation.digits import digits_metrics
from ahpa.generate.engine import generate_samples, samples_path, vae_decoder
from ahpa.io import atomic_open, write_json_atomic
from ahpa.priors.vae import load_vae
from ahpa.runs import load_backbone, load_objective
from ahpa.study.schema import Method, Study, eval_paths, primary_metrics, run_config, run_name, step_dir
from ahpa.train import Trainer

# ---------------------------------------------------------------------- one run
LOSS_WINDOW = 0.1  # losses at a milestone: mean of the logged values over its last 10% of steps
ROUTER_T = (0.1, 0.5, 0.9)  # t at which the router's group weights are recorded (0 = data, 1 = noise)
def train_to(study: Study, method: Method, seed: int, out: Path, step: int, log=print) -> Path:
    """Train (or resume) the run up to ``step``; return the checkpoint of that step."""
    run_dir = out / "runs" / run_name(method, seed)
    ckpt = run_dir / "checkpoints" / step_dir(step)
    if (ckpt / "state.json").is_file():
        return ckpt
    latest = latest_checkpoint(run_dir)
    at = int(json.loads((latest / "state.json").read_text())["step"]) if latest else 0
    if at > step:
        raise AhpaError(f"{run_dir} is at step {at}, past milestone {step}, whose checkpoint is gone; "
                        f"raise train.keep_last or remove {run_dir} to retrain it")
    log(f"[study] {run_name(method, seed)}: training {at} -> {step}")
    cfg = run_config(study, method, seed, out, step)
    metrics = Trainer(cfg, show_progress=False).run()
    if metrics["steps"] != step or not (ckpt / "state.json").is_file():
        raise AhpaError(f"training of {run_dir} stopped at step {metrics['steps']} before milestone {step}; rerun the study to continue")
    return ckpt


def sample_and_evaluate(study: Study, ckpt: Path, sample_dir: Path, metrics_path: Path) -> dict:
    """Samples of one checkpoint (resumable, per-index seeds) and their metric, written atomically."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_backbone(ckpt)
    model = model.to(device).eval()
    meta = dict(meta, vae=meta.get("vae") or "stabilityai/sd-vae-ft-ema")  # as `ahpa sample` records it
    vae = load_vae(meta["vae"], device=device)
    s = study.sampler
    kwargs = dict(mode=s["mode"], method=s["method"], steps=int(s["steps"]), cfg_scale=float(s["cfg_scale"]),
                  guidance_interval=(float(s["guidance_low"]), float(s["guidance_high"])), path=meta.get("path", "linear"))
    npz = generate_samples(model, meta, vae_decoder(vae), sample_dir,
                                    study.samples, study.sample_batch, kwargs, seed=study.sample_seed)
    ref = study.reference
    if ref["kind"] == "digits":
        with np.load(npz) as data:
            metrics = digits_metrics(data["arr_0"], data["arr_1"], ref=ref["split"])
    else:
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


def router_summary(ckpt: Path) -> dict:
    """gamma_<g> at ROUTER_T, the mean largest layer weight per group (1 = one layer), and the
    largest change of any gamma over t in [0, 1] (0 = flat in t).  Empty for vanilla."""
    _, objective = load_objective(ckpt)
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
            save_grid(samples_path(sample_dir, study.samples), out / "grids" / method.name / f"{step_dir(step)}.png")
        row = milestone_record(study, method, seed, step, ckpt, metrics)
        write_json_atomic(record_path, row, indent=2)
        log(f"[study] {run_name(method, seed)} step {step}: " + ", ".join(f"{k} {row[k]:.4g}" for k in primary_metrics(study) if row.get(k) is not None))
        rows.append(row)
    return rows


