"""A metric for the toy digits: the project's own small classifier (issue 13).

Inception features of 32x32 upsampled 8x8 digits are far from ImageNet, and 1000+
Inception passes cost minutes on a CPU.  The toy study instead uses a small CNN
trained here on the toy's training split (weights under
``ahpa/assets/digits_classifier/``, ~100 KB, reproduced by
``python -m ahpa.evaluation.digits train``).  Two numbers per sample set:

- ``cfid``: the Frechet distance (:func:`ahpa.evaluation.metrics.frechet_distance`,
  the FID formula) between the classifier's penultimate features (64-d) of the
  samples and of a reference split of the real digits;
- ``accuracy``: the fraction of samples of label i that the classifier calls i,
  averaged over the classes (``class_accuracy`` lists each class).

Images enter as uint8 NHWC RGB (an ADM ``.npz``) at any size; they are turned grey
(channel mean) and resized to 32x32 with antialiased bilinear interpolation.

    python -m ahpa.evaluation.digits train --out ahpa/assets/digits_classifier
    python -m ahpa.evaluation.digits evaluate SAMPLES.npz --ref train --out metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# Upward import, on purpose: the classifier is trained on, and compares samples with, the toy digits
# themselves (the same images, labels and splits the toy run trains on), which the data layer owns.
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.evaluation.metrics import feature_statistics, frechet_distance
from ahpa.io import atomic_dir, write_json_atomic

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier"
WEIGHTS = "model.safetensors"
SIZE = 32  # classifier input side
FEATURE_DIM = 64
NUM_CLASSES = 10
# Training recipe of the committed weights (see train_classifier).
RECIPE = dict(epochs=20, batch=64, lr=2e-3, weight_decay=1e-4, max_shift=3, seed=0)


class DigitsClassifier(nn.Module):
    """Three conv blocks (16/32/64 channels, 3x3, BatchNorm, ReLU, 2x2 max-pool: 32 -> 4),
    global average pool -> 64-d features -> linear classifier."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 1
        for c in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.Conv2d(64, FEATURE_DIM, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.features(x)
        return (self.fc(f), f) if return_features else self.fc(f)


def prepare(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` (or ``[N, 3, H, W]`` tensor) -> float ``[N, 1, 32, 32]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() != 4:
        raise AhpaError(f"digit images must be [N, H, W, C] uint8, got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float().mean(1, keepdim=True) / 127.5 - 1.0
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The committed classifier (or ``path``: a folder holding model.safetensors), eval mode, CPU."""
    path = Path(path) if path else ASSET
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise AhpaError(f"digits classifier weights '{file}' are missing; recreate them with "
                        "`python -m ahpa.evaluation.digits train --out ahpa/assets/digits_classifier`")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(file)))
    return model.eval()


@torch.no_grad()
def classify(model: DigitsClassifier, images, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels ``[N]``, penultimate features ``[N, 64]`` float64)."""
    x = prepare(images)
    preds, feats = [], []
    for chunk in torch.split(x, batch):
        logits, f = model(chunk, return_features=True)
        preds.append(logits.argmax(1))
        feats.append(f.double())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def reference_images(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A toy split as uint8 NHWC and its labels."""
    images, labels = load_toy(split, resolution=SIZE)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy()


def digits_metrics(images, labels, ref: str | tuple[np.ndarray, np.ndarray] = "train",
                   model: DigitsClassifier | None = None) -> dict:
    """Classifier-feature FID to the reference and per-class accuracy of the labels.

    ``ref``: a toy split name ("train" | "heldout") or ``(images, labels)``.
    """
    model = model or load_classifier()
    labels = np.asarray(labels)
    pred, feats = classify(model, images)
    ref_images = reference_images(ref)[0] if isinstance(ref, str) else ref[0]
    _, ref_feats = classify(model, ref_images)
    cfid = frechet_distance(*feature_statistics(feats), *feature_statistics(ref_feats))
    classes = sorted(set(labels.tolist()))
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in classes}
    return {"cfid": float(cfid), "accuracy": float(np.mean(list(per_class.values()))),
            "class_accuracy": per_class, "num_samples": int(len(labels)),
            "reference": ref if isinstance(ref, str) else "images"}


def train_classifier(out: str | Path, epochs: int = RECIPE["epochs"], seed: int = RECIPE["seed"]) -> dict:
    """Train the classifier on the toy training split (random shifts of up to 3 px, AdamW,
    cosine learning rate), report held-out accuracy and write ``out/model.safetensors`` and
    ``out/training.json`` atomically.  CPU, about a minute."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train = prepare(load_toy("train", SIZE)[0])
    y_train = load_toy("train", SIZE)[1]
    x_held, y_held = prepare(load_toy("heldout", SIZE)[0]), load_toy("heldout", SIZE)[1]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps_per_epoch = -(-len(y_train) // RECIPE["batch"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    s = RECIPE["max_shift"]
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(order), RECIPE["batch"]):
            idx = order[i : i + RECIPE["batch"]]
            xb = F.pad(x_train[idx], (s, s, s, s), value=-1.0)  # random translation: pad, then crop
            dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
            xb = xb[..., dy : dy + SIZE, dx : dx + SIZE]
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        held_acc = float((model(x_held).argmax(1) == y_held).float().mean())
        train_acc = float((model(x_train).argmax(1) == y_train).float().mean())
    report = {"recipe": dict(RECIPE, epochs=epochs, seed=seed), "heldout_accuracy": held_acc, "train_accuracy": train_acc,
              "parameters": sum(p.numel() for p in model.parameters()),
              "command": "python -m ahpa.evaluation.digits train --out ahpa/assets/digits_classifier"}
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ahpa.evaluation.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the digits classifier")
    t.add_argument("--out", default=str(ASSET))
    t.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    e = sub.add_parser("evaluate", help="cfid and per-class accuracy of an ADM .npz (arr_0 images, arr_1 labels)")
    e.add_argument("samples")
    e.add_argument("--ref", default="train", choices=("train", "heldout"))
    e.add_argument("--out", help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            print(json.dumps(train_classifier(args.out, epochs=args.epochs), indent=2))
            return 0
        with np.load(args.samples) as data:
            if "arr_1" not in data:
                raise AhpaError(f"{args.samples} has no arr_1 labels; the digits metric needs class-conditional samples")
            metrics = digits_metrics(data["arr_0"], data["arr_1"], ref=args.ref)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, metrics, indent=2)
        print(json.dumps(metrics))
        return 0
    except AhpaError as err:
        print(f"digits: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
