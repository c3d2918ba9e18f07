"""``ahpa study``: the 95% interval, the shared-recipe check, missing configs, the cluster
commands, and a study SIGKILLed during a training and during an evaluation that resumes
into the same results.csv as an uninterrupted one."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ahpa.cli import main as cli_main
from ahpa.config import PRESETS
from ahpa.errors import AhpaError
from ahpa.study.results import mean_interval
from ahpa.study.schema import load_study

pytestmark = pytest.mark.usefixtures("one_thread")  # as the subprocesses (OMP_NUM_THREADS=1): same bytes

TOY = str(PRESETS / "toy.yaml")
TINY_RECIPE = ["train.global_batch=8", "train.steps=4", "train.log_every=1", "train.ckpt_every=1",
               "train.grid_steps=2", "train.ema_decay=0.9"]


def write_study(path: Path, methods: list[dict], **extra) -> Path:
    study = {"name": "tiny", "methods": methods, "seeds": [0], "milestones": [2, 4], "samples": 20, "sample_batch": 10,
             "sampler": {"mode": "ode", "method": "euler", "steps": 2}, "reference": {"kind": "digits", "split": "train"},
             "overrides": TINY_RECIPE} | extra
    path.write_text(yaml.safe_dump(study))
    return path


def test_mean_interval_on_hand_made_numbers():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.182446 (any t table): half = 3.182446 * s / 2
    mean, half, n = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6)
    mean, half, n = mean_interval([2.0, 4.0])  # t_{0.975, 1} = 12.7062, s = sqrt(2): half = 12.7062
    assert mean == 3.0 and half == pytest.approx(12.7062, rel=1e-5)
    mean, half, n = mean_interval([7.0, None])  # one value: no interval
    assert (mean, n) == (7.0, 1) and math.isnan(half)


def test_methods_that_disagree_on_the_recipe_are_refused_naming_the_key(tmp_path):
    path = write_study(tmp_path / "s.yaml", [{"name": "a", "config": TOY}, {"name": "b", "config": TOY, "overrides": ["train.global_batch=16"]}])
    with pytest.raises(AhpaError, match="disagree on train.global_batch"):
        load_study(path)
    path = write_study(tmp_path / "s.yaml", [{"name": "a", "config": TOY}, {"name": "b", "config": TOY, "overrides": ["vae.scaling_factor=0.2"]}])
    with pytest.raises(AhpaError, match="disagree on vae.scaling_factor"):
        load_study(path)
    path = write_study(tmp_path / "s.yaml", [{"name": "a", "config": TOY}, {"name": "b", "config": TOY, "overrides": ["align.router=uniform"]}])
    assert [m.name for m in load_study(path).methods] == ["a", "b"]  # the method may differ, the recipe not


def test_missing_configs_are_named_or_skipped_with_a_note(tmp_path, capsys):
    path = write_study(tmp_path / "s.yaml", [{"name": "a", "config": TOY}, {"name": "b", "config": "configs/nope.yaml"}])
    assert cli_main(["study", "--config", str(path), "--print-commands"]) == 2
    assert "configs/nope.yaml' does not exist" in capsys.readouterr().err
    path = write_study(tmp_path / "s.yaml", [{"name": "a", "config": TOY}, {"name": "b", "config": "configs/nope.yaml", "optional": True}])
    assert cli_main(["study", "--config", str(path), "--print-commands", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "b skipped: config configs/nope.yaml does not exist" in captured.err
    assert "# a-s0" in captured.out and "# b-s0" not in captured.out


def test_b2_table3_prints_the_cluster_runs(capsys):
    assert cli_main(["study", "--preset", "b2-table3", "--print-commands", "--out", "/data/st", "data.path=/data/cache"]) == 0
    out, err = capsys.readouterr()
    for name in ("vanilla", "sra2", "repa", "ahpa"):
        if (PRESETS / f"sit-b2-{name}.yaml").is_file():
            assert f"# {name}-s0" in out
            train = next(line for line in out.splitlines() if line.startswith("accelerate launch -m ahpa.cli train") and f"/runs/{name}-s0" in line)
            assert "train.steps=400000" in train and "data.path=/data/cache" in train and f"sit-b2-{name}.yaml" in train
            for step in ("0100000", "0200000", "0400000"):
                assert f"--ckpt /data/st/runs/{name}-s0/checkpoints/{step} --out /data/st/samples/{name}-s0/{step} --num 50000" in out
                assert f"--out /data/st/evals/{name}-s0/{step}.metrics.json" in out
            assert "--mode ode --method euler --steps 250 --cfg-scale 1.0" in out
        else:
            assert f"{name} skipped: config configs/sit-b2-{name}.yaml does not exist" in err


# A child that stops itself (SIGSTOP) before the n-th call of a function: caught there and SIGKILLed.
STOP_BEFORE = """
import os, signal, sys, threading
import importlib
module = importlib.import_module({module!r})
owner = getattr(module, {owner!r}) if {owner!r} else module
real, seen = getattr(owner, {name!r}), [0]
def wrapper(*args, **kwargs):
    seen[0] += 1
    if seen[0] == {n}:
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    return real(*args, **kwargs)
setattr(owner, {name!r}, wrapper)
from ahpa.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_until_stopped(code: str, argv: list[str], timeout: float = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the child ended (rc {proc.returncode}) before the kill point: {proc.stderr.read().decode()[-2000:]}")
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "T":  # stopped at the kill point
                break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError("the child never reached the kill point")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_study_killed_during_training_and_evaluation_resumes_to_the_same_results(tmp_path, monkeypatch):
    study = write_study(tmp_path / "tiny.yaml", [{"name": "ahpa", "config": TOY}])  # one run: the kill points are exact
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # the uninterrupted reference goes through --jobs (its run in a subprocess, logged); the killed one runs in-process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli_main(["study", "--config", str(study), "--out", str(whole), "--jobs", "2"]) == 0
    assert (whole / "logs" / "ahpa-s0.log").is_file() and (whole / "evals" / "ahpa-s0" / "0000004.json").is_file()
    argv = ["study", "--config", str(study), "--out", str(killed)]
    # 1. killed in the middle of the second training segment (before its step-3 checkpoint)
    run_until_stopped(STOP_BEFORE.format(module="ahpa.train", owner="Trainer", name="save", n=3), argv)
    assert (killed / "evals" / "ahpa-s0" / "0000002.json").is_file()
    assert not (killed / "evals" / "ahpa-s0" / "0000004.json").exists()
    assert (killed / "runs" / "ahpa-s0" / "checkpoints" / "latest").read_text().strip() == "0000002"
    # 2. the rerun killed while sampling step 4 (before its second part file)
    run_until_stopped(STOP_BEFORE.format(module="ahpa.generate.engine", owner="", name="save_npz_atomic", n=2), argv)
    parts = list((killed / "samples" / "ahpa-s0" / "0000004" / "parts").glob("part_*.npz"))
    assert len(parts) == 1 and not (killed / "evals" / "ahpa-s0" / "0000004.metrics.json").exists()
    # 3. the rerun to the end, in-process
    assert cli_main(argv) == 0
    assert (killed / "results.csv").read_text() == (whole / "results.csv").read_text()
    rows = (whole / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and rows[0].startswith("method,seed,step,cfid,accuracy,num_samples,loss_diffusion,loss_align")
    assert "gamma_G4_t0.5" in rows[0]
    for name in ("results.md", "fid_vs_steps.png", "grids/ahpa/0000004.png", "grids/ahpa/0000002.png"):
        assert (whole / name).is_file()
    md = (whole / "results.md").read_text()
    assert "| ahpa |" in md and "4 steps" in md and "## Router at 4 steps" in md


def test_paired_differences_are_per_seed_and_excluding_zero_is_marked():
    from types import SimpleNamespace

    from ahpa.study.results import paired_differences, results_markdown

    rows = [{"method": m, "seed": s, "step": 10, "cfid": v, "accuracy": 0.5, "num_samples": 4}
            for m, vals in (("vanilla", (6.0, 6.5, 5.8)), ("control", (4.9, 5.2, 4.6))) for s, v in zip((0, 1, 2), vals)]
    rows.append({"method": "control", "seed": 7, "step": 10, "cfid": 0.0, "accuracy": 0.5, "num_samples": 4})  # unpaired
    mean, half, n = paired_differences(rows, "control", "vanilla", "cfid", 10)
    d = [-1.1, -1.3, -1.2]  # per seed, by hand
    assert n == 3 and mean == pytest.approx(sum(d) / 3)
    assert (mean, half, n) == pytest.approx(mean_interval(d))
    study = SimpleNamespace(name="t", description="", seeds=[0, 1, 2], samples=4, milestones=[10], skipped=[],
                            sampler={"mode": "ode", "method": "euler", "steps": 10, "cfg_scale": 1.0},
                            reference={"kind": "digits", "split": "train"},
                            methods=[SimpleNamespace(name="vanilla"), SimpleNamespace(name="control")])
    study.runs = lambda: [(m, s) for s in study.seeds for m in study.methods]
    md = results_markdown(study, rows)
    assert "## Per-seed difference from vanilla" in md and "| control | -1.200 ± 0.248 (n=3) * |" in md
    assert "| control | +0.000 ± 0.000 (n=3) |" in md  # accuracy: no difference, not marked


def test_seeds_for_power_matches_the_published_one_sample_t_table():
    """G*Power's one-sample (paired) t-test, two-sided alpha 0.05, power 0.8: n = 34 for d = 0.5, 15 for d = 0.8."""
    from ahpa.study.results import seeds_for_power

    assert seeds_for_power(1.0, 0.5) == 34
    assert seeds_for_power(2.0, 1.6) == 15  # only the ratio delta / sd matters
    assert seeds_for_power(0.22 * 2 ** 0.5, 1.0) == 4  # the positive-control toy: cFID difference 1 at step 1600


def test_steps_to_reach_interpolates_between_milestones_and_the_speedup_section():
    from types import SimpleNamespace

    from ahpa.study.results import results_markdown, steps_to_reach

    # cFID 20 -> 8 between steps 100 and 200 crosses 10 at 100 + 100 * (10 - 20) / (8 - 20) = 183.33
    assert steps_to_reach([(200, 8.0), (100, 20.0), (300, 6.0)], 10.0, lower_better=True) == pytest.approx(100 + 100 * 10 / 12)
    assert steps_to_reach([(100, 9.0), (200, 8.0)], 10.0, lower_better=True) == 100.0  # already there: the first milestone
    assert steps_to_reach([(100, 12.0), (200, 11.0)], 10.0, lower_better=True) is None
    assert steps_to_reach([(100, 0.5), (200, 0.9)], 0.8, lower_better=False) == pytest.approx(175.0)
    rows = [{"method": m, "seed": s, "step": step, "cfid": v, "accuracy": 0.5, "num_samples": 4}
            for m, curves in (("vanilla", {0: (20.0, 10.0), 1: (22.0, 10.0)}), ("fast", {0: (10.0, 8.0), 1: (16.0, 9.0)}),
                              ("slow", {0: (30.0, 12.0), 1: (25.0, 10.0)}))
            for s, vals in curves.items() for step, v in zip((100, 200), vals)]
    study = SimpleNamespace(name="t", description="", seeds=[0, 1], samples=4, milestones=[100, 200], skipped=[],
                            sampler={"mode": "ode", "method": "euler", "steps": 10, "cfg_scale": 1.0},
                            reference={"kind": "digits", "split": "train"},
                            methods=[SimpleNamespace(name=n) for n in ("vanilla", "fast", "slow")])
    study.runs = lambda: [(m, s) for s in study.seeds for m in study.methods]
    md = results_markdown(study, rows)
    assert "## Steps to reach vanilla's final quality" in md and "### cfid (threshold 10.000)" in md
    # fast: seed 0 is already there at 100 (<=100); seed 1 crosses at 100 + 100 * (10 - 16) / (9 - 16) = 185.7
    assert "| fast | <=100, 186 | 143 ± 545 | 1.40x | 0 |" in md
    assert "| slow | >200, 200 | 200 | 1.00x | 1 |" in md
    assert "| vanilla | 200, 200 | 200 ± 0 | 1.00x [1.00, 1.00] | 0 |" in md


def test_another_studys_directory_is_refused_not_overwritten(tmp_path, capsys):
    path = write_study(tmp_path / "s.yaml", [{"name": "a", "config": TOY}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.yaml").write_text("name: other\n")
    assert cli_main(["study", "--config", str(path), "--out", str(out), "--run", "a-s0"]) == 2
    assert "holds study 'other', not 'tiny'" in capsys.readouterr().err
    assert (out / "study.yaml").read_text() == "name: other\n" and sorted(p.name for p in out.iterdir()) == ["study.yaml"]
