"""ADM metric semantics and the .npz format (no Inception network needed)."""

import warnings
import zipfile

import numpy as np
import pytest
import torch
from scipy import linalg

from ahpa.errors import AhpaError
from ahpa.evaluation.metrics import feature_statistics, frechet_distance, inception_score, manifold_radii, precision_recall
from ahpa.evaluation.npz import open_npz_images, save_npz_atomic, to_uint8

# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Rotating both covariances by the same orthogonal matrix keeps them commuting and the distance equal.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_product_uses_adm_fallback():
    # Rank-1 and rank-2 covariances whose product scipy's sqrtm cannot take (non-finite).
    s1 = np.array([[1.0, 0, 1], [0, 0, 0], [1, 0, 1]])
    s2 = np.array([[5.0, -4, 2], [-4, 5, -1], [2, -1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()  # the fallback is really needed here
    with pytest.warns(UserWarning, match="singular"):
        fid = frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    # s1 s2 has the single non-zero eigenvalue 10, so Tr sqrt(s1 s2) = sqrt(10).
    assert fid == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * np.sqrt(10), abs=1e-2)


def test_feature_statistics_match_numpy_in_blocks():
    x = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x, block=7)
    np.testing.assert_allclose(mu, x.mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)


# ---------------------------------------------------------------- Inception Score


def _one_hot_logits(classes: np.ndarray) -> np.ndarray:
    logits = np.zeros((len(classes), 1008), dtype=np.float32)
    logits[np.arange(len(classes)), classes] = 200.0  # p(y|x) is one-hot to float64 precision
    return logits


def test_inception_score_uses_consecutive_5000_splits():
    # Split 1: 10 classes equally often (IS 10); split 2: 20 classes (IS 20); split 3 (partial, 2000): 4 classes.
    classes = np.concatenate([np.arange(5000) % 10, np.arange(5000) % 20, np.arange(2000) % 4])
    assert inception_score(_one_hot_logits(classes)) == pytest.approx((10 + 20 + 4) / 3, rel=1e-9)
    # One split over everything (or a shuffle) gives another number.
    assert inception_score(_one_hot_logits(classes), split_size=len(classes)) != pytest.approx(34 / 3, rel=1e-3)
    assert inception_score(np.zeros((10, 1008), dtype=np.float32)) == pytest.approx(1.0)


def test_inception_score_matches_adm_formula_on_random_logits():
    logits = np.random.default_rng(2).normal(scale=3, size=(700, 1008)).astype(np.float32)
    scores = []  # ADM evaluator.compute_inception_score, written out
    for i in range(0, len(logits), 300):
        part = np.exp(logits[i : i + 300].astype(np.float64))
        part /= part.sum(1, keepdims=True)
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits, split_size=300) == pytest.approx(np.mean(scores), rel=1e-9)


# ---------------------------------------------------------------- precision / recall


def _line(xs):
    return np.stack([np.asarray(xs, dtype=np.float32), np.zeros(len(xs), dtype=np.float32)], axis=1)


def test_manifold_radii_are_third_neighbour_excluding_self():
    # Squared distances; for 0: others at 1, 4, 9, 100 -> third neighbour 9 (self, at 0, is not counted).
    radii = manifold_radii(_line([0, 1, 2, 3, 10]), k=3, block=2)
    np.testing.assert_array_equal(radii.numpy(), [9, 4, 4, 9, 81])


def test_precision_recall_on_hand_computed_sets():
    reference, samples = _line([0, 1, 2, 3, 10]), _line([-2.5, 5, 20, 30, 40])
    # -2.5 is 6.25 from 0 (radius 9) and 5 is 4 from 3 (radius 9): in. 20 is 100 from 10 (radius 81): out.
    # Counting the point itself as a neighbour would give radius 4 at 0 and precision 1/5.
    # Sample radii are large (third neighbour of -2.5 is 40: 42.5^2), so every reference point is covered.
    for block in (2, 64):
        assert precision_recall(reference, samples, block=block) == (pytest.approx(0.4), pytest.approx(1.0))


def _brute_force_pr(ref, smp, k=3):
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
    d_sr = ((smp[:, None] - ref[None]) ** 2).sum(-1)
    r_ref = np.partition(d_rr, k, axis=1)[:, k]
    r_smp = np.partition(d_ss, k, axis=1)[:, k]
    return (d_sr <= r_ref[None]).any(1).mean(), (d_sr.T <= r_smp[None]).any(1).mean()


def test_blocked_precision_recall_matches_brute_force():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(37, 8)).astype(np.float64)
    smp = (rng.normal(size=(29, 8)) * 1.3 + 0.4).astype(np.float64)
    expected = _brute_force_pr(ref, smp)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(ref.astype(np.float32), smp.astype(np.float32), block=5, half=False)
    assert got == (pytest.approx(expected[0]), pytest.approx(expected[1]))


# ---------------------------------------------------------------- npz format


def test_to_uint8_matches_adm_formula_on_edge_values():
    values = torch.tensor([-1.5, -1.0, -0.996, -0.0, 0.0, 0.5, 0.999, 1.0, 1.0001, 2.0])
    images = values.view(1, 1, 1, -1).repeat(2, 3, 4, 1)
    images[1, 2, 3, 0] = 0.25  # one marked pixel: image 1, channel 2, row 3, column 0
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 10, 3)  # NHWC
    # ADM: ((x + 1) * 127.5).clamp(0, 255).to(uint8) -- truncation, not rounding.
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 0, 127, 127, 191, 254, 255, 255, 255])
    assert out[1, 3, 0, 2] == 159 and out[1, 3, 0, 1] == 0


def _adm_read_arr0(path, batch_size):
    """ADM evaluator's streaming reader: zip member arr_0.npy, npy header, raw batches."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        assert version == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert not fortran
        batches, left = [], shape[0]
        while left:
            n = min(batch_size, left)
            batches.append(np.frombuffer(f.read(n * int(np.prod(shape[1:]))), dtype=dtype).reshape(n, *shape[1:]))
            left -= n
    return np.concatenate(batches)


def test_npz_round_trip_through_adm_reader(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, size=(11, 8, 6, 3), dtype=np.uint8)
    labels = np.arange(11)
    path = save_npz_atomic(tmp_path / "samples.npz", images, arr_1=labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary left behind
    np.testing.assert_array_equal(np.load(path)["arr_0"], images)
    np.testing.assert_array_equal(_adm_read_arr0(path, 4), images)
    reader = open_npz_images(path)
    assert len(reader) == 11 and reader.resolution == (8, 6) and reader.keys == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(np.concatenate(list(reader.batches(4))), images)
    np.testing.assert_array_equal(reader.load("arr_1"), labels)


@pytest.mark.parametrize(
    ("array", "key", "message"),
    [
        (np.zeros((2, 3, 8, 8), np.uint8), "arr_0", "NCHW"),
        (np.zeros((2, 8, 8, 3), np.float32), "arr_0", "uint8"),
        (np.zeros((2, 8, 8, 1), np.uint8), "arr_0", "3 \\(RGB\\) channels"),
        (np.zeros((2, 8, 8, 3), np.uint8), "images", "no 'arr_0'"),
    ],
)
def test_open_npz_images_names_the_problem(tmp_path, array, key, message):
    np.savez(tmp_path / "bad.npz", **{key: array})
    with pytest.raises(AhpaError, match=message):
        open_npz_images(tmp_path / "bad.npz")


def test_save_npz_atomic_rejects_bad_arrays_without_leaving_files(tmp_path):
    with pytest.raises(AhpaError, match="NCHW"):
        save_npz_atomic(tmp_path / "s.npz", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(AhpaError, match="uint8"):
        save_npz_atomic(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.float32))
    assert list(tmp_path.iterdir()) == []
