"""The paper's baselines in the same loop: REPA (DINOv2 prior), SRA2-style latent target, configs, bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from ahpa.cli import main
from ahpa.config import load_config
from ahpa.errors import AhpaError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FAST = ["train.global_batch=8", "train.log_every=1", "train.ckpt_every=0", "train.grid_steps=2", "train.max_minutes=0",
        "data.num_workers=0"]


@pytest.fixture
def small_toy(monkeypatch):
    """The toy set's first 64 digits (encoding all 1617 would dominate these tests)."""
    import ahpa.data.toy as toy

    real = toy.load_toy
    monkeypatch.setattr(toy, "load_toy", lambda split="train", resolution=32: tuple(x[:64] for x in real(split, resolution)))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from ahpa.data.toy import load_toy

    root = tmp_path_factory.mktemp("digits")
    images, labels = load_toy("train", resolution=32)
    for c in range(8):
        (root / f"class_{c}").mkdir()
        for k, i in enumerate(torch.nonzero(labels == c).flatten()[:2].tolist()):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / f"class_{c}" / f"{k}.png")
    return root


def cfg(name: str, out: Path, *extra: str):
    return load_config(CONFIGS / name, [f"train.out={out}", *FAST, *extra])


# ------------------------------------------------------------------------- configs
def test_config_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(yaml.safe_dump({"train": {"lr": 3e-4, "steps": 7}, "align": {"head": "linear"}}))
    (tmp_path / "sub" / "mid.yaml").write_text(yaml.safe_dump({"base": "../root.yaml", "train": {"lr": 2e-4}}))
    (tmp_path / "sub" / "leaf.yaml").write_text(yaml.safe_dump({"base": "mid.yaml", "align": {"weight": 0.5}}))
    c = load_config(tmp_path / "sub" / "leaf.yaml", ["train.steps=9", "data.source=toy"])
    assert (c.train.lr, c.train.steps, c.align.head, c.align.weight) == (2e-4, 9, "linear", 0.5)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(AhpaError, match=r"inheritance cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml", ["data.source=toy"])
    (tmp_path / "bad.yaml").write_text("train:\n  lrr: 1\n")
    (tmp_path / "child.yaml").write_text("base: bad.yaml\n")
    with pytest.raises(AhpaError, match=r"bad.yaml: unknown config key 'train.lrr'"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(AhpaError, match="its base 'missing.yaml' does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_every_config_loads_and_the_baselines_have_their_recipes():
    # run configs only: configs/accelerate/ holds accelerate's files, configs/studies/ study definitions
    files = sorted(f for f in CONFIGS.rglob("*.yaml") if f.parent.name not in ("accelerate", "studies"))
    assert len(files) >= 50
    outs = set()
    for f in files:
        c = load_config(f, ["data.path=/data"])
        outs.add(c.train.out)
    assert len(outs) == len(files)  # no two rows write into the same run directory
    for size, depth in (("b2", 4), ("l2", 8), ("xl2", 8)):  # REPA's recipe (REPA issue #5)
        r = load_config(CONFIGS / f"sit-{size}-repa.yaml", ["data.path=/d"])
        assert (r.prior.groups, r.align.router, r.align.head, r.prior.normalize, r.align.loss) == (["dinov2"], "uniform", "mlp3", "none", "cosine")
        assert (r.align.depths, r.align.weight, r.train.lr, r.train.grad_clip, r.teacher.model) == ([depth], 0.5, 1e-4, 1.0, "dinov2_vitb14")
        a = load_config(CONFIGS / f"sit-{size}-repa-ahpa-recipe.yaml", ["data.path=/d"])
        assert (a.align.depths, a.train.lr, a.train.grad_clip, a.prior.groups) == ([], 2e-4, 2.0, ["dinov2"])
        s = load_config(CONFIGS / f"sit-{size}-sra2.yaml", ["data.path=/d"])
        assert (s.prior.groups, s.align.method, s.align.depths) == (["latent"], "sra2", [])
    assert load_config(CONFIGS / "ablations" / "b2-block-3-4-8.yaml", ["data.path=/d"]).align.depths == [3, 4, 8]


def test_repa_objective_is_repas_projector_and_loss():
    """mlp3 = REPA's build_mlp; with no normalisation the target is the teacher tokens; loss = REPA's."""
    from ahpa.models.sit import build_sit
    from ahpa.build import build_objective

    c = load_config(CONFIGS / "sit-b2-repa.yaml", ["data.path=/d", "model.name=SiT-T/2"])
    sit = build_sit("SiT-T/2", input_size=8, num_classes=10)
    D, Z = sit.hidden_size, 24
    obj = build_objective(c, sit, {"dinov2": (1, Z)})
    head = obj.heads["4"]
    shapes = [tuple(m.weight.shape[:2]) for m in head if isinstance(m, torch.nn.Conv2d)]
    assert shapes == [(2048, D), (2048, 2048), (Z, 2048)] and all(isinstance(head[i], torch.nn.SiLU) for i in (1, 3))
    for i in (0, 2, 4):  # REPA's init: xavier-uniform weights (bound sqrt(6 / (fan_in + fan_out))), zero biases
        w = head[i].weight
        bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
        assert 0.99 * bound < w.abs().max() <= bound and not head[i].bias.any()
    g = torch.Generator().manual_seed(0)
    B, T = 3, sit.grid**2
    h = torch.randn(B, T, D, generator=g)
    teacher = 5 * torch.randn(B, T, Z, generator=g) + 2  # unnormalised, off-centre tokens
    feats = {"dinov2": teacher.transpose(1, 2).reshape(B, 1, Z, sit.grid, sit.grid)}
    loss, _ = obj({4: h}, feats, torch.rand(B, generator=g))
    # REPA loss.py: mean over tokens of -cos(projector(h), z), projector = Linear-SiLU-Linear-SiLU-Linear
    ws = [(m.weight[:, :, 0, 0], m.bias) for m in head if isinstance(m, torch.nn.Conv2d)]
    z = F.linear(F.silu(F.linear(F.silu(F.linear(h, *ws[0])), *ws[1])), *ws[2])
    want = -(F.normalize(z, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1).mean(-1)
    torch.testing.assert_close(loss, 0.5 * want, rtol=1e-5, atol=1e-6)


def test_irepa_spatial_normalisation_and_latent_target():
    from ahpa.align.normalize import normalize_features
    from ahpa.priors.latent import latent_target

    g = torch.Generator().manual_seed(0)
    f = 3 * torch.randn(2, 1, 5, 4, 4, generator=g) + 1
    tokens = f[:, 0].flatten(2).transpose(1, 2)  # [B, T, C], iREPA's layout
    want = (tokens - 0.6 * tokens.mean(1, keepdim=True)) / (tokens.std(1, keepdim=True) + 1e-6)
    got = normalize_features(f, "irepa", alpha=0.6)[:, 0].flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want)
    mean = torch.randn(2, 4, 8, 8, generator=g)
    patch = latent_target(mean, 0.18215, 0.0, grid=4, mode="patchify")
    assert patch.shape == (2, 1, 16, 4, 4)
    # token (1, 2) holds the 2x2 latent patch rows 2-3, columns 4-5, channel-major (c, i, j), as SiT patchifies
    torch.testing.assert_close(patch[0, 0, :, 1, 2], (0.18215 * mean[0, :, 2:4, 4:6]).reshape(-1))
    pool = latent_target(mean, 0.18215, 0.0, grid=4, mode="pool")
    torch.testing.assert_close(pool[1, 0, :, 3, 0], 0.18215 * mean[1, :, 6:8, 0:2].mean(dim=(1, 2)))
    with pytest.raises(AhpaError, match="SRA2 target of 64 channels but the run was set up for 16"):
        latent_target(torch.randn(1, 16, 8, 8), 1.0, 0.0, grid=4, expected=(1, 16))


# ------------------------------------------------------------------------- training
@pytest.mark.parametrize("name, groups", [("toy-vanilla.yaml", None), ("toy-sra2.yaml", ["latent"]), ("toy-repa.yaml", ["dinov2"]),
                                          ("toy.yaml", ["G3", "G4"])])
@pytest.mark.slow
def test_one_training_step_of_each_table3_method(small_toy, tmp_path, capsys, name, groups):
    from ahpa.train import Trainer

    trainer = Trainer(cfg(name, tmp_path / "run", "train.steps=1"), show_progress=False)
    assert (trainer.objective is None) == (groups is None)
    if groups is not None:
        assert trainer.objective.groups == groups
    if name == "toy-sra2.yaml":  # tiny VAE: 4 x 8 x 8 latents, 2x2 patches -> 16 channels
        assert trainer.objective.target_dim == 16
    result = trainer.run()
    assert result["steps"] == 1
    record = result["history"][-1]
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert (record["loss_align"] != 0) == (groups is not None)
    said = capsys.readouterr().out
    assert ("RANDOMLY INITIALISED" in said) == (name == "toy-repa.yaml")


@pytest.mark.slow
def test_a_repa_checkpoint_continues_training_with_its_projector(small_toy, tmp_path):
    """REPA's layout (their SiT keys + projectors.0.*, AdamW state, args, steps) resumes REPA training."""
    from ahpa.models.sit import build_sit
    from ahpa.train import Trainer

    from helpers import randomised

    torch.manual_seed(0)
    sit = randomised(build_sit("SiT-T/2", input_size=8, num_classes=10), std=0.05)
    Z, D = 384, sit.hidden_size  # ViT-S/14 teacher of configs/toy-repa.yaml
    projector = torch.nn.Sequential(torch.nn.Linear(D, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, Z))
    sd = sit.state_dict()
    keys = list(sd)
    cut = max(i for i, k in enumerate(keys) if k.startswith("blocks.")) + 1  # REPA registers projectors after blocks
    model = {k: sd[k].clone() for k in keys[:cut]} | {f"projectors.0.{k}": v.detach().clone() for k, v in projector.state_dict().items()} \
        | {k: sd[k].clone() for k in keys[cut:]}
    params = [torch.nn.Parameter(v.clone(), requires_grad=k != "pos_embed") for k, v in model.items()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    ema = {k: v + 0.01 for k, v in model.items()}
    path = tmp_path / "0000005.pt"
    torch.save({"model": model, "ema": ema, "opt": opt.state_dict(), "args": argparse.Namespace(encoder_depth=2), "steps": 5}, path)

    trainer = Trainer(cfg("toy-repa.yaml", tmp_path / "run", "train.steps=6", "align.depths=[2]", f"train.init_from={path}"), show_progress=False)
    assert trainer.step == 5
    head = trainer.objective.heads["2"]
    torch.testing.assert_close(head[4].weight[:, :, 0, 0], model["projectors.0.4.weight"])
    torch.testing.assert_close(trainer.sit.state_dict()["blocks.1.attn.qkv.weight"], model["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(trainer.ema.state_dict()["final_layer.linear.bias"], ema["final_layer.linear.bias"])
    state = trainer.optimizer.state_dict()["state"]
    names = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    idx = {n: i for i, n in enumerate(names)}
    repa_idx = {k: i for i, k in enumerate(model)}
    torch.testing.assert_close(state[idx["objective.heads.2.2.weight"]]["exp_avg"][:, :, 0, 0], opt.state[params[repa_idx["projectors.0.2.weight"]]]["exp_avg"])
    torch.testing.assert_close(state[idx["sit.blocks.0.mlp.fc1.bias"]]["exp_avg_sq"], opt.state[params[repa_idx["blocks.0.mlp.fc1.bias"]]]["exp_avg_sq"])

    # loss of the first continued step == a transcription of REPA's SILoss + 0.5 * proj_loss
    batch = trainer.source.next_batch()
    x0, t, eps, drop = trainer._draws(trainer.step, batch)
    with torch.no_grad():
        loss, _, _ = trainer.module(x0, batch["y"], t, eps, drop, batch["features"])
        tt = t.view(-1, 1, 1, 1)
        out, hidden = trainer.sit((1 - tt) * x0 + tt * eps, t, batch["y"], hidden_depths=[2], force_drop_ids=drop)
        denoising = ((out - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
        zt = batch["features"]["dinov2"][:, 0].flatten(2).transpose(1, 2)  # teacher tokens [B, T, Z]
        w = {k[len("projectors.0."):]: v for k, v in model.items() if k.startswith("projectors.0.")}
        z = F.linear(F.silu(F.linear(F.silu(F.linear(hidden[2], w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])), w["4.weight"], w["4.bias"])
        proj = -(F.normalize(z, dim=-1) * F.normalize(zt, dim=-1)).sum(-1).mean(-1)
        want = denoising.mean() + 0.5 * proj.mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    trainer.source.start(trainer.step)
    assert trainer.run()["steps"] == 6


def test_teacher_features_cached_with_flips_and_refused_when_missing(image_folder, tmp_path, capsys):
    from ahpa.data.cache import CacheDataset
    from ahpa.data.extract import extract_cache
    from ahpa.priors.dinov2 import DINOv2Teacher
    from ahpa.priors.hierarchy import HierarchicalVAEPrior
    from ahpa.priors.vae import load_vae
    from ahpa.train import Trainer

    vae = load_vae("tiny")
    teacher = DINOv2Teacher("dinov2_vits14", grid=4, weights="random")
    with_t, without = tmp_path / "with", tmp_path / "without"
    extract_cache(image_folder, with_t, HierarchicalVAEPrior(vae, groups=(), grid=4), 32, flip_both=True, shard_size=16, batch_size=16,
                  progress=False, teacher=teacher)
    extract_cache(image_folder, without, HierarchicalVAEPrior(vae, groups=("G4",), grid=4), 32, shard_size=16, batch_size=16, progress=False)
    ds = CacheDataset(with_t, groups=["dinov2"])
    item, mirrored = ds[0], ds[ds.count]
    from ahpa.data.images import ImageFolderDataset

    raw = ImageFolderDataset(image_folder, 32)
    from safetensors import safe_open

    with safe_open(str(with_t / ds.shards[0]["file"]), framework="pt") as f:
        first = int(f.get_slice("index")[0:1][0])
    x = raw[first]["image"][None].float() / 127.5 - 1
    torch.testing.assert_close(item["features"]["dinov2"].float(), teacher.grid_features(x)[0], rtol=1e-2, atol=1e-2)
    # the mirrored copy holds the mirrored image's own teacher features (not mirrored features: a ViT is not flip-equivariant)
    torch.testing.assert_close(mirrored["features"]["dinov2"].float(), teacher.grid_features(x.flip(-1))[0], rtol=1e-2, atol=1e-2)
    assert (teacher.grid_features(x.flip(-1)) - teacher.grid_features(x).flip(-1)).abs().max() > 1e-2

    common = [*FAST, "data.source=cache", "teacher.weights=random", "model.num_classes=10"]
    trainer = Trainer(load_config(CONFIGS / "toy-repa.yaml", [f"data.path={with_t}", "train.out=" + str(tmp_path / "r"), "train.steps=1", *common]), show_progress=False)
    assert trainer.objective.group_shapes == {"dinov2": (1, 384)}
    assert trainer.run()["steps"] == 1
    capsys.readouterr()
    out = tmp_path / "refused"
    rc = main(["train", "--config", str(CONFIGS / "toy-repa.yaml"), "--out", str(out), f"data.path={without}", *common])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "holds no DINOv2 teacher features (missing prior 'dinov2'" in err and "--teacher dinov2_vits14" in err
    assert not out.exists()
    # a cache whose teacher grid is not this model's token grid (the 512-px / patch-size mismatch)
    rc = main(["train", "--config", str(CONFIGS / "toy-repa.yaml"), "--out", str(out), f"data.path={with_t}", *common, "model.name=SiT-T/4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "teacher features on a 4x4 grid (56 px), but SiT-T/4 has a 2x2 token grid" in err, err
    assert not out.exists()


def test_the_teacher_sees_the_flipped_image_on_the_fly(image_folder, tmp_path):
    from ahpa.build import build_source
    from ahpa.data.sampler import step_generator

    c = load_config(CONFIGS / "toy-repa.yaml", [f"data.path={image_folder}", "data.source=images", "data.hflip=true", "train.seed=3",
                                                 *FAST, "model.num_classes=10"])
    src = build_source(c, device="cpu", rank=0, world=1, per_rank=8)
    src.start(0)
    sampler = src._stream(len(src.dataset), 0)
    idx = next(iter(sampler))
    batch = src.next_batch()
    images = torch.stack([src.dataset[i]["image"] for i in idx]).float() / 127.5 - 1
    flip = torch.rand(8, generator=step_generator(c.train.seed, 0, "cpu", stream=1)) < 0.5
    assert 0 < int(flip.sum()) < 8
    seen = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    torch.testing.assert_close(batch["features"]["dinov2"], src.teacher.grid_features(seen))


@pytest.mark.parametrize("extra, message", [
    (["teacher.weights=/nonexistent/dinov2_vits14_pretrain.pth"], "DINOv2 weight file '/nonexistent/dinov2_vits14_pretrain.pth' does not exist"),
    (["teacher.input_size=112"], "teacher.input_size=112 gives a 8x8 DINOv2 token grid, but the SiT token grid is 4x4"),
    (["prior.groups=[G4]"], "align.method=repa aligns to the 'dinov2' group"),
    (["prior.groups=[dino]"], "prior.groups has unknown group 'dino'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(small_toy, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(CONFIGS / "toy-repa.yaml"), "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
