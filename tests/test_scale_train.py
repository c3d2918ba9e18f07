"""Speed and memory levers of the training step: compile, activation checkpointing, FSDP2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomised
from test_train import TOY, _free_port, toy_cfg, weights

from ahpa.build import build_objective
from ahpa.config import load_config
from ahpa.models.sit import build_sit
from ahpa.train import Trainer
from ahpa.training_module import TrainingModule
from ahpa.transport import Transport

pytestmark = pytest.mark.usefixtures("one_thread")
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"
COMPILE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # inductor's GPU code, not its slow C++ build
GROUPS = {"G3": (2, 64), "G4": (6, 64)}  # the tiny VAE's groups at a 4x4 token grid


def tiny_step_inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g),
            torch.rand(batch, generator=g), torch.randn(batch, 4, 8, 8, generator=g),
            torch.rand(batch, generator=g) < 0.3,
            {g_: torch.randn(batch, L, C, 4, 4, generator=g) for g_, (L, C) in GROUPS.items()})


def tiny_module(router: str = "dynamic", depth: int = 2) -> TrainingModule:
    torch.manual_seed(0)
    cfg = load_config(TOY, [f"align.router={router}"])
    sit = build_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=10)
    sit.blocks = sit.blocks[:depth]  # two blocks keep the compile short
    sit.depth = depth
    randomised(sit, std=0.05)  # adaLN-Zero would make the blocks the identity
    return TrainingModule(sit, build_objective(cfg, sit, GROUPS), Transport())


def losses_and_grads(module, forward, inputs):
    module.zero_grad(set_to_none=True)
    loss, diff, align = forward(*inputs)
    loss.backward()
    return [loss.detach(), diff, align], {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_training_step_compiles_as_one_graph_and_equals_eager():
    """The whole forward (SiT, transport loss, router, head, cosine loss) is one graph, and the
    compiled forward + backward (AOTAutograd's joint graph) gives eager's loss and gradients.
    The ``aot_eager`` backend traces exactly what inductor receives without generating code (inductor's
    C++ build takes minutes on 2 shared cores); the inductor run is the CUDA test of benchmarks/gpu_suite.sh."""
    module = tiny_module().to(COMPILE_DEVICE)
    inputs = tuple({k: v.to(COMPILE_DEVICE) for k, v in x.items()} if isinstance(x, dict) else x.to(COMPILE_DEVICE)
                   for x in tiny_step_inputs())
    eager_losses, eager_grads = losses_and_grads(module, module, inputs)
    compiled = torch.compile(module, fullgraph=True, backend=COMPILE_BACKEND)  # raises on any graph break
    comp_losses, comp_grads = losses_and_grads(module, compiled, inputs)
    for a, b in zip(eager_losses, comp_losses):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == comp_grads.keys() and any(k.startswith("objective.router") for k in eager_grads)
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert eager_losses[2].abs() > 0  # the alignment branch took part


def test_activation_checkpointing_keeps_losses_hidden_states_and_gradients():
    module = tiny_module(depth=3)
    inputs = tiny_step_inputs(seed=1)
    plain_losses, plain_grads = losses_and_grads(module, module, inputs)
    x_t = torch.randn(4, 4, 8, 8)
    _, hidden = module.sit(x_t, inputs[2], inputs[1], hidden_depths=(2,), force_drop_ids=inputs[4])
    module.sit.activation_checkpointing = True
    ckpt_losses, ckpt_grads = losses_and_grads(module, module, inputs)
    _, hidden_ckpt = module.sit(x_t, inputs[2], inputs[1], hidden_depths=(2,), force_drop_ids=inputs[4])
    assert hidden_ckpt[2].grad_fn is not None and "Checkpoint" not in type(hidden[2].grad_fn).__name__
    torch.testing.assert_close(hidden_ckpt[2], hidden[2], rtol=0, atol=0)
    for a, b in zip(plain_losses, ckpt_losses):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # and it does recompute: the blocks run twice per step
    calls, block = [], module.sit.blocks[0]
    original = block.forward
    block.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    losses_and_grads(module, module, inputs)
    assert len(calls) == 2


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(tmp_path):
    """Resume a 1-process DDP-format checkpoint under FSDP2 with 2 gloo processes, train 2 more steps:
    the same weights, EMA and objective as 1 process training all 3 (sharded load, step, EMA, gather, save)."""
    Trainer(toy_cfg(tmp_path / "one", "train.steps=1"), show_progress=False).run()
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    Trainer(toy_cfg(tmp_path / "one", "train.steps=3"), show_progress=False).run()
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "ahpa.cli", "train", "--config", str(TOY), "--out", str(tmp_path / "two"),
               "train.global_batch=8", "train.log_every=1", "train.ckpt_every=0", "train.grid_steps=2",
               "train.max_minutes=0", "model.name=SiT-T/2", "train.steps=3", "train.fsdp=true"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "parameter tensors sharded over 2 process(es)" in outs[0] and "FSDP2: 0 of" not in outs[0], outs[0]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # the same update up to the order of floating-point sums in the reductions
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    opt_a = torch.load(Path(tmp_path / "one/checkpoints/0000003/optimizer.pt"), weights_only=True)
    opt_b = torch.load(Path(tmp_path / "two/checkpoints/0000003/optimizer.pt"), weights_only=True)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i in opt_a["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_b["state"][i][key], opt_a["state"][i][key], rtol=1e-3, atol=1e-7)
