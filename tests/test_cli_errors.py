"""Bad input at the ``ahpa`` command: one line that names the problem and the fix, exit 2,
no traceback, and nothing already written is damaged (errors.py; contract "User-facing errors").
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ahpa import cli
from ahpa.checkpointing import latest_checkpoint
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.evaluation import command

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy.yaml"
TINY_VAE_WEIGHTS = ROOT / "ahpa" / "assets" / "tiny_vae" / "diffusion_pytorch_model.safetensors"
FAST = ["train.steps=1", "train.global_batch=4", "train.grid_steps=1", "train.ckpt_every=0", "train.max_minutes=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys, *argv: str) -> str:
    """Run ``ahpa ARGV`` in this process; it must exit 2 with a one-line error and no traceback."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def image_folder(root: Path, per_class: int = 2, classes: int = 2) -> Path:
    images, labels = load_toy("heldout")
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels.numpy() == c)[:per_class]):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / f"class{c}" / f"{k}.png")
    return root


def corrupt_folder(root: Path) -> Path:
    for name in ("a/x.png", "b/y.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"this is not an image")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 1-step SiT-T/2 run with AHPA on four images (data.source=images)."""
    root = tmp_path_factory.mktemp("run")
    images = image_folder(root / "images")
    out = root / "run"
    overrides = ["data.source=images", f"data.path={images}", "data.num_workers=0", *FAST]
    assert cli.main(["train", "--config", str(TOY), "--out", str(out), *overrides]) == 0
    assert latest_checkpoint(out) is not None
    return out


def test_subprocess_unknown_yaml_key_exits_2_with_one_line(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  nmae: SiT-T/2\n")
    proc = subprocess.run([sys.executable, "-m", "ahpa.cli", "train", "--config", str(config), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("ahpa train: error: ") and str(config) in line
    assert "unknown config key 'model.nmae'" in line and "Did you mean 'name'?" in line
    assert not (tmp_path / "run").exists()


def test_unknown_override_key_and_unknown_model(capsys, tmp_path):
    line = error_line(capsys, "train", "--config", TOY, "--out", tmp_path / "a", "train.stpes=3")
    assert "unknown config key 'train.stpes'" in line and "Did you mean 'steps'?" in line
    line = error_line(capsys, "train", "--config", TOY, "--out", tmp_path / "b", "model.name=SiT-Q/2")
    assert "unknown model 'SiT-Q/2'" in line and "choose one of" in line and "SiT-T/2" in line and "SiT-XL/2" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_empty_image_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for argv in (
        ["train", "--config", TOY, "--out", tmp_path / "run", "data.source=images", f"data.path={tmp_path / 'empty'}"],
        ["extract", tmp_path / "empty", "--out", tmp_path / "cache", "--vae", "tiny", "--resolution", "32", "--workers", "0"],
    ):
        line = error_line(capsys, *argv)
        assert "no image files" in line and str(tmp_path / "empty") in line
        assert "root/<class>/<image>" in line  # the expected layout, i.e. the fix


@pytest.mark.filterwarnings("ignore:skipping undecodable image", "ignore:This DataLoader will create")
def test_folder_of_corrupt_images_in_training(capsys, tmp_path):
    folder = corrupt_folder(tmp_path / "corrupt")
    line = error_line(capsys, "train", "--config", TOY, "--out", tmp_path / "run",
                      "data.source=images", f"data.path={folder}", *FAST, "train.global_batch=2")
    assert "could be decoded" in line and "x.png" in line
    assert "remove" in line or "replace" in line


@pytest.mark.filterwarnings("ignore:skipping undecodable image")
def test_folder_of_corrupt_images_in_training_one_process_names_the_files(capsys, tmp_path):
    folder = corrupt_folder(tmp_path / "corrupt")
    line = error_line(capsys, "train", "--config", TOY, "--out", tmp_path / "run",
                      "data.source=images", f"data.path={folder}", "data.num_workers=0", *FAST, "train.global_batch=2")
    assert f"no image under '{folder}' could be decoded" in line and "2 failed to decode" in line and "x.png" in line


def test_extract_folder_of_corrupt_images_names_files_and_fix(capsys, tmp_path):
    folder = corrupt_folder(tmp_path / "corrupt")
    line = error_line(capsys, "extract", folder, "--out", tmp_path / "cache", "--vae", "tiny", "--resolution", "32", "--workers", "0")
    assert "could be decoded" in line and "x.png" in line and ("remove" in line or "replace" in line)


def test_extract_after_fixing_corrupt_images_succeeds(capsys, tmp_path):
    folder = corrupt_folder(tmp_path / "corrupt")
    argv = ["extract", folder, "--out", tmp_path / "cache", "--vae", "tiny", "--resolution", "32", "--workers", "0"]
    error_line(capsys, *argv)
    good = load_toy("heldout")[0][:2].permute(0, 2, 3, 1).numpy()
    Image.fromarray(good[0]).save(folder / "a" / "x.png")
    Image.fromarray(good[1]).save(folder / "b" / "y.jpg", format="JPEG")
    assert cli.main([str(a) for a in argv]) == 0
    assert (tmp_path / "cache" / "manifest.json").is_file()


def test_sample_from_a_checkpoint_of_another_architecture(capsys, tmp_path, run_dir):
    # The tiny VAE's weights: a real safetensors checkpoint, but not of a SiT.
    line = error_line(capsys, "sample", "--ckpt", TINY_VAE_WEIGHTS, "--out", tmp_path / "a", "--num", "2")
    assert "not a SiT state dict" in line and "'pos_embed' is missing" in line
    assert "pass an ahpa ema.safetensors or a published SiT/REPA checkpoint" in line
    # A SiT-T/2 checkpoint asked to be a SiT-S/2: the first disagreeing tensor, what it looks like, the fix.
    line = error_line(capsys, "sample", "--ckpt", latest_checkpoint(run_dir), "--model", "SiT-S/2", "--out", tmp_path / "b")
    assert "SiT-S/2" in line and "expects" in line and "hidden_size=192" in line and "(SiT-T/2)" in line
    assert "pass the matching model name (or none, to infer it)" in line
    # A directory that holds no checkpoint.
    line = error_line(capsys, "sample", "--ckpt", tmp_path, "--out", tmp_path / "c")
    assert "ema.safetensors' does not exist" in line and "RUN/checkpoints/<step>/" in line
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("name, content", [
    pytest.param("notes.safetensors", b"these are my notes, not weights\n", id="text.safetensors"),
    pytest.param("notes.pt", b"these are my notes, not weights\n", id="text.pt"),
    pytest.param("junk.pt", b"nope\n", id="junk.pt"),
])
def test_sample_from_a_file_that_is_not_a_checkpoint(capsys, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    line = error_line(capsys, "sample", "--ckpt", tmp_path / name, "--out", tmp_path / "out")
    assert str(tmp_path / name) in line
    assert "RUN/checkpoints/<step>/" in line  # the fix: what to pass instead
    assert "will likely succeed" not in line


def test_evaluate_float_npz_leaves_results_untouched(capsys, tmp_path, monkeypatch):
    class NoNetwork:
        source, weights_id, has_logits = "stub", "stub", True

        def __call__(self, images):
            raise AssertionError("the bad input must be refused before any feature is computed")

    monkeypatch.setattr(command, "load_inception", lambda *a, **k: NoNetwork())
    floats = tmp_path / "samples.npz"
    np.savez(floats, np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32))
    good = tmp_path / "ref.npz"
    np.savez(good, np.zeros((4, 32, 32, 3), np.uint8))
    results = tmp_path / "results.json"
    results.write_text('{"fid": 1.0}\n')
    line = error_line(capsys, "evaluate", floats, "--ref", good, "--out", results, "--cache-dir", tmp_path / "cache")
    assert str(floats) in line and "expected dtype uint8, got float32" in line and "to_uint8" in line
    assert results.read_text() == '{"fid": 1.0}\n'


def test_evaluate_checks_the_npz_before_looking_up_inception(capsys, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AhpaError("Inception weights not found; put weights-inception-2015-12-05-6726825d.pth in the hub cache")

    monkeypatch.setattr(command, "load_inception", no_weights)
    floats = tmp_path / "samples.npz"
    np.savez(floats, np.zeros((4, 32, 32, 3), np.float32))
    line = error_line(capsys, "evaluate", floats, "--ref", floats, "--cache-dir", tmp_path / "cache")
    assert "expected dtype uint8, got float32" in line


def test_resume_with_other_architecture_leaves_the_run_untouched(capsys, run_dir):
    before = tree_digest(run_dir)
    assert any(k.endswith("ema.safetensors") for k in before) and any(k.endswith("optimizer.pt") for k in before)
    # train.steps=2: a resume that were not refused would train and save a step-2 checkpoint
    line = error_line(capsys, "train", "--config", TOY, "--out", run_dir, "model.name=SiT-S/2", "data.source=images",
                      f"data.path={run_dir.parent / 'images'}", "data.num_workers=0", "train.steps=2", *FAST[1:])
    assert "model.name='SiT-T/2'" in line and "'SiT-S/2'" in line
    assert "Resume with the same settings" in line and "new --out directory" in line
    assert tree_digest(run_dir) == before

