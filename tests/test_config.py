"""Config layering: defaults < YAML < command line, and clear errors for bad keys."""

from pathlib import Path

import pytest
import yaml

from ahpa.config import Config, load_config, save_config
from ahpa.errors import AhpaError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_command_line_wins_over_yaml(tmp_path):
    p = write(tmp_path, {"train": {"lr": 3e-4, "steps": 10}, "data": {"source": "toy"}})
    cfg = load_config(p, ["train.lr=2e-4", "align.depths=3,8", "prior.groups=[G4]"])
    assert cfg.train.lr == 2e-4  # CLI beat the YAML
    assert cfg.train.steps == 10  # YAML beat the default
    assert cfg.align.depths == [3, 8]
    assert cfg.prior.groups == ["G4"]
    assert cfg.train.global_batch == 256  # untouched default (docs/design.md section 5)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"lrr": 1}}, "unknown config key 'train.lrr'. Did you mean 'lr'"),
        ({"trian": {"lr": 1}}, "unknown config key 'trian'"),
        ({"train": {"steps": "many"}}, "'train.steps' expects int"),
        ({"align": {"router": "magic"}}, "choose one of: dynamic"),
        ({"data": {"source": "images"}}, "data.path is empty"),
        ({"train": 5}, "section 'train' must be a mapping"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, data, message):
    with pytest.raises(AhpaError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(write(tmp_path, data))


def test_bad_override_syntax():
    with pytest.raises(AhpaError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(AhpaError, match="expects true or false"):
        load_config(None, ["train.compile=maybe", "data.source=toy"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(AhpaError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load_and_round_trip(tmp_path, path):
    cfg = load_config(path, ["data.path=/data/cache"] if "toy" not in path.name else [])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_paper_presets_follow_the_recipe():
    for size, depth_name in (("b", "SiT-B/2"), ("l", "SiT-L/2"), ("xl", "SiT-XL/2")):
        ahpa = load_config(CONFIGS / f"sit-{size}2-ahpa.yaml", ["data.path=x"])
        vanilla = load_config(CONFIGS / f"sit-{size}2-vanilla.yaml", ["data.path=x"])
        for cfg in (ahpa, vanilla):
            assert cfg.model.name == depth_name
            assert (cfg.train.global_batch, cfg.train.lr, cfg.train.grad_clip, cfg.train.ema_decay) == (256, 1e-4, 2.0, 0.9999)
            assert cfg.train.steps == 400_000 and cfg.train.weight_decay == 0.0
        assert ahpa.align.method == "ahpa" and ahpa.prior.groups == ["G3", "G4"] and ahpa.align.head == "conv3"
        assert vanilla.align.method == "vanilla"
    assert Config().vae.scaling_factor == 0.0  # read from the VAE (0.18215 for SD-VAE)


def test_guidance_needs_label_dropout_and_presets_resolve_by_bare_name_only(tmp_path):
    with pytest.raises(AhpaError, match="needs the null class"):
        load_config(None, ["data.source=toy", "model.class_dropout=0", "sample.cfg_scale=1.5"])
    with pytest.raises(AhpaError, match="'train.keep_last' must be at least 1"):
        load_config(None, ["data.source=toy", "train.keep_last=0"])
    assert load_config("toy.yaml").model.name == "SiT-T/2"  # a bare name finds the preset
    with pytest.raises(AhpaError, match="does not exist"):  # a mistyped path does not silently load it
        load_config(tmp_path / "typo" / "toy.yaml")
