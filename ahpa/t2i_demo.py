"""Does the text-to-image demo's grid follow its captions? (``ahpa demo --task t2i``)

The grids (``samples_step0.png`` before training, ``samples.png`` after) have
one row per caption, listed in the ``.txt`` beside them.  Each cell is
classified by a digits classifier trained here on the REAL captioned toy images
(multinomial logistic regression on the grey pixels, scikit-learn), into the 20
caption classes (digit x stroke weight); its accuracy on the held-out digits is
reported with it.  Caption following = the fraction of cells whose predicted
class is their row's caption class (chance 1/20), and the same for the digit
alone (chance 1/10) and for the weight alone (chance 1/2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ahpa.data.coco import DIGIT_NAMES, WEIGHTS, toy_caption_classes, toy_captions
from ahpa.errors import AhpaError

PER_ROW = 8  # samples per caption row (train.py _grid_inputs)


def _features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, R, R] grey -> [N, R*R] in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def train_classifier(resolution: int):
    """Logistic regression on the real captioned toy set; returns (classifier, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression

    from ahpa.data.coco import load_captioned_toy

    x, y, _ = load_captioned_toy("train", resolution)
    xh, yh, _ = load_captioned_toy("heldout", resolution)
    clf = LogisticRegression(max_iter=300, C=1.0)
    clf.fit(_features(x[:, 0].numpy()), y.numpy())
    return clf, float((clf.predict(_features(xh[:, 0].numpy())) == yh.numpy()).mean())


def grid_cells(png: Path, resolution: int, rows: int) -> np.ndarray:
    """The cells of a torchvision grid (padding 1, ``PER_ROW`` per row) as grey uint8 [rows * PER_ROW, R, R]."""
    arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8).mean(axis=2)
    step = resolution + 1
    cells = [arr[1 + r * step : 1 + r * step + resolution, 1 + c * step : 1 + c * step + resolution]
             for r in range(rows) for c in range(PER_ROW)]
    return np.stack(cells).round().astype(np.uint8)


def caption_class(prompt: str) -> int:
    for k, (d, w) in enumerate(toy_caption_classes()):
        if prompt in toy_captions(d, w):
            return k
    raise AhpaError(f"grid caption {prompt!r} is not a toy caption")


def grid_following(clf, png: Path, resolution: int) -> dict:
    prompts = png.with_suffix(".txt").read_text().splitlines()
    target = np.repeat([caption_class(p) for p in prompts], PER_ROW)
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
