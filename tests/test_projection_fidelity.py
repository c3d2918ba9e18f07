"""What a projection costs the method (issue 18 item 2; ahpa/diagnostics/projection_fidelity.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ahpa.align.objective import AlignmentObjective
from ahpa.build import build_source
from ahpa.cli import main as cli_main
from ahpa.config import load_config
from ahpa.data.projection import Projection, group_moments, load_projection, random_projection, save_projection
from ahpa.diagnostics.projection_fidelity import fit_projections, gradient_fidelity, project_channels

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
STUDY_PROJECTION = ROOT / "configs" / "studies" / "toy-pc-pca8.safetensors"


def objective(group_shapes, hidden=8, grid=3, head="conv3", normalize="token", router="dynamic") -> AlignmentObjective:
    torch.manual_seed(0)
    return AlignmentObjective(hidden, grid, group_shapes, [1], router=router, head=head, normalize=normalize).eval()


def test_full_width_orthogonal_projection_keeps_the_gradient():
    """K = C: an orthogonal P per group preserves every per-token cosine, so g_K = g_full."""
    shapes = {"G3": (2, 6), "G4": (3, 5)}
    obj = objective(shapes)
    torch.manual_seed(1)
    hidden = {1: torch.randn(4, 9, 8)}
    features = {g: torch.randn(4, L, C, 3, 3) for g, (L, C) in shapes.items()}
    t = torch.rand(4)
    full = {g: random_projection(C, C, seed=i) for i, (g, (_, C)) in enumerate(shapes.items())}
    half = {g: random_projection(C, 2, seed=i) for i, (g, (_, C)) in enumerate(shapes.items())}
    out = gradient_fidelity(obj, hidden, features, t, {6: full, 2: half})
    torch.testing.assert_close(out[6]["cos"], torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[6]["norm_ratio"], torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[6]["target_kept"], torch.ones(4), atol=1e-5, rtol=0)
    assert (out[2]["cos"] < 0.999).all() and (out[2]["target_kept"] < 0.999).all()  # a real cut is seen


def test_gradient_cosine_of_a_case_computed_by_hand():
    """One token, identity head, target y = (1, 1, 0), hidden h = (1, 0, 1).

    Full: d/dp -cos(p, y) = -(y^ - cos p^) / |p| = (-1/4, -1/2, 1/4).  P keeps channels 0 and 1: Pp = (1, 0),
    Py = (1, 1), gradient P^T (0, -1/sqrt2) = (0, -1/sqrt2, 0).  cos = (1/(2 sqrt2)) / (sqrt6/4 / sqrt2) = 2/sqrt6,
    norm ratio (1/sqrt2) / (sqrt6/4) = 2/sqrt3, and P keeps all of y's energy.  A P onto channel 2 alone drops
    exactly the direction y lives in: P y = 0, no gradient, cosine 0, energy kept 0."""
    obj = objective({"G3": (1, 3)}, hidden=3, grid=1, head="linear", normalize="none", router="uniform")
    with torch.no_grad():
        obj.heads["1"].weight.copy_(torch.eye(3)[:, :, None, None])
        obj.heads["1"].bias.zero_()
    hidden = {1: torch.tensor([[[1.0, 0.0, 1.0]]])}
    features = {"G3": torch.tensor([1.0, 1.0, 0.0]).reshape(1, 1, 3, 1, 1)}
    keep01 = {"G3": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    drop_y = {"G3": torch.tensor([[0.0, 0.0, 1.0]])}
    out = gradient_fidelity(obj, hidden, features, torch.tensor([0.5]), {2: keep01, 1: drop_y})
    assert out[2]["cos"].item() == pytest.approx(2 / math.sqrt(6), abs=1e-6)
    assert out[2]["norm_ratio"].item() == pytest.approx(2 / math.sqrt(3), abs=1e-6)
    assert out[2]["target_kept"].item() == pytest.approx(1.0, abs=1e-6)
    assert out[1]["cos"].item() == pytest.approx(0.0, abs=1e-6)
    assert out[1]["target_kept"].item() == pytest.approx(0.0, abs=1e-6)


def test_project_channels_is_block_diagonal():
    x = torch.randn(2, 7, 3, 3)
    p = {"G3": torch.randn(2, 4), "G4": torch.randn(1, 3)}
    y = project_channels(x, p, {"G3": (1, 4), "G4": (2, 3)})
    torch.testing.assert_close(y[:, :2], torch.einsum("kc,bchw->bkhw", p["G3"], x[:, :4]))
    torch.testing.assert_close(y[:, 2:], torch.einsum("kc,bchw->bkhw", p["G4"], x[:, 4:]))


def test_explained_variance_of_a_known_spectrum():
    """Tokens 3 q0, 2 q1, 1 q2 (q: orthonormal columns of a random rotation of R^6): the second moment has
    eigenvalues 9, 4, 1, 0, 0, 0, so K = 1, 2, 3 explain 9/14, 13/14, 1, and P's rows span q0..q(K-1)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    tokens = torch.stack([3 * q[:, 0], 2 * q[:, 1], q[:, 2]]).float()  # [3 tokens, 6 channels]
    feats = {"G3": tokens.T.reshape(1, 1, 6, 1, 3)}  # [B, L, C, H, W]: three tokens on a 1x3 grid
    moments = group_moments([feats], ["G3"], normalize="none")
    matrices, explained = fit_projections(moments, [1, 2, 3, 6])
    assert explained["G3"][1] == pytest.approx(9 / 14, abs=1e-6)
    assert explained["G3"][2] == pytest.approx(13 / 14, abs=1e-6)
    assert explained["G3"][3] == pytest.approx(1.0, abs=1e-6)
    for k in (1, 2, 3):
        p = matrices[k]["G3"].double()
        torch.testing.assert_close(p @ p.T, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close((p @ q[:, :k]).abs().det().abs(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)


def test_diagnose_projection_on_the_toy_and_the_study_projection_file(tmp_path):
    """The command on the toy (fresh initialisation): K = 64 is the tiny VAE's full width (cosine 1), the
    explained variance is the one docs/projected-caches.md quotes, and the projection file it writes for the
    study is the committed configs/studies/toy-pc-pca8.safetensors, which an on-the-fly source accepts."""
    out = tmp_path / "fid"
    assert cli_main(["diagnose", "projection", "--config", str(ROOT / "configs" / "toy-pc.yaml"), "--out", str(out),
                     "--k", "8,64", "--n", "4", "--t", "0.5", "--save-projection", "8", "--quiet"]) == 0
    result = json.loads((out / "projection_fidelity.json").read_text())
    assert result["channels"] == {"G3": 64, "G4": 64}
    assert result["explained_variance"]["G3"]["8"] == pytest.approx(0.9957, abs=1e-4)
    assert result["explained_variance"]["G4"]["64"] == pytest.approx(1.0, abs=1e-6)
    rec = {r["k"]: r for r in result["records"]}
    assert rec[64]["cos_mean"] == pytest.approx(1.0, abs=1e-5) and rec[64]["cos_min"] == pytest.approx(1.0, abs=1e-5)
    assert rec[8]["cos_mean"] < 1 - 1e-4
    written, committed = load_projection(out / "projection-pca8.safetensors"), load_projection(STUDY_PROJECTION)
    assert committed.k == 8 and committed.normalize == "token"
    for g in ("G3", "G4"):
        torch.testing.assert_close(written.matrices[g], committed.matrices[g], atol=1e-4, rtol=0)
    cfg = load_config(ROOT / "configs" / "toy-pc.yaml", [f"prior.project={STUDY_PROJECTION}", "train.global_batch=4"])
    source = build_source(cfg, device="cpu", per_rank=4)
    assert {g: s[1] for g, s in source.group_shapes.items()} == {"G3": 8, "G4": 8}
    # the file is never replaced: the same fit again is accepted, another projection in its place is refused
    args = ["diagnose", "projection", "--config", str(ROOT / "configs" / "toy-pc.yaml"), "--out", str(out), "--k", "8",
            "--explained-only", "--save-projection", "8", "--quiet"]
    assert cli_main(args) == 0
    file = out / "projection-pca8.safetensors"
    file.unlink()
    save_projection(file, Projection({g: -m for g, m in written.matrices.items()}, "pca", "token", 0.6, written.explained))
    before = file.read_bytes()
    assert cli_main(args) == 2 and file.read_bytes() == before
