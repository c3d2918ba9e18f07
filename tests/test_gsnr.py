"""G-SNR diagnostic: closed form, scale invariance, fast paths vs the per-sample loop, parameter sets, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ahpa.align.objective import AlignmentObjective
from ahpa.probe.gsnr import AlignmentProbe, select_parameters
from ahpa.probe.per_sample import grad_stats
from ahpa.errors import AhpaError
from ahpa.models.sit import SiT
from ahpa.transport import Transport
from helpers import randomised

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {"G3": (2, 8), "G4": (3, 6)}


class LinearRegression(nn.Module):
    """loss_i = 0.5 (w . x_i - y_i)^2 with y_i = w* . x_i + e_i."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(w.numel(), 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w.view(1, -1))

    def forward(self, batch):
        return 0.5 * (self.lin(batch["x"]).squeeze(1) - batch["y"]) ** 2


def _small_probe(weight: float = 1.0, router: str = "dynamic", depths=(2,)) -> AlignmentProbe:
    torch.manual_seed(0)
    sit = randomised(SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5))
    obj = AlignmentObjective(32, 2, GROUPS, depths=list(depths), router=router, time_dim=8, router_hidden=16, weight=weight)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in obj.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return AlignmentProbe(sit.eval(), obj, Transport())


def _batch(n=6, t=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(n, 4, 4, 4, generator=g), "y": torch.randint(0, 5, (n,), generator=g),
            "t": torch.full((n,), t), "eps": torch.randn(n, 4, 4, 4, generator=g),
            "drop": torch.rand(n, generator=g) < 0.3,
            "features": {k: torch.randn(n, L, C, 2, 2, generator=g) * 3 + 1 for k, (L, C) in GROUPS.items()}}


def test_closed_form_linear_regression():
    """x ~ N(0, I_p), e ~ N(0, s^2), d = w - w*: E g = d and, by Isserlis, tr Cov g = (p + 1)|d|^2 + p s^2."""
    p, n, s = 4, 200_000, 0.7
    g = torch.Generator().manual_seed(0)
    w_star, d = torch.randn(p, generator=g), torch.tensor([1.0, -0.5, 0.25, 0.0])
    x = torch.randn(n, p, generator=g)
    y = x @ w_star + s * torch.randn(n, generator=g)
    model = LinearRegression(w_star + d)
    stats = grad_stats(model, dict(model.named_parameters()), {"x": x, "y": y}, method="ghost")
    d2 = float(d @ d)
    trace = (p + 1) * d2 + p * s * s
    # E||g_bar||^2 = |d|^2 + tr Cov / n; standard errors here are ~1%, the tolerance 4%
    assert stats.mean_sq == pytest.approx(d2 + trace / n, rel=0.04)
    assert stats.trace_cov == pytest.approx(trace, rel=0.04)
    assert stats.gsnr == pytest.approx(d2 / trace, rel=0.06)
    assert stats.n * stats.gsnr == pytest.approx(n * d2 / trace, rel=0.06)


def test_trace_matches_explicit_covariance_of_per_sample_gradients():
    """tr(S) from norms and the mean equals sum_i ||g_i - g_bar||^2 / (n - 1) over explicit per-sample gradients."""
    probe = _small_probe()
    batch = _batch(n=7)
    params = select_parameters(probe, "upstream")
    rows = []
    for i in range(7):
        single = {k: ({g: f[i:i + 1] for g, f in v.items()} if isinstance(v, dict) else v[i:i + 1]) for k, v in batch.items()}
        grads = torch.autograd.grad(probe(single).sum(), list(params.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for p, gr in zip(params.values(), grads)]))
    G = torch.stack(rows).double()
    stats = grad_stats(probe, params, batch, method="ghost")
    assert stats.trace_cov == pytest.approx(float((G - G.mean(0)).pow(2).sum() / 6), rel=1e-5)
    assert stats.mean_sq == pytest.approx(float(G.mean(0).pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("spec", ["upstream", "all"])
def test_fast_paths_equal_single_sample_loop(spec):
    probe = _small_probe()
    batch = _batch(n=6)
    params = select_parameters(probe, spec)
    ref = grad_stats(probe, params, batch, method="loop")
    assert ref.mean_sq > 0 and ref.trace_cov > 0
    for method in ("ghost", "vmap"):
        got = grad_stats(probe, params, batch, method=method, chunk_size=4)
        assert torch.allclose(got.sq_norms, ref.sq_norms, rtol=1e-5, atol=0)
        for k in params:
            scale = ref.mean[k].abs().max().clamp_min(1e-12)
            assert float((got.mean[k] - ref.mean[k]).abs().max() / scale) < 1e-5, (method, k)
        assert got.gsnr == pytest.approx(ref.gsnr, rel=1e-5)


def test_scaling_the_loss_leaves_gsnr_unchanged():
    batch = _batch(n=6)
    a, b = _small_probe(weight=1.0), _small_probe(weight=7.3)
    sa = grad_stats(a, select_parameters(a, "upstream"), batch)
    sb = grad_stats(b, select_parameters(b, "upstream"), batch)
    assert sb.mean_sq == pytest.approx(7.3 ** 2 * sa.mean_sq, rel=1e-5)
    assert sb.gsnr == pytest.approx(sa.gsnr, rel=1e-5)


def test_parameters_past_the_aligned_block_get_no_alignment_gradient():
    probe = _small_probe(depths=(2,))
    batch = _batch(n=6)
    up = grad_stats(probe, select_parameters(probe, "upstream"), batch)
    for method in ("ghost", "loop"):
        wide = grad_stats(probe, select_parameters(probe, "upstream+blocks:3-3+sit"), batch, method=method)
        after = {k: v for k, v in wide.mean.items() if k.startswith(("sit.blocks.2.", "sit.final_layer."))}
        assert after and all(float(v.abs().max()) == 0.0 for v in after.values())
        assert wide.trace_cov == pytest.approx(up.trace_cov, rel=1e-6)
        assert wide.mean_sq == pytest.approx(up.mean_sq, rel=1e-6)
    # and the aligned block itself does receive it
    assert any(float(v.abs().max()) > 0 for k, v in up.mean.items() if k.startswith("sit.blocks.1."))


def test_parameter_sets_and_bad_inputs():
    probe = _small_probe()
    assert all(k.startswith("sit.blocks.2.") for k in select_parameters(probe, "block:3"))
    assert all(k.startswith("objective.heads.") for k in select_parameters(probe, "head"))
    names = select_parameters(probe, "upstream")
    assert any(k.startswith("sit.blocks.1.") for k in names) and not any(k.startswith("sit.blocks.2.") for k in names)
    for bad in ("block:9", "blocks:x", "final"):
        with pytest.raises(AhpaError):
            select_parameters(probe, bad)
    with pytest.raises(AhpaError, match="at least 2"):
        grad_stats(probe, names, _batch(n=1))
    lut = _small_probe(router="lut")
    with pytest.raises(AhpaError, match="vmap"):
        grad_stats(lut, select_parameters(lut, "router"), _batch(n=3), method="ghost")


# ---------------------------------------------------------------- the command, on a small toy set

@pytest.fixture
def small_toy(monkeypatch):
    """The toy digits cut to 48 images, so that the data source encodes them in a moment."""
    import ahpa.data.toy as toy

    full = toy.load_toy
    monkeypatch.setattr(toy, "load_toy", lambda split="train", resolution=32: tuple(v[:48] for v in full(split, resolution)))


def _cli(*args) -> int:
    from ahpa.cli import main

    return main(["diagnose", "gsnr", *args])


def test_cli_fresh_init_router_equals_uniform_and_outputs(tmp_path, small_toy, capsys):
    out = tmp_path / "g"
    rc = _cli("--config", "configs/toy.yaml", "--out", str(out), "--target", "own", "--target", "uniform:G3+G4",
              "--target", "uniform:G3", "--n", "4", "--t", "0.3,0.8", "--quiet", "model.name=SiT-T/4")
    assert rc == 0
    result = json.loads((out / "gsnr.json").read_text())
    recs = {(r["target"], r["t"]): r for r in result["records"]}
    assert len(recs) == 6 and {r["n"] for r in recs.values()} == {4}
    for t in (0.3, 0.8):  # a zero-initialised router is the static uniform mix (docs/design.md section 3), same head
        own, uni = recs[("own", t)], recs[("uniform:G3+G4", t)]
        assert own["gsnr"] == pytest.approx(uni["gsnr"], rel=1e-6) and own["loss_align"] == pytest.approx(uni["loss_align"], rel=1e-6)
        assert recs[("uniform:G3", t)]["gsnr"] != pytest.approx(own["gsnr"], rel=1e-3)
        r = recs[("uniform:G3", t)]
        assert r["trace_cov"] == pytest.approx((r["sum_sample_grad_sq"] - 4 * r["mean_grad_sq"]) / 3, rel=1e-9)
        assert r["gsnr_batch"] == pytest.approx(4 * r["gsnr"])
        # at initialisation adaLN-Zero and the zero output layer leave the upstream blocks without diffusion gradient
        assert r["diff_grad_sq"] == 0.0 and r["cos_diff_align"] is None
    s = result["summary"]["uniform:G3"]["gsnr_batch"]
    assert s["t>0.5"] == pytest.approx(recs[("uniform:G3", 0.8)]["gsnr_batch"])
    assert s["all"] == pytest.approx((recs[("uniform:G3", 0.3)]["gsnr_batch"] + recs[("uniform:G3", 0.8)]["gsnr_batch"]) / 2)
    heads = {d["target"]: d["head"] for d in result["targets"]}
    assert heads["uniform:G3"] == "trained (channels of G3)"
    assert (out / "gsnr.csv").read_text().count("\n") == 7 and (out / "gsnr.png").stat().st_size > 1000
    assert "uniform:G3" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--n", "1"], "at least 2"),
    (["--target", "cosine:G3"], "unknown --target"),
    (["--t", "0.5,1.5"], "[0, 1]"),
    (["--target", "uniform:G9"], "provides no features"),
    (["--target", "uniform:latent"], "provides no features ['latent']"),
    (["--params", "block:40"], "outside"),
])
def test_cli_bad_inputs_one_line_nothing_written(tmp_path, small_toy, capsys, args, message):
    out = tmp_path / "g"
    rc = _cli("--config", "configs/toy.yaml", "--out", str(out), "--quiet", *args, "model.name=SiT-T/4")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_cli_vae_swap_refuses_unfitting_groups_and_accepts_fitting(tmp_path, small_toy, capsys):
    from diffusers import AutoencoderKL

    from ahpa.priors.vae import TINY_VAE_DIR
    from helpers import small_vae

    small_vae((32, 64, 128)).save_pretrained(tmp_path / "other")  # three levels of other widths: G3/G4 differ
    torch.manual_seed(3)
    AutoencoderKL.from_config(AutoencoderKL.load_config(TINY_VAE_DIR)).save_pretrained(tmp_path / "same")  # tiny's layout, new weights
    base = ["--config", "configs/toy.yaml", "--n", "4", "--t", "0.5", "--quiet"]
    rc = _cli(*base, "--out", str(tmp_path / "bad"), "model.name=SiT-T/4", f"vae.path={tmp_path / 'other'}")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "do not fit" in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert _cli(*base, "--out", str(tmp_path / "own"), "model.name=SiT-T/4") == 0
    assert _cli(*base, "--out", str(tmp_path / "swap"), "model.name=SiT-T/4", f"vae.path={tmp_path / 'same'}") == 0
    own = json.loads((tmp_path / "own" / "gsnr.json").read_text())
    swap = json.loads((tmp_path / "swap" / "gsnr.json").read_text())
    assert swap["supervisor_vae"] == str(tmp_path / "same") and swap["vae"] == "tiny"
    # same backbone inputs (latents of the checkpoint's VAE), other supervisor features
    assert swap["records"][0]["loss_diffusion"] == pytest.approx(own["records"][0]["loss_diffusion"], rel=1e-6)
    assert swap["records"][0]["gsnr"] != pytest.approx(own["records"][0]["gsnr"], rel=1e-3)


@pytest.mark.slow
def test_training_gsnr_is_logged_and_leaves_training_unchanged(tmp_path, small_toy):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ahpa.config import load_config
    from ahpa.train import Trainer

    finals = {}
    for every in (0, 1):
        cfg = load_config("configs/toy.yaml", ["model.name=SiT-T/4", "train.steps=2", "train.global_batch=8",
                                               "train.ckpt_every=0", "train.grid_steps=1", f"train.gsnr_every={every}"])
        cfg.train.out = str(tmp_path / f"run{every}")
        Trainer(cfg, show_progress=False).run()
        finals[every] = load_file(str(tmp_path / f"run{every}" / "checkpoints" / "0000002" / "model.safetensors"))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # the monitor draws from its own generator
    events = EventAccumulator(str(tmp_path / "run1" / "tb")).Reload()
    tags = events.Tags()["scalars"]
    for t in ("0.1", "0.5", "0.9"):
        values = [e.value for e in events.Scalars(f"gsnr/batch/t={t}")]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert not any(tag.startswith("gsnr/") for tag in EventAccumulator(str(tmp_path / "run0" / "tb")).Reload().Tags()["scalars"])
    assert "gsnr/per_sample/t=0.5" in tags
