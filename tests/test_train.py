"""The training loop: exact resume, distributed equivalence, atomic checkpoints, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ahpa.checkpointing import latest_checkpoint
from ahpa.config import load_config
from ahpa.errors import AhpaError
from ahpa.train import Trainer
from ahpa.training_module import update_ema

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy.yaml"


def toy_cfg(out: Path, *extra: str):
    return load_config(TOY, [
        f"train.out={out}", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=0",
        "train.grid_steps=2", "train.max_minutes=0", "model.name=SiT-T/2", *extra,
    ])


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    out.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()})
    if (ckpt / "objective.safetensors").exists():
        out.update({f"objective.{k}": v for k, v in load_file(ckpt / "objective.safetensors").items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ahpa", "vanilla"])
def test_resume_is_exact(tmp_path, method):
    """N steps in one run == N/2 steps, a new process-like Trainer that resumes, N/2 more."""
    full = Trainer(toy_cfg(tmp_path / "full", "train.steps=6", f"align.method={method}"), show_progress=False).run()
    assert full["steps"] == 6
    Trainer(toy_cfg(tmp_path / "half", "train.steps=3", f"align.method={method}"), show_progress=False).run()
    resumed = Trainer(toy_cfg(tmp_path / "half", "train.steps=6", f"align.method={method}"), show_progress=False)
    assert resumed.step == 3
    resumed.run()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert a.keys() == b.keys()
    assert any(k.startswith("objective.") for k in a) == (method == "ahpa")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and training did move the weights (a resume that reloads nothing would also "match" a no-op)
    start = Trainer(toy_cfg(tmp_path / "fresh", "train.steps=0", f"align.method={method}"), show_progress=False)
    moved = max((start.sit.state_dict()[k[6:]] - a[k]).abs().max().item() for k in a if k.startswith("model.blocks"))
    assert moved > 1e-4


def test_checkpoint_outputs_and_router_plot(tmp_path):
    Trainer(toy_cfg(tmp_path, "train.steps=2"), show_progress=False).run()
    ckpt = latest_checkpoint(tmp_path)
    names = {p.name for p in ckpt.iterdir()}
    assert {"ema.safetensors", "model.safetensors", "objective.safetensors", "optimizer.pt", "rng.pt",
            "state.json", "config.yaml", "router.png"} <= names
    assert (tmp_path / "samples_step0.png").is_file() and (tmp_path / "samples.png").is_file()
    assert (tmp_path / "router.png").is_file() and (tmp_path / "config.yaml").is_file()
    # the exported EMA holds only SiT weights (docs/design.md section 4: no alignment weights at inference)
    ema = load_file(ckpt / "ema.safetensors")
    assert not any("router" in k or "head" in k or "objective" in k for k in ema)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2


@pytest.mark.slow
def test_kill_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    Trainer(toy_cfg(tmp_path, "train.steps=2"), show_progress=False).run()
    good = latest_checkpoint(tmp_path)
    before = load_file(good / "ema.safetensors")
    trainer = Trainer(toy_cfg(tmp_path, "train.steps=4"), show_progress=False)

    original = torch.save

    def torch_save_then_die(obj, path, *a, **k):  # the process dies half-way through writing
        original(obj, path, *a, **k)
        if str(path).endswith("optimizer.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torch_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(torch, "save", original)
    assert latest_checkpoint(tmp_path) == good
    after = load_file(good / "ema.safetensors")
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
    # rerunning continues from the good checkpoint and cleans the half-written one
    resumed = Trainer(toy_cfg(tmp_path, "train.steps=4"), show_progress=False)
    assert resumed.step == 2
    resumed.run()
    assert latest_checkpoint(tmp_path).name == "0000004"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_ema_update_closed_form():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema_before = [p.detach().clone() for p in a.parameters()]
    update_ema(a, b, decay=0.9)
    for e0, e1, p in zip(ema_before, a.parameters(), b.parameters()):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * p.detach())


@pytest.mark.slow
def test_resume_with_other_architecture_is_refused(tmp_path):
    Trainer(toy_cfg(tmp_path, "train.steps=1"), show_progress=False).run()
    with pytest.raises(AhpaError, match="align.router"):
        Trainer(toy_cfg(tmp_path, "train.steps=2", "align.router=lut"), show_progress=False)


@pytest.mark.slow
def test_batch_larger_than_the_dataset_is_refused(tmp_path):
    with pytest.raises(AhpaError, match="fewer than train.global_batch"):
        Trainer(toy_cfg(tmp_path, "train.global_batch=100000", "train.steps=1"), show_progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Two gloo processes with global batch 8 (4 each) give the update of one process with batch 8."""
    args = ["train.steps=2", "align.router=dynamic"]
    Trainer(toy_cfg(tmp_path / "one", *args), show_progress=False).run()
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "ahpa.cli", "train", "--config", str(TOY), "--out", str(tmp_path / "two"),
               "train.global_batch=8", "train.log_every=1", "train.ckpt_every=0", "train.grid_steps=2",
               "train.max_minutes=0", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # same update up to the order of floating-point sums in the all-reduce
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_wandb_without_the_package_is_a_clear_error(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(AhpaError, match="pip install wandb"):
        Trainer(toy_cfg(tmp_path, "train.steps=1", "train.wandb=true"), show_progress=False).run()
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_no_resume_refuses_a_directory_with_checkpoints(tmp_path):
    Trainer(toy_cfg(tmp_path, "train.steps=1"), show_progress=False).run()
    with pytest.raises(AhpaError, match="already holds checkpoints"):
        Trainer(toy_cfg(tmp_path, "train.steps=2"), show_progress=False, resume=False)
    with pytest.raises(AhpaError, match="train.global_batch"):  # the data stream would silently shift
        Trainer(toy_cfg(tmp_path, "train.steps=2", "train.global_batch=16"), show_progress=False)
