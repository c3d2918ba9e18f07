"""Position and probe predictability of alignment targets (ahpa.diagnostics.predictability)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahpa.diagnostics.predictability import position_predictability, probe_predictability


def test_position_predictability_by_hand():
    # two images, one token: targets (1, 0) and (0, 1); their mean (0.5, 0.5) has cosine 1/sqrt(2) to each
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    assert position_predictability(t) == pytest.approx(2 ** -0.5)
    same = torch.randn(1, 5, 3, 3).expand(4, -1, -1, -1)  # every image the same: the position says everything
    assert position_predictability(same) == pytest.approx(1.0)


def test_probe_finds_the_predictable_group_and_the_sweep_prefers_it():
    g = torch.Generator().manual_seed(0)
    n, d, c, h = 60, 6, 4, 3
    hidden = torch.randn(n, d, h, h, generator=g)
    w = torch.randn(c, d, generator=g)
    g4 = torch.einsum("cd,ndhw->nchw", w, hidden)[:, None].repeat(1, 2, 1, 1, 1)  # linear in the hidden state
    g3 = torch.randn(n, 2, c, h, h, generator=g)  # independent of it
    out = probe_predictability(hidden, {"G3": g3, "G4": g4}, normalize="none")
    assert out["G4"] > 0.99 and abs(out["G3"]) < 0.3
    sweep = [out[f"sweep/G4={gamma}"] for gamma in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert sweep == sorted(sweep) and sweep[-1] == pytest.approx(out["G4"])  # the optimum is the vertex
    # the concatenation with gamma = 1 equals the cosine of the concatenated prediction and target
    assert out["sweep/G4=1.0"] == pytest.approx(out["G3+G4"])
