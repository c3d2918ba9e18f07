"""Feature cache: extraction, resume after a kill, verification, loading, compatibility."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_vae
from PIL import Image
from test_data_images import make_image_folder
from test_train_sources import cfg_for

from ahpa.cli import main as cli_main
from ahpa.data import extract as extract_module
from ahpa.data.cache import CacheDataset, bytes_per_image, check_compatible, dequantize, quantize_int8, read_manifest, verify_cache
from ahpa.data.extract import extract_cache
from ahpa.data.images import ImageFolderDataset
from ahpa.errors import AhpaError
from ahpa.io import file_sha256
from ahpa.priors.hierarchy import HierarchicalVAEPrior
from ahpa.priors.vae import load_vae
from ahpa.train import Trainer

RES = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny encoder is ~10x slower with threads contending


@pytest.fixture(scope="module")
def prior() -> HierarchicalVAEPrior:
    vae = small_vae((16, 32, 32))
    return HierarchicalVAEPrior(vae, groups=("G3", "G4"), grid=4)  # 32 px -> 8x8 latent -> 4x4 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(7):
            arr = np.random.default_rng(10 * c + i).integers(0, 256, (40, 36 + i, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


KW = dict(shard_size=5, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def reference(folder, prior, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "ref"
    extract_cache(folder, out, prior, RES, **KW)
    return out


def snapshot(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stop_after", [1, 3, "random"])
def test_resume_after_kill_gives_identical_cache(folder, prior, reference, tmp_path, stop_after):
    # 21 images, shards of 5 (5 shards), batches of 2 (3 per shard, 13 in all):
    # stop 1 = mid-shard, 3 = just after one shard, random = anywhere before the end.
    if stop_after == "random":
        stop_after = int(np.random.default_rng().integers(1, 13))
        print(f"killed after {stop_after} batches")
    out = tmp_path / "cache"
    assert extract_cache(folder, out, prior, RES, stop_after=stop_after, **KW) is None
    assert not (out / "manifest.json").exists()
    (out / "shards" / ".000004.safetensors.0123abcd.tmp").write_bytes(b"partial")  # killed mid-write
    records = sorted((out / "progress").glob("*.json"))
    if records:  # killed between a shard's rename and its progress record
        records[-1].unlink()
    manifest = extract_cache(folder, out, prior, RES, **KW)
    assert manifest["count"] == 21
    assert snapshot(out) == snapshot(reference)  # byte-identical shards, records and manifest


def test_multi_rank_shards_equal_single_rank(folder, prior, reference, tmp_path):
    out = tmp_path / "cache"
    assert extract_cache(folder, out, prior, RES, rank=0, world=2, **KW) is None  # rank 1 still pending
    assert extract_cache(folder, out, prior, RES, rank=1, world=2, **KW)["count"] == 21  # last rank writes it
    assert snapshot(out) == snapshot(reference)


def test_cached_items_equal_prior_on_the_fly(folder, prior, reference):
    cache = CacheDataset(reference)
    images = ImageFolderDataset(folder, RES)
    assert len(cache) == 21 and cache.flip is False
    shard = cache._open(0)
    index = shard.get_slice("index")[:].tolist()
    x = torch.stack([images.load(i).item["image"] for i in index]).float() / 127.5 - 1
    out = prior(x)
    for j, i in enumerate(index):
        item = cache[j]
        assert int(item["y"]) == images.labels[i]
        torch.testing.assert_close(item["latent_mean"], out.latent_mean[j], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(item["latent_std"], out.latent_std[j], atol=2e-3, rtol=2e-3)
        for g in ("G3", "G4"):
            assert item["features"][g].dtype == torch.float32
            torch.testing.assert_close(item["features"][g], out.features[g][j], atol=3e-3, rtol=3e-3)
    # Channel statistics over all images: mean E[mu], var E[mu^2 + sigma^2] - mean^2.
    every = torch.stack([images.load(i).item["image"] for i in range(21)]).float() / 127.5 - 1
    full = prior(every)
    mean = full.latent_mean.double().mean(dim=(0, 2, 3))
    var = (full.latent_mean.double() ** 2 + full.latent_std.double() ** 2).mean(dim=(0, 2, 3)) - mean**2
    np.testing.assert_allclose(cache.latent_stats["mean"], mean.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cache.latent_stats["std"], var.sqrt().numpy(), rtol=1e-5)
    manifest = cache.manifest
    assert manifest["labels"]["counts"] == [7, 7, 7]
    assert manifest["prior"] == json.loads(json.dumps(prior.describe()))
    assert manifest["features"]["G4"]["shape"] == [*prior.group_shapes["G4"], 4, 4]


def test_int8_and_flipped_copies(folder, prior, tmp_path):
    out = tmp_path / "int8"
    manifest = extract_cache(folder, out, prior, RES, dtype="int8", flip_both=True, **KW)
    cache = CacheDataset(out)
    assert cache.flip and len(cache) == 42 and manifest["latent_dtype"] == "float16"
    images = ImageFolderDataset(folder, RES)
    index = cache._open(0).get_slice("index")[:].tolist()
    x = torch.stack([images.load(i).item["image"] for i in index]).float() / 127.5 - 1
    out_plain, out_flip = prior(x), prior(x.flip(-1))
    for j in range(len(index)):
        for item, ref in ((cache[j], out_plain), (cache[21 + j], out_flip)):
            torch.testing.assert_close(item["latent_mean"], ref.latent_mean[j], atol=2e-3, rtol=2e-3)
            for g in ("G3", "G4"):
                bound = ref.features[g][j].abs().amax(dim=(-2, -1), keepdim=True) / 127 * 0.5 + 1e-6
                assert torch.all((item["features"][g] - ref.features[g][j]).abs() <= bound)
    assert cache.shard_sizes == [5, 5, 5, 5, 1] * 2
    latents_only = CacheDataset(out, groups=(), dtype=torch.float16)[3]
    assert latents_only["features"] == {} and latents_only["latent_mean"].dtype == torch.float16
    torch.testing.assert_close(latents_only["latent_std"].float(), cache[3]["latent_std"], atol=1e-3, rtol=1e-3)
    with pytest.raises(AhpaError, match="holds groups"):
        CacheDataset(out, groups=("G1",))


def test_quantize_int8_roundtrip():
    x = torch.randn(2, 3, 4, 5, 5) * torch.tensor([1e-3, 1.0, 100.0, 0.0]).view(1, 1, 4, 1, 1)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 4)
    assert q[:, :, :3].abs().amax(dim=(-2, -1)).eq(127).all()  # the max maps to +-127
    assert torch.equal(dequantize(q, scale)[:, :, 3], torch.zeros(2, 3, 5, 5))  # an all-zero channel stays 0
    assert torch.all((dequantize(q, scale) - x).abs() <= scale[..., None, None] / 2 + 1e-7)


def test_bytes_per_image_matches_shard_sizes(reference, prior):
    # Closed form from the issue: float16 G3+G4 of SD-VAE at 256 px: 8 x 512 x 16 x 16 x 2 B = 2 MiB.
    sd = {"G3": (4, 512), "G4": (4, 512)}
    assert bytes_per_image("float16", sd, 16, (4, 32, 32)) == 2 * 2**20 + 2 * 4 * 32 * 32 * 2 + 16
    assert bytes_per_image("int8", sd, 16, (4, 32, 32)) == 2**20 + 8 * 512 * 4 + 16384 + 16
    # Data bytes of every shard (file minus 8-byte length and JSON header) = count x bytes_per_image.
    manifest = read_manifest(reference)
    for shard in manifest["shards"]:
        raw = (reference / shard["file"]).read_bytes()
        header = int.from_bytes(raw[:8], "little")
        assert len(raw) - 8 - header == shard["count"] * manifest["bytes_per_image"]


def test_corrupted_shard_is_caught(reference, tmp_path):
    assert verify_cache(reference) == []
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    shard = cache / "shards" / "000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte in the features
    shard.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert len(problems) == 1 and "000002" in problems[0] and "sha256" in problems[0]
    assert verify_cache(cache, checksum=False) == []
    loader = CacheDataset(cache, verify="checksum")
    loader[0]  # shard 0 is sound
    with pytest.raises(AhpaError, match="000002.safetensors.*sha256"):
        loader[10]
    assert cli_main(["extract", "--verify", str(cache)]) == 2
    shard.write_bytes(bytes(data[:-50]))  # truncated: caught at open from the size
    assert "000002" in verify_cache(cache, checksum=False)[0]
    with pytest.raises(AhpaError, match="000002.safetensors"):
        CacheDataset(cache)
    assert cli_main(["extract", "--verify", str(reference)]) == 0


def test_mismatched_prior_or_settings_are_refused(reference, prior, folder):
    manifest = read_manifest(reference)
    describe = prior.describe()
    check_compatible(manifest, describe, RES)
    for field, value in [("encoder_hash", "0" * 64), ("resample", "bilinear"), ("grid", 8), ("groups", ["G2", "G4"])]:
        with pytest.raises(AhpaError, match=f"field '{field}'"):
            check_compatible(manifest, {**describe, field: value}, RES)
    with pytest.raises(AhpaError, match="field 'resolution'"):
        check_compatible(manifest, describe, 64)
    with pytest.raises(AhpaError, match="field 'dtype'"):
        extract_cache(folder, reference, prior, RES, dtype="bfloat16", **KW)


def test_unfinished_cache_resume_refuses_other_settings(folder, prior, tmp_path):
    out = tmp_path / "cache"
    extract_cache(folder, out, prior, RES, stop_after=2, **KW)
    with pytest.raises(AhpaError, match="field 'shard_size'"):
        extract_cache(folder, out, prior, RES, shard_size=4, batch_size=2, progress=False)
    with pytest.raises(AhpaError, match="no manifest.json"):
        CacheDataset(out)


def test_disk_space_refusal(folder, prior, tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(AhpaError, match="GiB"):
        extract_cache(folder, tmp_path / "cache", prior, RES, **KW)


def test_mixed_format_folder_report(prior, tmp_path):
    root = tmp_path / "images"
    expected = make_image_folder(root)
    manifest = extract_cache(root, tmp_path / "cache", prior, RES, shard_size=16, batch_size=8, workers=0, progress=False)
    info = manifest["images"]
    assert info["listed"] == expected["listed"] and info["ignored"] == expected["ignored"]
    assert manifest["count"] == expected["listed"] - expected["failed"]
    assert sorted(Path(p).name for p in info["failed"]) == ["text.jpg", "truncated.jpg"]
    assert info["converted"] == dict(sorted(expected["converted"].items()))
    assert info["upsampled"] == expected["upsampled"]
    assert info["empty_classes"] == ["c_empty"]
    assert manifest["labels"]["classes"][2] == "c_empty" and manifest["labels"]["counts"][2] == 0
    assert sum(manifest["labels"]["counts"]) == manifest["count"]
    assert verify_cache(tmp_path / "cache") == []


def test_flipped_byte_stops_training_with_the_shard_name_and_a_plain_rerun_restores_it(folder, tmp_path):
    """Issue 19 item 2: the xxh3_64 of every shard is checked at its first read; the same extract command redoes it."""
    out = tmp_path / "cache"
    tiny = HierarchicalVAEPrior(load_vae("tiny"), groups=("G3", "G4"), grid=4)
    extract_cache(folder, out, tiny, RES, **KW)
    shard = out / "shards" / "000002.safetensors"
    assert all("xxh3_64" in s for s in read_manifest(out)["shards"])
    original = {p.name: file_sha256(p) for p in (out / "shards").iterdir()}
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # same size: only the checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.raises(AhpaError, match=r"000002\.safetensors fails its xxh3_64 checksum.*rerun the same `ahpa extract"):
        CacheDataset(out)[10]
    run = Trainer(cfg_for(tmp_path / "run", "data.source=cache", f"data.path={out}", "train.steps=6"), show_progress=False)
    with pytest.raises(AhpaError, match=r"000002\.safetensors fails its xxh3_64 checksum") as err:
        run.run()  # 21 items, 8 per step: every shard is read within the first three steps
    assert "\n" not in str(err.value) and run.step < 6
    extract_cache(folder, out, tiny, RES, **KW)  # the plain rerun, no --checksums
    assert {p.name: file_sha256(p) for p in (out / "shards").iterdir()} == original
    assert verify_cache(out) == [] and len(CacheDataset(out)[10]["features"]) == 2


def test_a_cache_without_xxh3_checksums_still_reads(reference, tmp_path):
    """Caches written before the fast checksum (their records have sha256 only) read with the size checks."""
    cache = tmp_path / "old"
    shutil.copytree(reference, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["xxh3_64"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert verify_cache(cache) == [] and set(CacheDataset(cache)[10]) == {"latent_mean", "latent_std", "y", "features"}
    shard = cache / "shards" / "000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "sha256" in verify_cache(cache)[0]  # --verify and `extract --checksums` still find it
