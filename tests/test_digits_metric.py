"""The toy's metric: the committed digits classifier, its classifier-feature FID and per-class accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from ahpa.evaluation.digits import ASSET, WEIGHTS, classify, digits_metrics, load_classifier, reference_images
from ahpa.evaluation.metrics import feature_statistics, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_classifier()


def test_committed_weights_are_small_and_classify_held_out_digits(model):
    assert (ASSET / WEIGHTS).stat().st_size < 400_000
    images, labels = reference_images("heldout")
    pred, feats = classify(model, images)
    assert (pred == labels).mean() > 0.95 and feats.shape == (len(labels), 64)


def test_cfid_is_small_for_real_held_out_digits_and_large_for_noise(model):
    images, labels = reference_images("heldout")
    real = digits_metrics(images, labels, ref="train", model=model)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    fake = digits_metrics(noise, np.arange(300) % 10, ref="train", model=model)
    assert real["accuracy"] > 0.95 and fake["accuracy"] < 0.3
    assert real["cfid"] * 10 < fake["cfid"]
    # the number is the Frechet distance of the penultimate features (the FID formula of metrics.py)
    _, f_real = classify(model, images)
    _, f_train = classify(model, reference_images("train")[0])
    assert real["cfid"] == pytest.approx(frechet_distance(*feature_statistics(f_real), *feature_statistics(f_train)))
    # per-class accuracy: labels shifted by one class are (almost) never what the classifier sees
    shifted = digits_metrics(images, (labels + 1) % 10, ref="train", model=model)
    assert shifted["accuracy"] < 0.05 and set(shifted["class_accuracy"]) == set(range(10))
