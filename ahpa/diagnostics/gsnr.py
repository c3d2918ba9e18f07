"""G-SNR of the alignment gradient along the trajectory (paper Sec. 3, Fig. 2, Tables 7, B.10, E.18; docs/design.md section 6).

For each t of a grid, the whole batch is noised at that one t (fresh images and
noise per t, the same ones for every target), and the per-sample gradients
``g_i`` of the alignment loss with respect to a parameter set give

    tr(S) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1)
    G-SNR = ||g_bar||^2 / tr(S)            (per-sample form)
    n * G-SNR                              (batch-mean form: the SNR of the batch-mean gradient)

plus the cosine between the mean diffusion gradient and ``g_bar`` (gradient conflict, App. E.1).
The paper's equation is lost (docs/design.md section 9); both forms are reported and the raw
ingredients are written so any other normalisation can be recomputed.

A *target* is an alignment objective evaluated on the same backbone:

- ``own``: the checkpoint's objective (its trained router and head);
- ``uniform:G3``, ``uniform:G3+G4``, ``linear``, ``linear:G3+G4``: a parameter-free
  router over any feature keys the data source provides (VAE groups, and any
  further key a prior adds to ``PriorOutput.features``);
- ``config:PATH``: the objective of another run (a checkpoint directory: its
  trained weights; a YAML file: freshly initialised).

A target without trained weights of its own takes the checkpoint's projection
head when it fits: the same head, or its output channels of the target's groups
(the head's last layer is a convolution, so a channel subset is a row subset);
otherwise a freshly initialised head (``head`` in the JSON says which).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ahpa import preemption
from ahpa.align.objective import AlignmentObjective
from ahpa.build import build_backbone, build_objective, build_source, build_transport
from ahpa.config import TEACHER_GROUPS, load_config
from ahpa.data.projection import target_normalization
from ahpa.data.sampler import step_generator
from ahpa.errors import AhpaError
from ahpa.io import atomic_open, write_json_atomic
from ahpa.probe.gsnr import AlignmentProbe, probe_point, select_parameters, summarize
from ahpa.probe.per_sample import METHODS
from ahpa.runs import OBJECTIVE_FILE, WEIGHTS, checkpoint_dir, load_state, read_config

STATIC_ROUTERS = ("uniform", "linear")
GROUP_PREFIX = "G"  # VAE hierarchy groups G1..G4: extracted on demand by the data source


# ---------------------------------------------------------------------- targets

@dataclass
class Target:
    spec: str
    objective: nn.Module
    head: str  # where the head's weights come from
    keys: list[str] = field(default_factory=list)


def parse_target(spec: str) -> tuple[str, str | None]:
    """Syntax only: ``own`` | ``uniform[:K1+K2]`` | ``linear[:K1+K2]`` | ``config:PATH``."""
    if spec in ("own", "router"):
        return "own", None
    kind, _, rest = spec.partition(":")
    if kind == "config":
        if not rest:
            raise AhpaError("--target config:PATH needs a checkpoint directory or a YAML file after 'config:'")
        return "config", rest
    if kind in STATIC_ROUTERS:
        if rest and any(not k.strip() for k in rest.split("+")):
            raise AhpaError(f"--target {spec}: feature keys are joined by '+', e.g. uniform:G3+G4")
        return kind, rest or None
    raise AhpaError(f"unknown --target '{spec}'; use own, uniform:KEYS, linear[:KEYS] (KEYS like G3 or G3+G4) or config:PATH")


def _last_conv(head: nn.Module) -> str:
    names = [n for n, m in head.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise AhpaError("projection head without a final convolution")
    return names[-1]


def transfer_head(src: nn.Module | None, dst: nn.Module) -> str:
    """Copy ``src``'s trained heads into ``dst`` where they fit; return what was done."""
    if src is None:
        return "fresh"
    ranges, start = {}, 0
    for g in src.groups:
        C = src.group_shapes[g][1]
        ranges[g], start = (start, start + C), start + C
    if any(g not in ranges or src.group_shapes[g][1] != dst.group_shapes[g][1] for g in dst.groups):
        return "fresh"
    rows = torch.cat([torch.arange(*ranges[g]) for g in dst.groups])
    for d in dst.depths:
        if str(d) not in src.heads:
            return "fresh"
        s_head, d_head = src.heads[str(d)], dst.heads[str(d)]
        conv = _last_conv(s_head)
        state = dict(s_head.state_dict())
        prefix = f"{conv}." if conv else ""
        state[prefix + "weight"] = state[prefix + "weight"][rows]
        if prefix + "bias" in state:
            state[prefix + "bias"] = state[prefix + "bias"][rows]
        own = d_head.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            return "fresh"
        d_head.load_state_dict(state)
    same = list(dst.groups) == list(src.groups)
    return "trained" if same else f"trained (channels of {'+'.join(dst.groups)})"


def t_grid(num_t: int, explicit: str | None = None) -> list[float]:
    """The t grid of a diagnostic: the comma-separated ``explicit`` values, else ``num_t`` bin centres of (0, 1)."""
    if explicit:
        values = [float(v) for v in explicit.split(",") if v.strip()]
    else:
        if num_t < 1:
            raise AhpaError(f"--num-t must be at least 1, got {num_t}")
        values = [(k + 0.5) / num_t for k in range(num_t)]  # bin centres of (0, 1)
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise AhpaError(f"--t values must lie in [0, 1], got {values}")
    return values


def trajectory_batch(source, cfg, n: int, seed: int, k: int, t: float, device, feature_source=None) -> dict:
    """Batch ``k`` of ``source``'s stream (fresh images per k), its latents drawn and noised with seeded noise, all at
    time ``t``: x0, y, t, eps, drop (class dropout of ``cfg``), features (of ``feature_source`` when given: a swapped VAE)."""
    source.start(k)
    raw = source.next_batch()
    features = raw.get("features", {})
    if feature_source is not None:
        feature_source.start(k)
        swapped = feature_source.next_batch()
        if not torch.equal(swapped["y"], raw["y"]):
            raise AhpaError("the swapped VAE's data stream does not follow the same images; use the same data.* settings")
        features = swapped.get("features", {})
    g = step_generator(seed, k, device, stream=3)
    shape = (n, *source.latent_shape)
    x0 = source.sample_latent(raw, torch.randn(shape, generator=g, device=device))
    eps = torch.randn(shape, generator=g, device=device)
    drop = torch.rand(n, generator=g, device=device) < cfg.model.class_dropout
    return {"x0": x0, "y": raw["y"], "t": torch.full((n,), float(t), device=device), "eps": eps, "drop": drop,
            "features": features}


def _static_objective(kind: str, keys: list[str], shapes: dict, base_cfg, sit):
    a = base_cfg.align
    depths = list(a.depths) or [sit.default_alignment_depth]
    return AlignmentObjective(sit.hidden_size, sit.grid, {k: shapes[k] for k in keys}, depths, router=kind, head=a.head,
                              loss=a.loss, weight=a.weight, normalize=target_normalization(base_cfg))


# ---------------------------------------------------------------------- command

def source_config(cfg, keys: set[str], n: int, seed: int, teacher=None):
    """A copy of ``cfg`` whose data source yields ``n`` samples per batch and the VAE and teacher groups in
    ``keys``; ``teacher``: the ``teacher.*`` section of the target config that brings a teacher group."""
    c = copy.deepcopy(cfg)
    if teacher is not None and not any(g in TEACHER_GROUPS for g in c.prior.groups):
        c.teacher = copy.deepcopy(teacher)
    groups = list(dict.fromkeys(list(c.prior.groups) + sorted(k for k in keys if _is_group(k))))
    c.prior.groups = groups
    if c.align.method == "vanilla":
        c.align.method = "ahpa"
    if c.prior.kind == "none" and any(_is_group(k) for k in keys):
        c.prior.kind = "vae_hierarchy"
    c.train.global_batch = n
    c.train.seed = seed
    c.data.hflip = False
    return c


def _is_group(key: str) -> bool:
    """A feature group the data source can add: a VAE group (G1..G4) or a frozen teacher (dinov2, inception)."""
    return (key.startswith(GROUP_PREFIX) and key[1:].isdigit()) or key in TEACHER_GROUPS


class GSNRRun:
    """Everything ``ahpa diagnose gsnr`` needs, built and validated before anything is written."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if bool(args.ckpt) == bool(args.config):
            raise AhpaError("pass exactly one of --ckpt (a checkpoint or run directory) and --config (a fresh initialisation)")
        if args.n < 2:
            raise AhpaError(f"--n must be at least 2 (the covariance needs two samples), got {args.n}")
        if args.method not in METHODS:
            raise AhpaError(f"unknown --method '{args.method}'; choose one of: {', '.join(METHODS)}")
        self.t_values = t_grid(args.num_t, args.t)
        specs = args.target or []
        parsed = [parse_target(s) for s in specs]
        overrides = list(args.overrides or [])
        vae_swap = [o.split("=", 1)[1] for o in overrides if o.startswith("vae.path=")]
        base_overrides = [o for o in overrides if not o.startswith("vae.path=")]
        self.ckpt = checkpoint_dir(args.ckpt) if args.ckpt else None
        if self.ckpt is not None:
            cfg = read_config(self.ckpt, base_overrides)
        else:
            cfg = load_config(args.config, base_overrides)
        self.cfg = cfg
        if not parsed:
            parsed = [("own", None)] if cfg.align.method != "vanilla" else [("uniform", "+".join(cfg.prior.groups))]
            specs = ["own"] if cfg.align.method != "vanilla" else [f"uniform:{'+'.join(cfg.prior.groups)}"]
        if ("own", None) in parsed and cfg.align.method == "vanilla":
            raise AhpaError("this checkpoint is vanilla SiT (no alignment objective): use --target uniform:KEYS or config:PATH")
        keys = set(cfg.prior.groups)
        other_cfgs = {}
        for (kind, rest), spec in zip(parsed, specs):
            if kind in STATIC_ROUTERS and rest:
                keys |= set(rest.split("+"))
            if kind == "config":
                other_cfgs[spec] = self._other_config(rest)
                keys |= set(other_cfgs[spec][0].prior.groups)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = device
        teachers = [o.teacher for o, _ in other_cfgs.values() if any(g in TEACHER_GROUPS for g in o.prior.groups)]
        src_cfg = source_config(cfg, keys, args.n, args.seed, teachers[0] if teachers else None)
        self.source = build_source(src_cfg, device=device, rank=0, world=1, per_rank=args.n)
        self.feature_source = None
        if vae_swap:  # Table B.10: the supervisor encoder changes, the backbone's latents do not
            swap_cfg = copy.deepcopy(src_cfg)
            swap_cfg.vae.path = vae_swap[-1]
            self.feature_source = build_source(swap_cfg, device=device, rank=0, world=1, per_rank=args.n)
            own_shapes = {g: self.source.group_shapes[g] for g in self.source.group_shapes}
            new_shapes = dict(self.feature_source.group_shapes)
            if new_shapes != own_shapes:
                raise AhpaError(f"VAE {vae_swap[-1]} gives feature groups {new_shapes}, but the router and head expect "
                                f"{own_shapes} (layers, channels): its group shapes do not fit this checkpoint")
        shapes = dict((self.feature_source or self.source).group_shapes)
        torch.manual_seed(cfg.train.seed)  # a fresh initialisation is the training run's step 0
        self.sit = build_backbone(cfg, self.source.latent_shape)
        own = build_objective(cfg, self.sit, {g: shapes[g] for g in cfg.prior.groups}) if cfg.align.method != "vanilla" else None
        if self.ckpt is not None:
            load_state(self.sit, self.ckpt / WEIGHTS[args.weights], "SiT weights")
            if own is not None and len(own.state_dict()):
                load_state(own, self.ckpt / OBJECTIVE_FILE, "alignment objective")
        self.sit.eval().to(device)
        self.transport = build_transport(cfg)
        self.targets: list[Target] = []
        for (kind, rest), spec in zip(parsed, specs):
            self.targets.append(self._target(kind, rest, spec, own, shapes, other_cfgs.get(spec)))
        for t in self.targets:  # validate the parameter set of every target now
            select_parameters(AlignmentProbe(self.sit, t.objective, self.transport), args.params)

    def _other_config(self, path: str):
        p = Path(path)
        if p.is_dir():
            ck = checkpoint_dir(path)
            return read_config(ck), ck
        if p.is_file():
            return load_config(p), None
        raise AhpaError(f"--target config:{path}: no such checkpoint directory or YAML file")

    def _target(self, kind, rest, spec, own, shapes, other) -> Target:
        fresh_heads = self.args.head_init == "fresh"
        if kind == "own":
            return Target(spec, own.to(self.device), "trained", list(own.groups))
        if kind == "config":
            ocfg, ock = other
            if ocfg.align.method == "vanilla":
                raise AhpaError(f"--target {spec}: that config trains no alignment objective (align.method=vanilla)")
            missing = [g for g in ocfg.prior.groups if g not in shapes]
            if missing:
                raise AhpaError(f"--target {spec} needs features {missing} that the data source does not provide (has {sorted(shapes)})")
            torch.manual_seed(self.args.seed)
            obj = build_objective(ocfg, self.sit, {g: shapes[g] for g in ocfg.prior.groups})
            if ock is not None:
                load_state(obj, ock / OBJECTIVE_FILE, "alignment objective")
                head = f"trained ({ock})"
            else:
                head = "fresh" if fresh_heads else transfer_head(own, obj)
            return Target(spec, obj.to(self.device), head, list(obj.groups))
        keys = rest.split("+") if rest else list(self.cfg.prior.groups)
        missing = [k for k in keys if k not in shapes]
        if missing:
            raise AhpaError(f"--target {spec}: the data source provides no features {missing} (it has {', '.join(sorted(shapes))})")
        torch.manual_seed(self.args.seed)
        obj = _static_objective(kind, keys, shapes, self.cfg, self.sit)
        head = "fresh" if fresh_heads else transfer_head(own, obj)
        return Target(spec, obj.to(self.device), head, keys)

    def batch(self, k: int, t: float) -> dict:
        """The batch of grid point ``k``: fresh images (batch ``k`` of the stream) and noise, all at time ``t``."""
        return trajectory_batch(self.source, self.cfg, self.args.n, self.args.seed, k, t, self.device, self.feature_source)

    def describe(self) -> dict:
        a = self.args
        return {
            "checkpoint": str(self.ckpt) if self.ckpt else None, "config": a.config, "weights": a.weights if self.ckpt else "fresh init",
            "model": self.cfg.model.name, "vae": self.cfg.vae.path,
            "supervisor_vae": self.feature_source.cfg.vae.path if self.feature_source else self.cfg.vae.path,
            "n": a.n, "t": self.t_values, "params": a.params, "method": a.method, "chunk_size": a.chunk_size, "seed": a.seed,
            "targets": [{"target": t.spec, "router": t.objective.router.__class__.__name__, "keys": t.keys,
                         "depths": t.objective.depths, "head": t.head} for t in self.targets],
            "gsnr": "||g_bar||^2 / tr(S), tr(S) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1); gsnr_batch = n * gsnr",
        }


def _write_outputs(out: Path, info: dict, records: list[dict]) -> dict:
    summary = {}
    for spec in dict.fromkeys(r["target"] for r in records):
        rs = [r for r in records if r["target"] == spec]
        summary[spec] = {"gsnr_batch": summarize(rs, "gsnr_batch"), "gsnr": summarize(rs, "gsnr"),
                         "cos_diff_align": summarize(rs, "cos_diff_align")}
    result = _finite_or_null(dict(info, summary=summary, records=records))
    write_json_atomic(out / "gsnr.json", result, indent=1)  # strict JSON: undefined values (NaN) as null
    buf = io.StringIO()
    fields = list(records[0])
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(records)
    with atomic_open(out / "gsnr.csv", "w") as f:
        f.write(buf.getvalue())
    plot_gsnr(records, out / "gsnr.png", title=info.get("title", ""))
    return summary


def _finite_or_null(x):
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def plot_gsnr(records: list[dict], path: Path, title: str = "") -> None:
    """Fig. 2 layout: G-SNR (batch-mean form) against t, one curve per target; beside it the
    per-sample form and the diffusion/alignment gradient cosine.  t = 1 (noise) on the left."""

    fig = Figure(figsize=(13.5, 3.8))
    axes = fig.subplots(1, 3)
    panels = (("gsnr_batch", "n $\\cdot$ G-SNR (batch-mean form)"), ("gsnr", "G-SNR (per sample)"),
              ("cos_diff_align", "cos(mean diffusion grad, mean align grad)"))
    for ax, (key, label) in zip(axes, panels):
        for spec in dict.fromkeys(r["target"] for r in records):
            rs = sorted((r for r in records if r["target"] == spec), key=lambda r: r["t"])
            ax.plot([r["t"] for r in rs], [r[key] for r in rs], marker="o", ms=3, label=spec)
        ax.set_title(label, fontsize=10)
        ax.set_xlim(1.0, 0.0)
        ax.set_xlabel("t  (1 = noise  \u2192  0 = data)")
        ax.grid(alpha=0.3)
        if key != "cos_diff_align":
            vals = [r[key] for r in records if math.isfinite(r[key]) and r[key] > 0]
            if vals and max(vals) / min(vals) > 20:
                ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="k", lw=0.6)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=120)


def run_gsnr(args: argparse.Namespace) -> int:
    torch.set_grad_enabled(True)
    run = GSNRRun(args)  # every check happens here, before anything is written
    out = Path(args.out)
    info = run.describe()
    info["title"] = f"{info['checkpoint'] or info['config']}  ({info['params']}, n={args.n})"
    progress_path = out / ".gsnr_progress.json"
    key = json.dumps({k: v for k, v in info.items() if k != "title"}, sort_keys=True, default=str)
    done: dict = {}
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        if saved.get("key") == key:
            done = saved.get("points", {})

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = tqdm(total=len(run.t_values) * len(run.targets), desc="gsnr", disable=args.quiet, dynamic_ncols=True)
    bar.update(sum(len(v) for v in done.values()))
    with preemption.handlers():  # SIGTERM/SIGUSR1: stop after the t in flight (its points are written), exit 75
        _probe_points(run, args, done, key, progress_path, bar)
    bar.close()
    records = [r for k in range(len(run.t_values)) for r in done[str(k)]]
    info["seconds"] = round(time.perf_counter() - t0, 2)
    summary = _write_outputs(out, info, records)
    progress_path.unlink(missing_ok=True)
    print(format_summary(summary))
    print(f"wrote {out}/gsnr.json, gsnr.csv, gsnr.png")
    return 0


def _probe_points(run: GSNRRun, args, done: dict, key: str, progress_path: Path, bar) -> None:
    """The points of every t not yet in ``done``, recorded after each t in ``progress_path``."""
    for k, t in enumerate(run.t_values):
        preemption.check(f"{len(done)} of {len(run.t_values)} t values are recorded in {progress_path}; "
                         "rerun the same command to continue")
        if str(k) in done and len(done[str(k)]) == len(run.targets):
            continue
        batch = run.batch(k, t)
        point = []
        for target in run.targets:
            probe = AlignmentProbe(run.sit, target.objective, run.transport)
            rec = {"target": target.spec, "t": t} | probe_point(probe, batch, args.params, args.method, args.chunk_size)
            point.append(rec)
            bar.update(1)
        done[str(k)] = point
        write_json_atomic(progress_path, {"key": key, "points": done})  # a killed run resumes per t


def format_summary(summary: dict) -> str:
    """Table 7: mean G-SNR over t > 0.5, t < 0.5 and all t, both forms."""
    lines = [f"{'target':<28} {'n*G-SNR t>0.5':>14} {'t<0.5':>9} {'all':>9}   {'G-SNR t>0.5':>12} {'t<0.5':>9} {'all':>9}"]
    for spec, s in summary.items():
        b, p = s["gsnr_batch"], s["gsnr"]
        lines.append(f"{spec:<28} {b['t>0.5']:>14.4g} {b['t<0.5']:>9.4g} {b['all']:>9.4g}   "
                     f"{p['t>0.5']:>12.4g} {p['t<0.5']:>9.4g} {p['all']:>9.4g}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="checkpoint directory (RUN/checkpoints/STEP) or run directory (its latest)")
    p.add_argument("--config", help="instead of --ckpt: a config, probed at its fresh initialisation")
    p.add_argument("--out", required=True, help="output directory for gsnr.json, gsnr.csv, gsnr.png")
    p.add_argument("--target", action="append",
                   help="repeatable: own (default), uniform:G3, uniform:G3+G4, linear[:KEYS], config:PATH")
    p.add_argument("--params", default="upstream",
                   help="parameter set: upstream (default: embedders + blocks 1..d), block:N, blocks:A-B, head, router, sit, all; join with '+'")
    p.add_argument("--n", type=int, default=64, help="samples per t (default 64)")
    p.add_argument("--num-t", type=int, default=20, help="t grid: bin centres of (0, 1) (default 20)")
    p.add_argument("--t", help="explicit comma-separated t values instead of --num-t")
    p.add_argument("--method", default="ghost", help=f"per-sample gradients: {', '.join(METHODS)} (default ghost)")
    p.add_argument("--chunk-size", type=int, default=8, help="samples per vmap chunk (--method vmap)")
    p.add_argument("--weights", choices=("online", "ema"), default="online", help="SiT weights of the checkpoint (default: online, the trained ones)")
    p.add_argument("--head-init", choices=("trained", "fresh"), default="trained",
                   help="static targets: reuse the checkpoint's head where it fits (default) or a fresh one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value on the checkpoint's config; vae.path=... swaps the supervisor encoder only (Table B.10)")
