"""Positive-control design exploration (issue 21): train vanilla toy runs, evaluate milestones
with several samplers, EMA or online weights.  Single-threaded by design (shared CPU).

    python benchmarks/pc_explore.py train NAME STEPS CKPT_EVERY [overrides...]
    python benchmarks/pc_explore.py eval NAME STEP [--online] [--steps 10] [--cfg 1.0] [--num 300]
Results are appended as JSON lines to explore/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this worktree, not the editable install
import ahpa  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
ROOT = Path("explore")


def train(name, steps, every, overrides):
    import ahpa.train
    from ahpa.config import load_config

    cfg = load_config("configs/toy-t1.yaml", ["align.method=vanilla", "prior.kind=none", "train.grid_steps=10",
                                               f"train.out={ROOT / 'runs' / name}", f"train.steps={steps}",
                                               f"train.ckpt_every={every}", f"train.keep_last={steps // every + 1}",
                                               "train.max_minutes=0", "train.log_every=50"] + overrides)
    t0 = time.time()
    m = ahpa.train.Trainer(cfg, show_progress=False).run()
    dt = time.time() - t0
    rec = dict(kind="train", name=name, steps=steps, overrides=overrides, seconds=dt, s_per_step=dt / steps)
    print(json.dumps(rec), flush=True)
    with open(ROOT / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def evaluate(name, step, online, steps, cfg_scale, num, method="euler", tag=""):
    import numpy as np
    from safetensors.torch import load_file

    import ahpa.generate as generate
    from ahpa.checkpointing import step_dir_name
    from ahpa.evaluation.digits import digits_metrics
    from ahpa.models.checkpoints import load_model_for_sampling
    from ahpa.priors.vae import load_vae

    ckpt = ROOT / "runs" / name / "checkpoints" / step_dir_name(step)
    model, meta = load_model_for_sampling(ckpt)
    if online:
        sd = load_file(str(ckpt / "model.safetensors"))
        missing = model.load_state_dict({k.removeprefix("module."): v.float() for k, v in sd.items()}, strict=True)
    model.eval()
    vae = load_vae(meta["vae"])
    kw = dict(mode="ode", method=method, steps=steps, cfg_scale=cfg_scale, guidance_interval=(0.0, 1.0), path=meta.get("path", "linear"))
    out = ROOT / "samples" / name / f"{step}-{'online' if online else 'ema'}-{method}{steps}-cfg{cfg_scale}-n{num}"
    t0 = time.time()
    npz = generate.generate_samples(model, meta, lambda x: vae.decode(x.to(vae.dtype)).sample.float(), out, num, 150, kw, seed=0)
    t1 = time.time()
    with np.load(npz) as d:
        met = digits_metrics(d["arr_0"], d["arr_1"], ref="train")
    t2 = time.time()
    rec = dict(kind="eval", name=name, step=step, weights="online" if online else "ema", sampler=f"{method}{steps}",
               cfg=cfg_scale, num=num, accuracy=met["accuracy"], cfid=met["cfid"], sample_s=t1 - t0, eval_s=t2 - t1, tag=tag)
    print(json.dumps(rec), flush=True)
    with open(ROOT / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    ROOT.mkdir(exist_ok=True)
    if sys.argv[1] == "train":
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        p = argparse.ArgumentParser()
        p.add_argument("cmd"); p.add_argument("name"); p.add_argument("step", type=int)
        p.add_argument("--online", action="store_true"); p.add_argument("--steps", type=int, default=10)
        p.add_argument("--cfg", type=float, default=1.0); p.add_argument("--num", type=int, default=300)
        p.add_argument("--method", default="euler"); p.add_argument("--tag", default="")
        a = p.parse_args()
        evaluate(a.name, a.step, a.online, a.steps, a.cfg, a.num, a.method, a.tag)
