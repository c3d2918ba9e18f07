"""Checkpoints written by 0.3.0 still load and resume bit-exactly, and every shipped config still builds
the same parameters (names and shapes) as 0.3.0 did.

Fixtures, made once with the 0.3.0 code (tag v0.3.0, commit e2b97b9):
- ``fixtures/params-0.3.0.json``: for every YAML under configs/ (studies and accelerate excepted), the state-dict
  names and shapes of the backbone and of the alignment objective, and the group shapes the objective received
  (0.3.0's meta-device profile builder for the ImageNet/COCO configs, its Trainer for the toy ones).
- ``fixtures/run-0.3.0``: a run of configs/toy.yaml with a micro SiT (SiT's code at width 32, depth 2, registered as
  ``SiT-Micro/2``), batch 8, trained 2 steps by 0.3.0 and checkpointed.
- ``fixtures/run-0.3.0-step4.json``: the sha256 of the weights 0.3.0 wrote after resuming that run to step 4,
  and its logged losses.

Since issue 19 every weights file carries its sampling meta (``build.weights_meta``: ``model.safetensors`` too, and
the VAE's sha256 and latent_norm besides 0.3.0's keys), so the files' bytes differ from 0.3.0's by their metadata.
The tensors are compared bit for bit: each file is rewritten with the metadata 0.3.0 wrote (none for
``model.safetensors``, the step-2 ``ahpa_meta`` for ``ema.safetensors``) and hashed; the metadata is compared
separately (0.3.0's keys keep their values, the model and the EMA carry the same meta).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ahpa.build import build_for_shapes
from ahpa.config import PRESETS, load_config
from ahpa.models.sit import SIT_CONFIGS
from ahpa.train import Trainer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARAMS = json.loads((FIXTURES / "params-0.3.0.json").read_text())
REPO = PRESETS.parent


@pytest.mark.parametrize("config", sorted(PARAMS))
def test_shipped_config_builds_the_parameters_of_030(config):
    cfg = load_config(REPO / config, ["data.path=/nonexistent"])
    with torch.device("meta"):
        built = build_for_shapes(cfg)
    want = PARAMS[config]
    assert {k: list(v.shape) for k, v in built.model.state_dict().items()} == want["model"]
    got_obj = {k: list(v.shape) for k, v in built.objective.state_dict().items()} if built.objective is not None else None
    assert got_obj == want["objective"]
    assert {g: list(s) for g, s in built.group_shapes.items()} == want["group_shapes"]


# Configs added after 0.3.0: no record to compare with, but they must build.
NEW_SINCE_030 = {"configs/toy-pc.yaml", "configs/toy-inception.yaml"}


def test_every_shipped_config_is_in_the_fixture_or_new():
    shipped = {str(p.relative_to(REPO)) for p in PRESETS.rglob("*.yaml") if "studies" not in p.parts and "accelerate" not in p.parts}
    assert shipped - set(PARAMS) == NEW_SINCE_030, "a config without a 0.3.0 record: add it to NEW_SINCE_030"
    for config in sorted(NEW_SINCE_030):
        with torch.device("meta"):
            built = build_for_shapes(load_config(REPO / config))
        assert sum(p.numel() for p in built.model.parameters()) > 0


def _metadata(path: Path) -> dict | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture
def micro_sit():
    SIT_CONFIGS["SiT-Micro/2"] = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}
    yield
    del SIT_CONFIGS["SiT-Micro/2"]


def test_a_030_checkpoint_resumes_bit_exactly(tmp_path, micro_sit):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-0.3.0", run)
    cfg = load_config(run / "config.yaml", ["train.steps=4", f"train.out={run}"])
    metrics = Trainer(cfg, show_progress=False).run()
    expected = json.loads((FIXTURES / "run-0.3.0-step4.json").read_text())
    ck = run / "checkpoints" / "0000004"
    old = FIXTURES / "run-0.3.0" / "checkpoints" / "0000002"
    for name in ("model.safetensors", "ema.safetensors", "objective.safetensors"):
        # the tensors bit for bit: rewritten with the metadata 0.3.0 wrote (module docstring)
        save_file(load_file(ck / name), tmp_path / name, metadata=_metadata(old / name))
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == expected[name], name
    then, now = json.loads(_metadata(old / "ema.safetensors")["ahpa_meta"]), json.loads(_metadata(ck / "ema.safetensors")["ahpa_meta"])
    assert {k: now[k] for k in then} == then  # 0.3.0's meta keys, same values
    assert _metadata(ck / "model.safetensors") == _metadata(ck / "ema.safetensors")  # the online weights sample on their own
    assert now["latent_norm"] == "scale" and len(now["vae_sha256"]) == 64
    got = [[r["step"], r["loss"], r["loss_diffusion"], r["loss_align"]] for r in metrics["history"]]
    assert got == expected["losses"]
