"""The Inception teacher as a config choice and the usefulness router signal (issue 21).

- The positive control (configs/toy-inception.yaml) trains on the toy through the one build layer, its
  teacher features memoised per machine and equal to the teacher's own output.
- ``ahpa extract --teacher inception`` caches them; a cache run reads them and is refused, in one line,
  by a config that asks for another layer or finds no Inception features.
- ``align.router_signal=usefulness`` moves the router towards the target whose alignment gradient
  agrees with the diffusion gradient, hand-computed on a case where the more predictable target is the
  less useful one, while the paper's signal moves it the other way.

The Inception network has the real architecture with random weights here (the real weights are tested in
test_inception_prior.py); what is checked is the wiring, not the weights.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ahpa.build as build
from ahpa.align.objective import AlignmentObjective
from ahpa.cli import main
from ahpa.config import CHOICES, load_config
from ahpa.evaluation.inception import InceptionFeatures, random_state_dict
from ahpa.priors.inception import LAYERS, InceptionTeacher
from ahpa.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = ["train.log_every=1", "train.ckpt_every=0", "train.sample_every=0", "train.global_batch=8"]


@pytest.fixture(scope="module")
def network():
    return InceptionFeatures(random_state_dict(seed=0), source="random init (test)", has_logits=False)


@pytest.fixture()
def random_inception(network, monkeypatch, tmp_path):
    """build_teacher's Inception with random weights; the memo directory in tmp_path."""
    monkeypatch.setattr(build, "InceptionTeacher", lambda layer, grid: InceptionTeacher(layer, grid=grid, network=network))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return network


def test_config_layer_choices_are_the_priors_layers():
    assert CHOICES["teacher.layer"] == LAYERS


def test_positive_control_trains_one_step_on_the_toy_with_memoised_teacher_features(random_inception, monkeypatch, tmp_path):
    images, labels = build.load_toy("train", resolution=32)
    monkeypatch.setattr(build, "load_toy", lambda split, resolution: (images[:24], labels[:24]))
    cfg = load_config(CONFIGS / "toy-inception.yaml", [*FAST, "train.steps=1", f"train.out={tmp_path / 'run'}"])
    trainer = Trainer(cfg, show_progress=False)
    objective = trainer.objective
    assert objective.group_shapes == {"inception": (1, 768)} and objective.weight == 0.5 and objective.normalize == "none"
    assert len(objective.heads["2"]) == 5  # REPA's 3-layer MLP projector, block 2
    metrics = trainer.run()
    assert metrics["steps"] == 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "0000001" / "state.json").read_text())
    assert state["history"][-1]["loss_align"] < 0  # lambda * (-cosine), a real alignment term
    memo = list((tmp_path / "xdg" / "ahpa" / "teacher-features").glob("inception-*.safetensors"))
    assert len(memo) == 1
    teacher = InceptionTeacher("Mixed_6e", grid=4, network=random_inception)
    expected = teacher.grid_features(images[:24].float() / 127.5 - 1.0)
    source = build.build_source(cfg, device="cpu")  # the second time: read from the memo, the teacher not run
    torch.testing.assert_close(source.data.features["inception"], expected, rtol=0, atol=1e-6)
    monkeypatch.setattr(InceptionTeacher, "grid_features", lambda *a: pytest.fail("the memo must be read"))
    again = build.build_source(cfg, device="cpu")
    assert torch.equal(again.data.features["inception"], source.data.features["inception"])


def test_memo_key_depends_on_teacher_and_images(random_inception, tmp_path):
    from ahpa.data.batches import memoised_teacher_features

    images = build.load_toy("train", resolution=32)[0][:4]
    a = InceptionTeacher("Mixed_6e", grid=4, network=random_inception)
    b = InceptionTeacher("Mixed_5d", grid=4, network=random_inception)
    for t in (a, b):
        t.group = "inception"
    fa, fb = memoised_teacher_features(a, images, "cpu"), memoised_teacher_features(b, images, "cpu")
    fc = memoised_teacher_features(a, images.flip(-1).contiguous(), "cpu")
    assert fa.shape == (4, 1, 768, 4, 4) and fb.shape == (4, 1, 288, 4, 4)
    assert (fa - fc).abs().max() > 1e-3  # other images, other features (not a stale memo)
    assert len(list((tmp_path / "xdg" / "ahpa" / "teacher-features").iterdir())) == 3


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    images, labels = build.load_toy("train", resolution=32)
    for c in range(4):
        (root / f"class_{c}").mkdir()
        for k, i in enumerate(torch.nonzero(labels == c).flatten()[:2].tolist()):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / f"class_{c}" / f"{k}.png")
    return root


def test_extract_teacher_inception_caches_trains_and_refuses_another_layer(random_inception, small_folder, tmp_path, capsys):
    from ahpa.data.cache import CacheDataset, read_manifest
    from ahpa.data.images import ImageFolderDataset

    cache = tmp_path / "cache"
    rc = main(["extract", str(small_folder), "--out", str(cache), "--config", str(CONFIGS / "toy-inception.yaml"),
               "--teacher", "inception", "--shard-size", "4", "--batch", "4", "--workers", "0"])
    assert rc == 0, capsys.readouterr().err
    manifest = read_manifest(cache)
    assert manifest["teachers"]["inception"]["layer"] == "Mixed_6e" and manifest["teachers"]["inception"]["grid"] == 4
    assert manifest["features"]["inception"]["shape"] == [1, 768, 4, 4]
    ds = CacheDataset(cache, groups=["inception"])
    item = ds[0]
    teacher = InceptionTeacher("Mixed_6e", grid=4, network=random_inception)
    with safe_open(str(cache / ds.shards[0]["file"]), framework="pt") as f:  # the shards hold a shuffled order
        first = int(f.get_slice("index")[0:1][0])
    x = ImageFolderDataset(small_folder, 32)[first]["image"][None].float() / 127.5 - 1
    torch.testing.assert_close(item["features"]["inception"].float(), teacher.grid_features(x)[0], rtol=1e-2, atol=1e-2)

    common = [*FAST, "data.source=cache", f"data.path={cache}", "model.num_classes=4", "data.num_workers=0"]
    trainer = Trainer(load_config(CONFIGS / "toy-inception.yaml", [*common, "train.steps=1", f"train.out={tmp_path / 'r'}"]),
                      show_progress=False)
    assert trainer.objective.group_shapes == {"inception": (1, 768)}
    assert trainer.run()["steps"] == 1
    capsys.readouterr()
    out = tmp_path / "refused"
    rc = main(["train", "--config", str(CONFIGS / "toy-inception.yaml"), "--out", str(out), *common, "teacher.layer=Mixed_6d"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "layer='Mixed_6e'" in err and "teacher.layer='Mixed_6d'" in err, err
    plain = tmp_path / "plain"
    assert main(["extract", str(small_folder), "--out", str(plain), "--config", str(CONFIGS / "toy-pc.yaml"),
                 "--shard-size", "4", "--batch", "4", "--workers", "0"]) == 0
    capsys.readouterr()
    rc = main(["train", "--config", str(CONFIGS / "toy-inception.yaml"), "--out", str(out), *common, f"data.path={plain}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds no Inception teacher features" in err and "--teacher inception" in err, err
    assert not out.exists()


def test_config_refuses_two_teachers_and_a_usefulness_router_with_nothing_to_train():
    from ahpa.errors import AhpaError

    with pytest.raises(AhpaError, match="two teachers"):
        load_config(CONFIGS / "toy-inception.yaml", ["prior.groups=[inception,dinov2]"])
    with pytest.raises(AhpaError, match="align.router=uniform has nothing to train"):
        load_config(CONFIGS / "toy-pc.yaml", ["align.router_signal=usefulness", "align.router=uniform"])
    cfg = load_config(CONFIGS / "toy-inception.yaml")  # repa accepts either teacher group
    assert cfg.align.method == "repa" and cfg.prior.groups == ["inception"]


# ---------------------------------------------------------------------- the usefulness signal, by hand
def cosine_loss_grad(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d/dh of -cos(h, target), in closed form: -(target / (|h||target|) - (h.target) h / (|h|^3 |target|))."""
    nh, nt = h.norm(), target.norm()
    return -(target / (nh * nt) - (h @ target) * h / (nh**3 * nt))


def two_target_case(signal: str):
    """One sample, one token, width 3, an identity head.  h = e1.  Target A = (1, 0.1, 0) is nearly h (the
    more predictable: alignment loss -0.995); target B = e3 is orthogonal to h (loss 0).  The diffusion
    loss w.h with w = (0, 1, -1) has gradient w: a step down A's alignment loss (gradient along -e2) raises
    it, a step down B's (gradient along -e3) lowers it."""
    torch.manual_seed(0)
    objective = AlignmentObjective(hidden_size=3, grid=1, group_shapes={"G": (2, 3)}, depths=[1], router="lut", lut_bins=1,
                                   head="linear", loss="cosine", weight=1.0, normalize="none", router_signal=signal)
    head = objective.heads["1"]
    with torch.no_grad():
        head.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        head.bias.zero_()
    A, B = torch.tensor([1.0, 0.1, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    features = {"G": torch.stack([A, B]).view(1, 2, 3, 1, 1)}
    w = torch.tensor([0.0, 1.0, -1.0])
    return objective, A, B, features, w


@pytest.mark.parametrize("signal", ["usefulness", "alignment"])
def test_usefulness_moves_the_router_to_the_useful_target_where_alignment_picks_the_predictable_one(signal):
    objective, A, B, features, w = two_target_case(signal)
    router = objective.router
    opt = torch.optim.SGD(router.parameters(), lr=0.5)
    t = torch.tensor([0.3])
    gaps = []
    for _ in range(2):  # two steps: the direction holds
        h = torch.tensor([[[1.0, 0.0, 0.0]]], requires_grad=True)
        loss_diff = (h * w).sum(dim=(1, 2))
        loss, stats = objective({1: h}, features, t, loss_diff=loss_diff)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        alpha = router(t)[0]["G"][0]
        gaps.append(float((alpha[1] - alpha[0]).detach()))  # weight of B minus weight of A
    if signal == "usefulness":
        # u by hand: cos(w, d(-cos(h, A))/dh) and cos(w, d(-cos(h, B))/dh), at h = e1
        h0 = torch.tensor([1.0, 0.0, 0.0])
        u_a = float(torch.nn.functional.cosine_similarity(cosine_loss_grad(h0, A), w, dim=0))
        u_b = float(torch.nn.functional.cosine_similarity(cosine_loss_grad(h0, B), w, dim=0))
        assert u_a == pytest.approx(-1 / math.sqrt(2), abs=1e-6) and u_b == pytest.approx(1 / math.sqrt(2), abs=1e-6)
        h = torch.tensor([[[1.0, 0.0, 0.0]]], requires_grad=True)
        pred = objective.heads["1"](h.transpose(1, 2).reshape(1, 3, 1, 1))
        u = objective.usefulness(h, pred, {"G": features["G"]}, (h * w).sum(dim=(1, 2)))["G"][0]
        torch.testing.assert_close(u, torch.tensor([u_a, u_b]), rtol=0, atol=1e-6)
        # the router's gradient by hand: value = sum_l alpha_l u_l; d value / d logit_l = alpha_l (u_l - sum alpha u)
        # -> at alpha = (1/2, 1/2) the logits move by lr * (1/2)(u_B - u_A)/2 each, apart: gap after one step
        expected_logit_gap = 0.5 * (0.5 * (u_b - (u_a + u_b) / 2) - 0.5 * (u_a - (u_a + u_b) / 2))
        assert gaps[0] == pytest.approx(math.tanh(expected_logit_gap / 2), abs=1e-5)  # softmax gap of 2 logits
        assert 0 < gaps[0] < gaps[1]
    else:  # the paper's signal: the router goes to A, the target the head already predicts
        assert 0 > gaps[0] > gaps[1]


def test_inception_is_a_gsnr_target_of_any_checkpoint(random_inception, monkeypatch, tmp_path, capsys):
    images, labels = build.load_toy("train", resolution=32)
    monkeypatch.setattr(build, "load_toy", lambda split, resolution: (images[:24], labels[:24]))
    run = tmp_path / "vanilla"
    cfg = load_config(CONFIGS / "toy-pc.yaml", [*FAST, "train.steps=1", f"train.out={run}", "align.method=vanilla", "prior.kind=none"])
    assert Trainer(cfg, show_progress=False).run()["steps"] == 1
    out = tmp_path / "gsnr"
    rc = main(["diagnose", "gsnr", "--ckpt", str(run), "--out", str(out), "--target", "config:" + str(CONFIGS / "toy-inception.yaml"),
               "--n", "4", "--t", "0.5", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "gsnr.json").read_text())
    (target,) = record["targets"]
    assert target["keys"] == ["inception"]
    (row,) = record["records"]
    assert row["t"] == 0.5 and row["n"] == 4
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("gsnr", "mean_grad_sq", "trace_cov"))
    assert row["loss_align"] != 0.0 and -1 <= row["cos_diff_align"] <= 1
