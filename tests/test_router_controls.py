"""The router's collapse controls (issue 13), each on a two-step case checked by hand.

The case: two groups of two layers.  The G4 target equals the projection head's
initial output on the G4 channels (perfectly predictable), the G3 target is
independent noise.  Minimising the cosine loss alone, the router moves weight to
G4 (the collapse); each control must change that in the direction it promises.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ahpa.align.objective import AlignmentObjective
from ahpa.config import Config, load_config
from ahpa.errors import AhpaError
from ahpa.training_module import optimizer_param_groups

B, GRID, D, L, C = 4, 2, 8, 2, 4


def make_case(router: str = "dynamic", **controls):
    torch.manual_seed(0)
    obj = AlignmentObjective(hidden_size=D, grid=GRID, group_shapes={"G3": (L, C), "G4": (L, C)}, depths=[1],
                             router=router, router_hidden=16, time_dim=8, **controls)
    hidden = {1: torch.randn(B, GRID * GRID, D)}
    with torch.no_grad():
        pred = obj.heads["1"](hidden[1].transpose(1, 2).reshape(B, D, GRID, GRID))
    g4 = pred[:, C:, None].expand(-1, -1, L, -1, -1).transpose(1, 2).contiguous()  # both G4 layers = head output
    g3 = torch.randn(B, L, C, GRID, GRID)
    return obj, hidden, {"G3": g3, "G4": g4}, torch.rand(B)


class Wrapper(nn.Module):  # parameter names as in TrainingModule: "objective.router...."
    def __init__(self, objective):
        super().__init__()
        self.objective = objective


def run_steps(obj, hidden, feats, t, steps=2, lr=1e-2, lr_mult=1.0, sgd=False):
    """``steps`` optimizer steps on the alignment loss (AdamW like the trainer, or SGD);
    returns gamma_G4 at t after each step and the router parameters after each step."""
    cfg = Config()
    cfg.train.lr, cfg.align.router_lr_mult = lr, lr_mult
    groups = optimizer_param_groups(Wrapper(obj), cfg)
    opt = torch.optim.SGD(groups, lr=lr) if sgd else torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    gammas, params = [], []
    for step in range(steps):
        obj.set_step(step)
        loss, _ = obj(hidden, feats, t)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        gammas.append(float(obj.router_weights(torch.tensor([0.5]))["gamma/G4"][0]))
        params.append([p.detach().clone() for p in obj.router.parameters()])
    return gammas, params


def test_default_router_moves_to_the_predictable_group():
    gammas, _ = run_steps(*make_case())
    assert 1.0 < gammas[0] < gammas[1]  # the collapse direction: weight to the predictable G4


def test_lr_mult_scales_the_routers_first_adam_step_exactly():
    base = make_case()
    before = [p.detach().clone() for p in base[0].router.parameters()]
    g_full, p_full = run_steps(*base)
    slow = make_case()
    g_slow, p_slow = run_steps(*slow, lr_mult=0.1)
    # AdamW's first step is lr * g / (|g| + eps): exactly proportional to the learning rate.
    for b, full, small in zip(before, p_full[0], p_slow[0]):
        torch.testing.assert_close(small - b, 0.1 * (full - b), rtol=1e-4, atol=1e-9)
    assert 1.0 < g_slow[1] < g_full[1]  # a slower router moves less toward collapse
    # the head and backbone keep train.lr: one group at lr, one at lr * mult
    cfg = Config()
    cfg.align.router_lr_mult = 0.1
    groups = optimizer_param_groups(Wrapper(slow[0]), cfg)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(cfg.train.lr * 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(slow[0].parameters()))


def test_temperature_softens_the_weights_by_hand():
    obj = make_case(router="lut", router_temperature=2.0)[0]
    with torch.no_grad():
        obj.router.inter_table[:] = torch.tensor([0.0, math.log(9.0)])  # beta = (0, ln 9)
    gamma = obj.router_weights(torch.tensor([0.3]))["gamma/G4"][0]
    assert float(gamma) == pytest.approx(2 * 3 / (1 + 3))  # softmax((0, ln 9) / 2) = (1/4, 3/4)
    g1, _ = run_steps(*make_case())
    g2, _ = run_steps(*make_case(router_temperature=2.0))
    assert 1.0 < g2[1] < g1[1]  # same parameter steps, half the logit change: slower collapse


def test_entropy_bonus_adds_the_hand_computed_gradient_and_pulls_back():
    coef = 0.5
    obj, hidden, feats, t = make_case(router="lut", router_entropy=coef)
    with torch.no_grad():
        obj.router.inter_table[:] = torch.tensor([-1.0, 1.0])  # already leaning to G4
    ref, *_ = make_case(router="lut")
    ref.load_state_dict(obj.state_dict())
    grads = []
    for o in (obj, ref):
        loss, _ = o(hidden, feats, t)
        o.zero_grad()
        loss.mean().backward()
        grads.append(o.router.inter_table.grad.clone())
    # normalised entropy H = -sum p log p / log 2 of p = softmax(beta): dH/dbeta_j = -p_j (log p_j + H_nat) / log 2
    p = torch.softmax(torch.tensor([-1.0, 1.0]), 0)
    h_nat = -(p * p.log()).sum()
    d_h = -p * (p.log() + h_nat) / math.log(2)
    bins = (t * obj.router.bins).long().clamp(max=obj.router.bins - 1)
    expected = torch.zeros_like(grads[1])
    for b in bins.tolist():
        expected[b] += -coef * d_h / (3 * B)  # H is the mean over 3 softmaxes (2 intra, 1 inter) and the batch
    torch.testing.assert_close(grads[0] - grads[1], expected, rtol=1e-5, atol=1e-7)
    # two SGD steps from the collapsed start: the bonus pulls gamma_G4 back toward 1
    g_ent, _ = run_steps(obj, hidden, feats, t, sgd=True, lr=1.0)
    g_ref, _ = run_steps(ref, hidden, feats, t, sgd=True, lr=1.0)
    assert g_ent[1] < g_ref[1]


def test_warmup_blends_from_uniform_and_freezes_the_router_at_step_zero():
    obj, hidden, feats, t = make_case(router_warmup_steps=2)
    before = [p.detach().clone() for p in obj.router.parameters()]
    gammas, params = run_steps(obj, hidden, feats, t, sgd=True, lr=1.0)
    for b, a in zip(before, params[0]):  # step 0: w = 0, the target is the uniform mix, no router gradient
        assert torch.equal(a, b)
    ref = make_case()
    _, p_ref = run_steps(*ref, steps=1, sgd=True, lr=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, p_ref[0]))  # without warm-up it moved at step 0
    # the blend itself: step 1 of 2 is half uniform, half router
    obj.set_step(1)
    intra, gamma = obj.warmed_up({"G3": torch.tensor([[0.9, 0.1]])}, torch.tensor([[0.4, 1.6]]))
    torch.testing.assert_close(intra["G3"], torch.tensor([[0.7, 0.3]]))
    torch.testing.assert_close(gamma, torch.tensor([[0.7, 1.3]]))
    obj.set_step(5)  # after the warm-up: the router alone
    torch.testing.assert_close(obj.warmed_up({}, torch.tensor([[0.4, 1.6]]))[1], torch.tensor([[0.4, 1.6]]))


def test_defaults_are_the_paper_and_bad_values_are_refused():
    cfg = Config()
    assert (cfg.align.router_lr_mult, cfg.align.router_entropy, cfg.align.router_temperature,
            cfg.align.router_warmup_steps) == (1.0, 0.0, 1.0, 0)
    assert len(optimizer_param_groups(Wrapper(make_case()[0]), cfg)) == 1  # one group: the optimizer state is unchanged
    with pytest.raises(AhpaError, match="router_temperature"):
        load_config(None, ["data.source=toy", "align.router_temperature=0"])
    with pytest.raises(AhpaError, match="router_entropy"):
        load_config(None, ["data.source=toy", "align.router_entropy=-1"])
