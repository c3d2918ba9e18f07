"""Issue 19 item 4: a full disk in any library's error type is one line, and the last silent inputs are refused
(a resolution the VAE and patch cannot represent, an empty --out) or named (a CPU launch of one process for two);
overrides before the flags work."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_reliability import error_line

from ahpa.build import latent_geometry, vae_architecture
from ahpa.cli import main as cli_main
from ahpa.config import load_config
from ahpa.errors import AhpaError, disk_full
from ahpa.launch import launch_mismatch

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


def test_disk_full_anywhere_else_is_one_line(capsys, monkeypatch):
    def full(args):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed") from OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr("ahpa.cli.build_parser", _parser_with(full))  # the handler in cli.main, whatever the command
    assert cli_main(["x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Disk quota exceeded" in err and len(err.strip().splitlines()) == 1


def _parser_with(func):
    def build():
        p = argparse.ArgumentParser(prog="ahpa")
        sub = p.add_subparsers(dest="command")
        sub.add_parser("x").set_defaults(func=func)
        return p
    return build


def test_disk_full_recognition():
    assert disk_full(OSError(errno.ENOSPC, "x")) and disk_full(SafetensorError("... No space left on device ..."))
    assert disk_full(ValueError("a bug")) is None and disk_full(OSError(errno.ENOENT, "missing")) is None


# ---------------------------------------------------------------------- silent inputs
def test_resolution_the_vae_and_patch_cannot_represent_is_refused(capsys, tmp_path):
    cfg = load_config(TOY, ["data.resolution=33"])
    with torch.device("meta"):
        vae = vae_architecture(cfg)
    with pytest.raises(AhpaError, match="data.resolution=33 is not a multiple of 8.*use 32 or 40"):
        latent_geometry(cfg, vae)
    line = error_line(capsys, "train", "--config", TOY, "--out", tmp_path / "r", "data.resolution=33", "train.steps=1")
    assert "use 32 or 40" in line
    assert latent_geometry(load_config(TOY, ["data.resolution=32"]), vae)[1] == 4


@pytest.mark.parametrize("command", [["train", "--config", str(TOY)], ["sample", "--ckpt", "x"], ["extract", "images"]])
def test_empty_out_is_refused(capsys, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, *command, "--out", "")
    assert "--out is empty" in line and not list(tmp_path.iterdir())


def test_overrides_before_the_flags_work_and_other_strays_get_a_hint(capsys, monkeypatch):
    from ahpa import cli

    parser = cli.build_parser()
    args = cli.parse(parser, ["train", "--config", str(TOY), "train.steps=3", "--out", "o", "train.lr=0.001"])
    assert args.overrides == ["train.steps=3", "train.lr=0.001"] and args.out == "o"
    with pytest.raises(SystemExit):
        cli.parse(parser, ["sample", "--ckpt", "c", "--out", "o", "steps=3"])
    assert "overrides go after the flags" in capsys.readouterr().err


def test_accelerate_cpu_launch_of_one_process_for_two_is_named():
    env = {"ACCELERATE_USE_CPU": "True"}
    line = launch_mismatch(env, ["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "ahpa.cli", "train"])
    assert line.startswith("warning: 2 processes were requested") and "torchrun --nproc_per_node 2" in line
    assert launch_mismatch(env, ["accelerate", "launch", "--cpu", "--num_processes=1"]) is None
    assert launch_mismatch({**env, "WORLD_SIZE": "2"}, ["accelerate", "launch", "--num_processes", "2"]) is None
    assert launch_mismatch({}, ["accelerate", "launch", "--num_processes", "2"]) is None  # not launched by accelerate
    assert launch_mismatch({**env, "ACCELERATE_NUM_PROCESSES": "4"}, [])
