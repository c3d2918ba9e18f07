"""``ahpa study``: the command, ``--jobs`` (runs as subprocesses) and ``--print-commands`` (a cluster's shell commands)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ahpa import preemption
from ahpa.errors import AhpaError
from ahpa.io import write_text_atomic
from ahpa.study.results import collect, write_results
from ahpa.study.runner import run_one
from ahpa.study.schema import STUDY_PRESETS, Study, eval_paths, list_presets, load_study, run_name, run_overrides, step_dir


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
        extra = study.overrides + method.overrides + run_overrides(study, out, method, seed, study.milestones[-1])
        lines.append("accelerate launch -m ahpa.cli train --config " + q(rel(method.config)) + " " + " ".join(q(o) for o in extra))
        for step in study.milestones:
            sample_dir, metrics_path, _ = eval_paths(out, method, seed, step)
            ckpt = out / "runs" / name / "checkpoints" / step_dir(step)
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
    gpus = torch.cuda.device_count()
    pending = [run_name(m, s) for m, s in study.runs()]
    running: list[tuple[subprocess.Popen, str, int]] = []
    failed = []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    slots = list(range(jobs))
    stopped: list[str] = []  # runs told to stop by a forwarded SIGTERM/SIGUSR1 (ahpa/preemption.py)
    forwarded = None
    while pending or running:
        sig = preemption.requested()
        if sig is not None and forwarded is None:  # forward the signal to every run; start no more
            forwarded = sig
            for child, child_name, _ in running:
                child.send_signal(sig)
            print(f"[study] {sig.name}: stopping {len(running)} run(s) at their next checkpoint; "
                  f"{len(pending)} not started", flush=True)
            pending.clear()
            if not running:
                break
        while pending and slots:
            name, slot = pending.pop(0), slots.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            else:  # CPU: share the cores; N jobs of all-core thread pools each run many times slower than one job
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
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
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
        running.remove((proc, name, slot))
        slots.append(slot)
        if forwarded is not None and proc.returncode == preemption.EXIT_PREEMPTED:
            stopped.append(name)
            print(f"[study] {name} stopped (its checkpoint is saved)", flush=True)
            continue
        if proc.returncode:
            failed.append(name)
        print(f"[study] {name} {'failed (see its log)' if proc.returncode else 'finished'}", flush=True)
    if forwarded is not None:
        raise preemption.Preempted(f"stopped on {forwarded.name}: {len(stopped)} run(s) saved and stopped"
                                   + (f", {len(failed)} failed ({', '.join(failed)}; see {out / 'logs'})" if failed else "")
                                   + "; rerun the same study command to continue")
    if failed:
        raise AhpaError(f"runs failed: {', '.join(failed)}; see {out / 'logs'}; rerun the study to continue them")


def check_study_dir(out: Path, name: str) -> None:
    """``out`` is new, or holds this study (its ``study.yaml`` names it): another study's directory is refused,
    never overwritten (its runs, tables and study.yaml are not this study's to replace)."""
    previous = out / "study.yaml"
    if previous.is_file():
        try:
            held = (yaml.safe_load(previous.read_text()) or {}).get("name")
        except yaml.YAMLError:
            held = "(unreadable study.yaml)"
        if held != name:
            raise AhpaError(f"{out} holds study {held!r}, not {name!r}; choose another --out (a study resumes only in its own directory)")


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
    check_study_dir(out, study.name)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "study.yaml", yaml.safe_dump(study.raw, sort_keys=False))
    with preemption.handlers():  # SIGTERM/SIGUSR1: every run stops at its next checkpoint / unit, exit 75
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
