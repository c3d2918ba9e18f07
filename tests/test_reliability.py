"""Issue 9: no silent data loss, no mixed results, non-finite training caught, one clear line for every bad input.

One test (or parametrised family) per class of finding; each fails on the code before the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ahpa import cli
from ahpa.checkpointing import (
    MANIFEST,
    _prune,
    latest_checkpoint,
    load_checkpoint,
    resume_from_latest,
    save_checkpoint,
)
from ahpa.config import load_config
from ahpa.errors import AhpaError
from ahpa.io import LOCK_FILE, RunLock
from ahpa.models.checkpoints import save_ema_safetensors
from ahpa.models.sit import build_sit
from ahpa.nonfinite import NonFiniteGuard
from ahpa.train import Trainer
from ahpa.training_module import update_ema

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy.yaml"
FAST = ["train.global_batch=4", "train.grid_steps=1", "train.max_minutes=0", "train.log_every=1", "train.ckpt_every=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_cfg(out: Path, *extra: str):
    return load_config(TOY, [f"train.out={out}", *FAST, *extra])


def error_line(capsys, *argv) -> str:
    """``ahpa ARGV`` in this process: exit 2, exactly one error line, no traceback."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A 2-step toy AHPA run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(toy_cfg(out, "train.steps=2"), show_progress=False).run()
    assert sorted(p.name for p in (out / "checkpoints").glob("0*")) == ["0000001", "0000002"]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- 1. train-vae --out
def test_train_vae_keeps_a_foreign_directory_and_a_file(capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n")
    line = error_line(capsys, "train-vae", "--out", folder, "--steps", "1")
    assert "not a previous `ahpa train-vae` output" in line
    assert (folder / "thesis.tex").read_text() == "years of work\n"
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    line = error_line(capsys, "train-vae", "--out", file, "--steps", "1")
    assert "is an existing file" in line and file.read_text() == "keep me\n"
    from ahpa.data.tiny_vae import ASSET_DIR, previous_output

    assert previous_output(ASSET_DIR)  # the committed asset is what train-vae writes: it may be replaced


# ---------------------------------------------------------------------- 2. mixed checkpoints in one sample directory
def test_sample_directory_is_bound_to_the_checkpoint(tmp_path):
    from ahpa.generate.engine import generate_samples

    meta = dict(model="SiT-T/4", input_size=8, in_channels=4, num_classes=10, learn_sigma=False, vae="tiny",
                scaling_factor=0.5, latent_shift=None, latent_scale=None, time_convention="repa")
    sampler = dict(mode="ode", steps=2, cfg_scale=1.0, guidance_interval=(0.0, 1.0))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_sit("SiT-T/4", input_size=8, num_classes=10)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
        models.append(m.eval())
    decode = lambda x: torch.tanh(x[:, :3])  # noqa: E731
    out = tmp_path / "samples"
    # the first checkpoint draws half of the samples (a run stopped half-way: its parts stay)
    generate_samples(models[0], meta, decode, out, 4, 2, sampler, rank=0, world=2)
    before = tree(out)
    with pytest.raises(AhpaError, match="another checkpoint"):
        generate_samples(models[1], meta, decode, out, 4, 2, sampler)
    assert tree(out) == before
    assert generate_samples(models[0], meta, decode, out, 4, 2, sampler) is not None  # the same one resumes


# ---------------------------------------------------------------------- 3. run-directory lock
@pytest.mark.slow
def test_second_process_on_a_locked_directory_is_refused_and_a_stale_lock_is_taken_over(capsys, tmp_path, two_step_run):
    out = tmp_path / "run"
    holder = RunLock(out, "ahpa train").acquire()  # another open file description: flock conflicts as between processes
    try:
        line = error_line(capsys, "train", "--config", TOY, "--out", out, *FAST, "train.steps=1")
        assert f"PID {os.getpid()}" in line and "in use by another ahpa process" in line
        line = error_line(capsys, "extract", tmp_path, "--out", out, "--vae", "tiny", "--resolution", "32")
        assert f"PID {os.getpid()}" in line
        line = error_line(capsys, "sample", "--ckpt", latest_checkpoint(two_step_run), "--out", out, "--num", "2", "--steps", "1")
        assert f"PID {os.getpid()}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.release()
    # a holder killed with -9 leaves its file (naming a PID that no longer runs) but not its flock
    out.mkdir()
    gone = dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "command": "ahpa train"}))
    assert cli.main(["train", "--config", str(TOY), "--out", str(out), *FAST, "train.steps=1"]) == 0
    assert f"took over the stale lock of PID {gone}" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "0000001" and not (out / LOCK_FILE).exists()


def test_lock_without_flock_falls_back_to_exclusive_create_with_pid_check(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    first = RunLock(tmp_path, "a").acquire()
    assert first.mode == "exclusive-create"
    with pytest.raises(AhpaError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path, "b").acquire()
    first.release()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    taken = RunLock(tmp_path, "c").acquire()
    assert taken.took_over is not None
    taken.release()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-node"}))  # cannot be checked: never taken over
    with pytest.raises(AhpaError, match="another-node"):
        RunLock(tmp_path, "d").acquire()


# ---------------------------------------------------------------------- 4. non-finite training
def _optimizer_state(opt) -> dict:
    return {f"{i}.{k}": v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_step_in_the_training_loop_changes_nothing_and_is_counted(two_step_run, tmp_path):
    run = copy_run(two_step_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "0000002")
    (run / "checkpoints" / "latest").write_text("0000001\n")
    trainer = Trainer(toy_cfg(run, "train.steps=2", "train.max_nonfinite_steps=5"), show_progress=False)
    assert trainer.step == 1
    forward = trainer.forward

    def nan_loss(*args):
        loss, diff, align = forward(*args)
        return loss * float("nan"), diff, align

    trainer.forward = nan_loss
    trainer.run()
    a, b = run / "checkpoints" / "0000001", run / "checkpoints" / "0000002"
    for name in ("model.safetensors", "ema.safetensors", "objective.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert _same(wa, wb), name
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True)["state"] for c in (a, b))
    assert oa.keys() == ob.keys() and all(_same(oa[k], ob[k]) for k in oa)  # moments and step count too
    state = json.loads((b / "state.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["history"][-1]["nonfinite_skipped"] == 1


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_the_run_without_saving(capsys, tmp_path, monkeypatch):
    import ahpa.training_module

    original = ahpa.training_module.TrainingModule.forward
    monkeypatch.setattr(ahpa.training_module.TrainingModule, "forward",
                        lambda self, *a: tuple(v * float("nan") for v in original(self, *a)))
    out = tmp_path / "run"
    line = error_line(capsys, "train", "--config", TOY, "--out", out, *FAST, "train.steps=6", "train.max_nonfinite_steps=2",
                      "train.ckpt_every=0")
    assert "the last 2 steps (up to step 2) had a non-finite loss or gradient" in line and "Lower train.lr" in line
    assert latest_checkpoint(out) is None


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_guard_skips_the_update_bit_identically(fused, monkeypatch):
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused, foreach=None if fused else True)
    guard = NonFiniteGuard("cpu")

    def step(x):
        loss = model(x).square().mean()
        loss.backward()
        found = guard.check(loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        guard.step(opt, found)
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9, keep=guard.keep(found))

    step(torch.randn(2, 4))
    before = ({k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in ema.state_dict().items()},
              _optimizer_state(opt))
    if fused:  # the fused path decides on the device: reading the flag on the host would be a sync per step on GPUs
        def no_host_read(self, *a):
            raise AssertionError("host read of a device tensor")

        monkeypatch.setattr(torch.Tensor, "__bool__", no_host_read)
        monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    step(torch.full((2, 4), float("nan")))
    monkeypatch.undo()
    after = (model.state_dict(), ema.state_dict(), _optimizer_state(opt))
    assert all(_same(x, y) for x, y in zip(before, after))
    assert guard.counts() == (1, 1)
    step(torch.randn(2, 4))  # a finite step still trains and ends the streak
    assert not torch.equal(before[0]["weight"], model.weight) and guard.counts() == (1, 0)


def test_nonfinite_weights_are_never_saved_and_rotation_keeps_the_last_finite(tmp_path):
    trainer_like = dict(objective=None, rng_states=[], state={"step": 3}, meta={}, config_yaml="{}\n")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    bad = torch.nn.Linear(2, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")
    with pytest.raises(AhpaError, match="holds NaN/Inf"):
        save_checkpoint(tmp_path, 3, model=model, ema=bad, optimizer=opt, **trainer_like)
    assert not (tmp_path / "checkpoints" / "0000003").exists()
    # rotation: older checkpoints without manifests (unknown) never push the last known-finite one out
    root = tmp_path / "rot" / "checkpoints"
    for step, finite in ((1, True), (2, None), (3, None)):
        (root / f"{step:07d}").mkdir(parents=True)
        if finite:
            (root / f"{step:07d}" / MANIFEST).write_text(json.dumps({"finite": True, "files": {}}))
    _prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["0000001", "0000002", "0000003"]


def test_sampling_refuses_nonfinite_weights(capsys, tmp_path):
    model = build_sit("SiT-T/4", input_size=8, num_classes=10)
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(float("nan"))
    ckpt = tmp_path / "ema.safetensors"
    save_ema_safetensors(model, ckpt, dict(model="SiT-T/4", vae="tiny", num_classes=10))
    line = error_line(capsys, "sample", "--ckpt", ckpt, "--out", tmp_path / "out", "--num", "2")
    assert "NaN/Inf weights" in line and "final_layer.linear.weight" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 5. overrides on resume
@pytest.mark.slow
def test_resume_applies_the_optimizer_settings_and_records_them(two_step_run, tmp_path):
    run = copy_run(two_step_run, tmp_path / "run")
    trainer = Trainer(toy_cfg(run, "train.steps=3", "train.lr=1e-3", "train.betas=[0.8,0.99]"), show_progress=False)
    assert trainer.step == 2
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {1e-3}
    assert {tuple(g["betas"]) for g in trainer.optimizer.param_groups} == {(0.8, 0.99)}
    trainer.run()
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["resumes"] == [{"step": 2, "changed": {"train.lr": [5e-4, 1e-3], "train.betas": [[0.9, 0.999], [0.8, 0.99]]}}]
    with pytest.raises(AhpaError, match="beyond train.steps=1"):
        Trainer(toy_cfg(run, "train.steps=1"), show_progress=False)


# ---------------------------------------------------------------------- 6. damaged latest checkpoint
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": lambda c: _truncate(c / "model.safetensors"),
    "truncated ema": lambda c: _truncate(c / "ema.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "truncated rng": lambda c: _truncate(c / "rng.pt"),
    "bad state.json": lambda c: (c / "state.json").write_text("{not json"),
    "deleted objective": lambda c: (c / "objective.safetensors").unlink(),
    "flipped byte in ema": lambda c: _flip(c / "ema.safetensors"),
}


@pytest.fixture(scope="module")
def modules(two_step_run):
    trainer = Trainer(toy_cfg(two_step_run, "train.steps=2"), show_progress=False)
    trainer.close()
    return trainer


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_with_one_line(two_step_run, modules, tmp_path, damage):
    run = copy_run(two_step_run / "checkpoints", tmp_path / "run" / "checkpoints").parent
    DAMAGE[damage](run / "checkpoints" / "0000002")
    lines = []
    load = lambda c: load_checkpoint(c, model=modules.sit, ema=modules.ema, objective=modules.objective,  # noqa: E731
                                     optimizer=modules.optimizer)
    ckpt, (state, _) = resume_from_latest(run, load, log=lines.append)
    assert ckpt.name == "0000001" and state["step"] == 1
    assert len(lines) == 1 and "0000002" in lines[0] and "resuming from" in lines[0]


@pytest.mark.slow
def test_trainer_resumes_from_the_previous_checkpoint_and_old_ones_load_unverified(two_step_run, tmp_path, capsys):
    run = copy_run(two_step_run, tmp_path / "run")
    _flip(run / "checkpoints" / "0000002" / "ema.safetensors")
    (run / "checkpoints" / "0000001" / MANIFEST).unlink()  # as written before manifests existed
    temps = [run / ".router.png.0123abcd.tmp", run / "checkpoints" / "0000001" / ".router.png.0123abcd.tmp",
             run / "samples" / ".0000001.png.0123abcd.tmp"]  # what a process killed mid-write leaves
    for temp in temps:
        temp.parent.mkdir(exist_ok=True)
        temp.write_bytes(b"partial")
    trainer = Trainer(toy_cfg(run, "train.steps=2"), show_progress=False)
    assert trainer.step == 1
    assert not any(t.exists() for t in temps)
    out = capsys.readouterr().out
    assert "0000002: ema.safetensors does not match its sha256" in out and "loaded unverified" in out
    trainer.close()
    for name in ("0000001", "0000002"):  # all damaged: a clear refusal, never a silent restart from step 0
        _truncate(run / "checkpoints" / name / "model.safetensors")
    with pytest.raises(AhpaError, match="no checkpoint of .* can be resumed"):
        Trainer(toy_cfg(run, "train.steps=2"), show_progress=False)


# ---------------------------------------------------------------------- 8. damaged feature cache
def test_extract_rerun_redoes_exactly_the_damaged_shards(capsys, tmp_path):
    from test_cli_errors import image_folder

    images = image_folder(tmp_path / "images", per_class=2, classes=2)
    argv = ["extract", images, "--out", tmp_path / "cache", "--vae", "tiny", "--resolution", "32", "--workers", "0",
            "--shard-size", "2", "--batch", "2"]
    assert cli.main([str(a) for a in argv]) == 0
    shards = sorted((tmp_path / "cache" / "shards").glob("*.safetensors"))
    assert len(shards) == 2
    good = {p.name: p.read_bytes() for p in shards}
    untouched = shards[1].stat().st_mtime_ns
    shards[0].unlink()
    assert cli.main([str(a) for a in argv]) == 0
    assert "1 shard(s)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in shards} == good and shards[1].stat().st_mtime_ns == untouched
    _flip(shards[0])  # same size, same header: only the checksum sees it
    assert cli.main([str(a) for a in argv + ["--checksums"]]) == 0
    assert "does not match its sha256" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in shards} == good
    assert cli.main(["extract", "--verify", str(tmp_path / "cache")]) == 0


# ---------------------------------------------------------------------- 7 + tracebacks: one line, exit 2, nothing written
BAD_TRAIN = ["train.lr=-1", "train.lr=nan", "train.betas=[2,3]", "data.num_workers=-1", "train.ckpt_every=-1",
             "train.grad_clip=-1", "model.class_dropout=1", "model.class_dropout=-0.1", "align.weight=-1", "train.lr=0",
             "train.max_minutes=-1"]


@pytest.mark.parametrize("override", BAD_TRAIN)
def test_bad_training_values(capsys, tmp_path, override):
    line = error_line(capsys, "train", "--config", TOY, "--out", tmp_path / "run", override)
    assert f"'{override.split('=')[0]}'" in line
    assert not (tmp_path / "run").exists()


def _npz(path: Path, n: int = 4) -> Path:
    np.savez(path, np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8))
    return path


class StubInception:
    source, weights_id, has_logits, device = "stub", "stub", True, torch.device("cpu")

    def __call__(self, images):
        n = len(images)
        return {"pool": torch.randn(n, 2048), "spatial": torch.randn(n, 2023), "logits": torch.randn(n, 1008)}


@pytest.fixture
def evaluate_inputs(tmp_path, monkeypatch):
    from ahpa.evaluation import command

    monkeypatch.setattr(command, "load_inception", lambda *a, **k: StubInception())
    return _npz(tmp_path / "samples.npz"), _npz(tmp_path / "ref.npz")


def test_bad_evaluate_arguments(capsys, tmp_path, evaluate_inputs, monkeypatch):
    samples, ref = evaluate_inputs
    base = ["evaluate", samples, "--ref", ref, "--cache-dir", tmp_path / "fcache"]
    assert "--batch must be at least 1" in error_line(capsys, *base, "--batch", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no usable CUDA GPU" in error_line(capsys, *base, "--device", "cuda")
    (tmp_path / "adir").mkdir()
    assert "is an existing directory, but a file name is expected" in error_line(capsys, *base, "--out", tmp_path / "adir")
    flipped = tmp_path / "flipped.npz"
    data = bytearray(samples.read_bytes())
    data[400] ^= 0xFF  # inside arr_0's pixels: the zip directory still parses, the CRC does not match
    flipped.write_bytes(bytes(data))
    line = error_line(capsys, "evaluate", flipped, "--ref", ref, "--cache-dir", tmp_path / "fcache", "--out", tmp_path / "r.json")
    assert "is damaged" in line and "CRC" in line
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "samples.metrics.json").exists()
    assert not (tmp_path / "fcache").exists() or not any(p.name.endswith(".tmp") for p in (tmp_path / "fcache").rglob("*"))


def test_sample_steps_zero_writes_nothing(capsys, two_step_run, tmp_path):
    ckpt = latest_checkpoint(two_step_run)
    line = error_line(capsys, "sample", "--ckpt", ckpt, "--out", tmp_path / "s", "--steps", "0", "--num", "2")
    assert "--steps must be at least 1" in line and not (tmp_path / "s").exists()


def _fake_usage(free):
    return lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free)


OUTPUT_COMMANDS = {
    "train": lambda out, run: ["train", "--config", TOY, "--out", out, *FAST, "train.steps=1"],
    "sample": lambda out, run: ["sample", "--ckpt", latest_checkpoint(run), "--out", out, "--num", "2", "--steps", "1"],
    "extract": lambda out, run: ["extract", run / "images", "--out", out, "--vae", "tiny", "--resolution", "32", "--workers", "0"],
    "evaluate": lambda out, run: ["evaluate", run / "samples.npz", "--ref", run / "samples.npz", "--out", out,
                                  "--cache-dir", run / "fcache"],
    "train-vae": lambda out, run: ["train-vae", "--out", out, "--steps", "1"],
}


@pytest.fixture(scope="module")
def inputs(two_step_run, tmp_path_factory):
    from test_cli_errors import image_folder

    root = tmp_path_factory.mktemp("inputs")
    image_folder(root / "images")
    _npz(root / "samples.npz")
    (root / "checkpoints").symlink_to(two_step_run / "checkpoints")
    return root


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
@pytest.mark.parametrize("problem", ["existing file", "read-only", "full disk"])
def test_unusable_output_paths(capsys, tmp_path, monkeypatch, inputs, command, problem):
    from ahpa.evaluation import command as evaluate_command

    monkeypatch.setattr(evaluate_command, "load_inception", lambda *a, **k: StubInception())
    place = tmp_path / "place"
    place.mkdir()
    out = place / ("out.json" if command == "evaluate" else "out")
    if problem == "existing file" and command == "evaluate":
        out.mkdir()  # a directory where a file is expected
    elif problem == "existing file":
        out.write_text("precious\n")
    elif problem == "read-only":  # what a non-root user sees in a chmod 555 directory (these tests may run as root)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == place else real_access(p, mode, **k))
    else:
        monkeypatch.setattr(shutil, "disk_usage", _fake_usage(1000))
    before = tree(place)
    line = error_line(capsys, *OUTPUT_COMMANDS[command](out, inputs))
    expected = {"existing file": "existing", "read-only": "not writable", "full disk": "free"}[problem]
    assert expected in line and str(place) in line
    assert tree(place) == before and sorted(p.name for p in place.iterdir()) == sorted(before.keys() | ({out.name} if out.is_dir() else set()))


def test_partial_feature_cache_entry_of_a_killed_run_is_removed(tmp_path):
    from ahpa.evaluation.features import FEATURES_VERSION, cached_features, images_sha256
    from ahpa.evaluation.npz import open_npz_images

    images = open_npz_images(_npz(tmp_path / "a.npz"))
    entry = f"{images_sha256(images)[:24]}-stub-v{FEATURES_VERSION}"
    partial = tmp_path / "fcache" / f".{entry}.0123abcd.tmp"
    partial.mkdir(parents=True)
    (partial / "pool.npy").write_bytes(b"half")
    features = cached_features(images, StubInception(), tmp_path / "fcache", progress=False)
    assert features["pool"].shape == (4, 2048) and not partial.exists()


def test_offline_inception_lookup_says_once_what_it_looks_for(tmp_path, monkeypatch, capsys):
    from ahpa.evaluation import inception

    def offline(url, *a, **k):
        sys.stderr.write(f'Downloading: "{url}" to somewhere\n')  # what torch hub prints before failing
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert inception._download(timeout_s=1) is None
    err = capsys.readouterr().err
    assert err.count(inception.WEIGHTS_FILE) == 1 and "Downloading" not in err and "http" not in err


@pytest.mark.slow
def test_full_disk_while_writing_is_one_line(capsys, tmp_path, evaluate_inputs, monkeypatch):
    from ahpa.evaluation import command

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(command, "write_json_atomic", full)
    samples, ref = evaluate_inputs
    line = error_line(capsys, "evaluate", samples, "--ref", ref, "--cache-dir", tmp_path / "fcache", "--out", tmp_path / "r.json")
    assert "No space left on device" in line and str(tmp_path / "r.json") in line
