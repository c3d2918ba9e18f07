"""``ahpa demo``: a tiny model trained on the bundled digits within a time budget, on any CPU.

The demo trains ``configs/toy.yaml`` (SiT with AHPA, or ``--method vanilla``) or ``configs/toy-t2i.yaml``
(``--task t2i``: an MMDiT on captioned digits) until its time budget (``--minutes``, the training loop's
``train.max_minutes``) or its step cap (``train.steps``), whichever comes first, and says which stopped it.
Rerunning the same command continues from the checkpoint up to the step cap.

For the text-to-image demo it measures whether the grid follows its captions: each cell of the grids
(``samples_step0.png`` before training, ``samples.png`` after; one row per caption, listed in the ``.txt``
beside them) is classified by a classifier trained here on the REAL captioned toy images (multinomial
logistic regression on the grey pixels, scikit-learn) into the 20 caption classes (digit x stroke weight).
Caption following = the fraction of cells whose predicted class is their row's caption class (chance 1/20),
and the same for the digit alone (chance 1/10) and for the weight alone (chance 1/2).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ahpa.align.objective import extra_parameters
from ahpa.config import PRESETS, Config, load_config
from ahpa.data.coco import DIGIT_NAMES, WEIGHTS, load_captioned_toy, toy_caption_classes, toy_captions
from ahpa.errors import AhpaError
from ahpa.io import write_json_atomic
from ahpa.router_plot import router_deviation
from ahpa.train import GRID_PER_ROW, Trainer

# The training budget of each demo in minutes and its step cap; set-up, the two sample grids and the caption
# metric come on top (docs/reliability.md "The demos").  A train.max_minutes or train.steps override wins.
BUDGET_MINUTES = {"class": 3.0, "t2i": 3.0}
STEP_CAP = {"class": 5000, "t2i": 2000}


def demo_config(out: str, method: str, overrides: list[str], task: str = "class", minutes: float | None = None) -> Config:
    """The demo's config: the toy preset, the method, the budget (an override of train.max_minutes wins)."""
    cfg = load_config(PRESETS / ("toy-t2i.yaml" if task == "t2i" else "toy.yaml"), overrides)
    cfg.train.out = out
    if method == "vanilla":
        cfg.align.method = "vanilla"
    if not any(o.startswith("train.max_minutes=") for o in overrides):
        cfg.train.max_minutes = BUDGET_MINUTES[task] if minutes is None else minutes
    if not any(o.startswith("train.steps=") for o in overrides):
        cfg.train.steps = STEP_CAP[task]
    return cfg


def stop_reason(metrics: dict, cfg: Config, start_step: int) -> str:
    """One line: how many steps ran in this call and what stopped them."""
    ran = metrics["steps"] - start_step
    if metrics["stopped_early"]:
        return (f"trained {ran} steps (to step {metrics['steps']} of the cap train.steps={cfg.train.steps}) in "
                f"{metrics['train_seconds']:.0f} s: the time budget train.max_minutes={cfg.train.max_minutes:g} stopped it; "
                "rerun the same command to train further")
    return (f"trained {ran} steps in {metrics['train_seconds']:.0f} s: reached the step cap train.steps={cfg.train.steps} "
            f"within the budget train.max_minutes={cfg.train.max_minutes:g}")


def run_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    task = getattr(args, "task", "class")
    out_dir = args.out or ("runs/demo-t2i" if task == "t2i" else "runs/demo")
    minutes = getattr(args, "minutes", None)
    if minutes is not None and minutes <= 0:
        raise AhpaError(f"--minutes must be positive (got {minutes}); it is the training budget of the demo")
    cfg = demo_config(out_dir, args.method, args.overrides, task=task, minutes=minutes)
    trainer = Trainer(cfg, resume=not args.no_resume)
    start_step = trainer.step
    setup = time.perf_counter() - t0
    metrics = trainer.run()
    metrics["setup_seconds"] = setup
    metrics["method"] = cfg.align.method
    metrics["parameters"] = sum(p.numel() for p in trainer.sit.parameters())
    if trainer.objective is not None:
        metrics["alignment_parameters"] = extra_parameters(trainer.objective)
        metrics["router_max_deviation_from_uniform"] = router_deviation(trainer.objective)
    out = Path(cfg.train.out)
    if task == "t2i":  # does the final grid follow its captions better than the first?
        metrics["caption_following"] = caption_following(out, cfg.data.resolution)
        print(f"caption following (digits classifier on the grid cells): {metrics['caption_following']['summary']}")
    metrics["stop_reason"] = stop_reason(metrics, cfg, start_step)
    metrics["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "metrics.json", metrics, indent=2)
    print(metrics["stop_reason"])
    print(f"demo finished in {metrics['total_seconds']:.0f} s: {out}/samples.png, {out}/metrics.json"
          + (f", {out}/router.png" if trainer.objective is not None else ""))
    return 0


# ---------------------------------------------------------------------- caption following (--task t2i)
def _features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, R, R] grey -> [N, R*R] in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def train_classifier(resolution: int):
    """Logistic regression on the real captioned toy set; returns (classifier, held-out accuracy)."""
    from sklearn.exceptions import ConvergenceWarning  # scikit-learn: only the t2i demo needs it
    from sklearn.linear_model import LogisticRegression

    x, y, _ = load_captioned_toy("train", resolution)
    xh, yh, _ = load_captioned_toy("heldout", resolution)
    clf = LogisticRegression(max_iter=300, C=1.0)
    with warnings.catch_warnings():  # 300 iterations are enough for the metric; its advice is not for the demo's user
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(_features(x[:, 0].numpy()), y.numpy())
    return clf, float((clf.predict(_features(xh[:, 0].numpy())) == yh.numpy()).mean())


def grid_cells(png: Path, resolution: int, rows: int) -> np.ndarray:
    """The cells of a torchvision grid (padding 1, ``GRID_PER_ROW`` per row) as grey uint8 [rows * GRID_PER_ROW, R, R]."""
    arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8).mean(axis=2)
    step = resolution + 1
    cells = [arr[1 + r * step : 1 + r * step + resolution, 1 + c * step : 1 + c * step + resolution]
             for r in range(rows) for c in range(GRID_PER_ROW)]
    return np.stack(cells).round().astype(np.uint8)


def caption_class(prompt: str) -> int:
    for k, (d, w) in enumerate(toy_caption_classes()):
        if prompt in toy_captions(d, w):
            return k
    raise AhpaError(f"grid caption {prompt!r} is not a toy caption")


def grid_following(clf, png: Path, resolution: int) -> dict:
    prompts = png.with_suffix(".txt").read_text().splitlines()
    target = np.repeat([caption_class(p) for p in prompts], GRID_PER_ROW)
    pred = clf.predict(_features(grid_cells(png, resolution, len(prompts))))
    return {"class": float((pred == target).mean()), "digit": float((pred // 2 == target // 2).mean()),
            "weight": float((pred % 2 == target % 2).mean())}


def caption_following(run_dir: str | Path, resolution: int) -> dict:
    run_dir = Path(run_dir)
    first, final = run_dir / "samples_step0.png", run_dir / "samples.png"
    for f in (first, final, first.with_suffix(".txt"), final.with_suffix(".txt")):
        if not f.is_file():
            raise AhpaError(f"{f} is missing: the demo's grids were not written (rerun `ahpa demo --task t2i`)")
    clf, heldout = train_classifier(resolution)
    a, b = grid_following(clf, first, resolution), grid_following(clf, final, resolution)
    summary = (f"caption class {a['class']:.2f} -> {b['class']:.2f} (chance 0.05), digit {a['digit']:.2f} -> {b['digit']:.2f}, "
               f"weight {a['weight']:.2f} -> {b['weight']:.2f}; classifier held-out accuracy {heldout:.2f}")
    return {"first_grid": a, "final_grid": b, "classifier_heldout_accuracy": heldout, "summary": summary,
            "classes": [f"{WEIGHTS[w]} {DIGIT_NAMES[d]}" for d, w in toy_caption_classes()]}


def register(subparsers) -> None:
    d = subparsers.add_parser("demo", help="train a tiny SiT with AHPA on the bundled digits within a few CPU minutes")
    d.add_argument("--out", default=None, help="output directory (default runs/demo, or runs/demo-t2i with --task t2i)")
    d.add_argument("--method", choices=("ahpa", "vanilla"), default="ahpa")
    d.add_argument("--task", choices=("class", "t2i"), default="class",
                   help="class: SiT on class labels (configs/toy.yaml); t2i: MMDiT on captioned digits (configs/toy-t2i.yaml)")
    d.add_argument("--minutes", type=float, default=None,
                   help=f"training budget in minutes (default {BUDGET_MINUTES['class']:g}); the step cap is train.steps")
    d.add_argument("--no-resume", action="store_true")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/toy.yaml")
    d.set_defaults(func=run_demo)
