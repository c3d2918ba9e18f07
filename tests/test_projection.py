"""Projected feature caches (issue 18 item 1; docs/projected-caches.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from test_train import weights

from ahpa.align.objective import AlignmentObjective
from ahpa.build import build_source
from ahpa.cli import main as cli_main
from ahpa.config import load_config
from ahpa.data import extract as extract_module
from ahpa.data.cache import CacheDataset, bytes_per_image, read_manifest, verify_cache
from ahpa.data.extract import extract_cache
from ahpa.data.images import ImageFolderDataset
from ahpa.data.projection import (
    MomentAccumulator,
    Projection,
    ProjectionSpec,
    load_projection,
    pca_from_moment,
    pca_subset,
    project,
    random_projection,
)
from ahpa.data.toy import load_toy
from ahpa.errors import AhpaError
from ahpa.priors.hierarchy import SD_VAE_CONFIG, HierarchicalVAEPrior
from ahpa.priors.vae import load_vae
from ahpa.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"
ROUTERS = ("dynamic", "content", "uniform", "linear", "lut", "attention")  # every kind of ahpa/align/router.py build_router
K = 8


def cfg_for(out: Path, *extra: str):
    return load_config(TOY, [f"train.out={out}", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=0",
                             "train.grid_steps=2", "train.max_minutes=0", "data.num_workers=0", "data.hflip=false", *extra])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 toy digits (4 per class) as an ImageNet-layout PNG folder."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = load_toy("train", resolution=32)
    for c in range(10):
        (root / f"class_{c}").mkdir()
        for k, i in enumerate(torch.nonzero(labels == c).flatten()[:4].tolist()):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / f"class_{c}" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def prior() -> HierarchicalVAEPrior:
    return HierarchicalVAEPrior(load_vae("tiny"), groups=("G3", "G4"), grid=4)


def spec(kind: str = "pca", **kw) -> ProjectionSpec:
    return ProjectionSpec.parse(f"{kind}:{K}", **({"images": 16} | kw))


@pytest.fixture(scope="module")
def cache(folder, prior, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("projected") / "c"
    extract_cache(folder, out, prior, 32, shard_size=16, batch_size=16, progress=False, projection=spec())
    return out


# ---------------------------------------------------------------------- the algebra
@pytest.mark.parametrize("router", ROUTERS)
def test_router_mixture_of_projected_features_is_the_projection_of_its_mixture(router):
    torch.manual_seed(0)
    layers, C, B, grid = {"G3": 2, "G4": 3}, 16, 5, 4
    full = AlignmentObjective(32, grid, {g: (L, C) for g, L in layers.items()}, [1], router=router, normalize="none",
                              router_warmup_steps=4)
    small = AlignmentObjective(32, grid, {g: (L, K) for g, L in layers.items()}, [1], router=router, normalize="none",
                               router_warmup_steps=4)
    with torch.no_grad():
        for p in full.router.parameters():  # a router far from its initial (often uniform) output
            p.add_(torch.randn_like(p))
    small.router.load_state_dict(full.router.state_dict())
    full.set_step(2), small.set_step(2)
    feats = {g: torch.randn(B, L, C, grid, grid) for g, L in layers.items()}  # float32, as the objective computes
    proj = Projection({g: random_projection(C, K, i) for i, g in enumerate(layers)}, "random", normalize="none")
    t = torch.rand(B)
    content = torch.randn(B, 32) if router == "content" else None
    target, gamma = full.alignment_target(feats, t, content, normalized=feats)
    projected, gamma_p = small.alignment_target(project(feats, proj), t, content, normalized=project(feats, proj))
    by_group = torch.split(target, C, dim=1)
    want = torch.cat([torch.einsum("kc,bchw->bkhw", proj.matrices[g], y) for g, y in zip(layers, by_group)], dim=1)
    torch.testing.assert_close(gamma_p, gamma, rtol=0, atol=0)
    torch.testing.assert_close(projected, want, rtol=0, atol=1e-6)
    assert want.abs().max() > 0.1  # a mixture, not zeros


def test_pca_recovers_a_known_subspace_and_its_explained_variance():
    C, r, N = 10, 3, 4 * 3 * 5 * 5
    q, _ = torch.linalg.qr(torch.randn(C, r, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    z, _ = torch.linalg.qr(torch.randn(N, r, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    x = (z * N**0.5) * s @ q.T  # second moment exactly N q diag(s^2) q^T: rank 3
    acc = MomentAccumulator()
    for part in x.reshape(4, 3, 5, 5, C).movedim(-1, 2).float().split(2):  # [B, L, C, H, W], streamed in two batches
        acc.add({"G": part})
    assert acc.tokens == N
    for k, explained in ((1, 9 / 14), (2, 13 / 14), (3, 1.0), (5, 1.0)):
        p, got = pca_from_moment(acc.sums["G"], k)
        assert p.shape == (k, C) and got == pytest.approx(explained, abs=1e-6)
        torch.testing.assert_close(p.double() @ p.double().T, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
        top = q[:, : min(k, r)]  # the top-k subspace of the data lies in the span of P's rows
        torch.testing.assert_close(p.double().T @ (p.double() @ top), top, atol=1e-5, rtol=0)


def test_random_projection_and_pca_subset_are_seeded():
    p = random_projection(64, K, 3)
    torch.testing.assert_close(p @ p.T, torch.eye(K), atol=1e-5, rtol=0)
    assert torch.equal(p, random_projection(64, K, 3)) and not torch.equal(p, random_projection(64, K, 4))
    assert pca_subset(100, 10, 0).tolist() == pca_subset(100, 10, 0).tolist() != pca_subset(100, 10, 1).tolist()
    with pytest.raises(AhpaError, match="pca:K, random:K"):
        ProjectionSpec.parse("svd:8")
    with pytest.raises(AhpaError, match="exceeds the 64 channels"):
        ProjectionSpec("pca", 65).shapes({"G3": (2, 64)})


def test_sd_vae_projected_cache_bytes_per_image_at_256_px():
    """From the shapes a projected cache's manifest records (no weights): K = 64 reaches the issue's feature budget."""
    with torch.device("meta"):
        sd = HierarchicalVAEPrior(AutoencoderKL.from_config(dict(SD_VAE_CONFIG)), groups=("G3", "G4"), grid=16)
    shapes = ProjectionSpec("pca", 64).shapes(dict(sd.group_shapes))
    assert shapes == {"G3": (4, 64), "G4": (4, 64)}
    latents = 2 * 4 * 32 * 32 * 2 + 16  # moments, label, index: what every cache (and REPA's latent cache) holds
    f16, i8 = bytes_per_image("float16", shapes, 16, (4, 32, 32)), bytes_per_image("int8", shapes, 16, (4, 32, 32))
    assert f16 - latents == 256 * 1024  # features: 8 layers x 64 x 16 x 16 x 2 B
    assert i8 - latents == 128 * 1024 + 8 * 64 * 4  # int8 features + float32 scales per layer and channel
    full = bytes_per_image("float16", dict(sd.group_shapes), 16, (4, 32, 32))
    assert full / f16 > 7.5  # 2.02 MiB -> 0.27 MiB


# ---------------------------------------------------------------------- the cache
def test_projected_cache_manifest_projection_and_verify(cache, prior, folder, tmp_path):
    manifest = read_manifest(cache)
    rec = manifest["projection"]
    assert rec["kind"] == "pca" and rec["k"] == K and rec["pca_images"] == 16 and rec["normalize"] == "token"
    assert manifest["features"]["G3"]["shape"] == [2, K, 4, 4] and manifest["features"]["G4"]["shape"] == [6, K, 4, 4]
    assert all(0 < rec["explained_variance"][g] <= 1 for g in ("G3", "G4"))
    projection = load_projection(cache / "projection.safetensors")
    assert projection.k == K and projection.explained == rec["explained_variance"]
    # the stored values are P norm(F) of the same images (float16 storage)
    data = CacheDataset(cache)
    item = data[0]
    idx = int(data._open(0).get_slice("index")[0:1][0])
    image = ImageFolderDataset(folder, 32)[idx]["image"].float()[None] / 127.5 - 1
    want = project(prior(image).features, projection)
    for g in ("G3", "G4"):
        torch.testing.assert_close(item["features"][g], want[g][0], atol=2e-2, rtol=2e-3)
    assert verify_cache(cache) == [] and cli_main(["extract", "--verify", str(cache)]) == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    matrices = bytearray((damaged / "projection.safetensors").read_bytes())
    matrices[-3] ^= 0x01
    (damaged / "projection.safetensors").write_bytes(bytes(matrices))
    assert any("projection.safetensors" in p and "sha256" in p for p in verify_cache(damaged, checksum=False))
    assert cli_main(["extract", "--verify", str(damaged), "--quick"]) == 2


def test_int8_projected_cache_reads_close_to_float16(cache, prior, folder, tmp_path):
    out = tmp_path / "i8"
    extract_cache(folder, out, prior, 32, dtype="int8", shard_size=16, batch_size=16, progress=False, projection=spec())
    assert (out / "projection.safetensors").read_bytes() == (cache / "projection.safetensors").read_bytes()
    a, b = CacheDataset(out)[3], CacheDataset(cache)[3]
    for g in ("G3", "G4"):
        assert a["features"][g].shape == (read_manifest(out)["features"][g]["shape"][0], K, 4, 4)
        torch.testing.assert_close(a["features"][g], b["features"][g], atol=0.05 * b["features"][g].abs().max().item(), rtol=0)


def test_random_projection_cache_and_other_settings_refused(folder, prior, cache, tmp_path):
    out = tmp_path / "r"
    extract_cache(folder, out, prior, 32, shard_size=16, batch_size=16, progress=False, projection=spec("random"))
    rec = read_manifest(out)["projection"]
    assert rec["kind"] == "random" and rec["explained_variance"] == {"G3": None, "G4": None}
    with pytest.raises(AhpaError, match="field 'projection.k' differs"):
        extract_cache(folder, cache, prior, 32, shard_size=16, batch_size=16, progress=False, projection=ProjectionSpec("pca", 4, 16))
    with pytest.raises(AhpaError, match="field 'projection' differs"):
        extract_cache(folder, cache, prior, 32, shard_size=16, batch_size=16, progress=False)


# ---------------------------------------------------------------------- training on it
def test_projected_cache_trains_and_wrong_projection_is_refused(cache, tmp_path):
    run = Trainer(cfg_for(tmp_path / "a", "data.source=cache", f"data.path={cache}", f"prior.project=pca:{K}", "train.steps=1"),
                  show_progress=False)
    assert run.source.group_shapes == {"G3": (2, K), "G4": (6, K)} and run.objective.normalize == "none"
    assert run.objective.target_dim == 2 * K  # the head outputs K channels per group
    assert {g: tuple(f.shape[1:3]) for g, f in run.source.next_batch()["features"].items()} == {"G3": (2, K), "G4": (6, K)}
    metrics = run.run()
    assert metrics["steps"] == 1 and -1 <= metrics["history"][-1]["loss_align"] <= 1 and metrics["history"][-1]["loss_align"] != 0
    for project, match in ((f"pca:{2 * K}", "holds pca:8 features, the config expects prior.project='pca:16'"),
                           (f"random:{K}", "holds pca:8 features"), ("", "holds pca:8 features, the config expects prior.project=''")):
        with pytest.raises(AhpaError, match=match) as err:
            Trainer(cfg_for(tmp_path / "b", "data.source=cache", f"data.path={cache}", f"prior.project={project}"), show_progress=False)
        assert "\n" not in str(err.value)
    with pytest.raises(AhpaError, match="normalised with prior.normalize=token"):
        Trainer(cfg_for(tmp_path / "c", "data.source=cache", f"data.path={cache}", f"prior.project=pca:{K}", "prior.normalize=spatial"),
                show_progress=False)


@pytest.mark.slow
def test_projected_cache_resumes_bit_exactly(cache, tmp_path):
    args = ("data.source=cache", f"data.path={cache}", f"prior.project=pca:{K}")
    Trainer(cfg_for(tmp_path / "full", *args, "train.steps=2"), show_progress=False).run()
    Trainer(cfg_for(tmp_path / "half", *args, "train.steps=1"), show_progress=False).run()
    resumed = Trainer(cfg_for(tmp_path / "half", *args, "train.steps=2"), show_progress=False)
    assert resumed.step == 1
    resumed.run()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert a.keys() == b.keys() and any(k.startswith("objective.heads") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_on_the_fly_projection_gives_the_cache_targets(cache, folder, prior, tmp_path, monkeypatch):
    file = cache / "projection.safetensors"
    seen = []  # the extractor's float32 targets just before storage rounding
    real = extract_module.storage_tensors
    monkeypatch.setattr(extract_module, "storage_tensors", lambda out, *a, **kw: seen.append(out.features) or real(out, *a, **kw))
    shutil.copytree(cache, tmp_path / "again")
    for shard in (tmp_path / "again" / "shards").glob("000000.*"):  # shard 0 is redone by a plain rerun
        shard.write_bytes(b"x" * shard.stat().st_size)
    extract_cache(folder, tmp_path / "again", prior, 32, shard_size=16, batch_size=16, progress=False, projection=spec())
    assert seen and (tmp_path / "again" / "shards" / "000000.safetensors").read_bytes() == (cache / "shards" / "000000.safetensors").read_bytes()
    cached = build_source(cfg_for(tmp_path, "data.source=cache", f"data.path={cache}", f"prior.project=pca:{K}"),
                          device="cpu", rank=0, world=1, per_rank=8)
    raw = build_source(cfg_for(tmp_path, "data.source=images", f"data.path={folder}", f"prior.project={file}"),
                       device="cpu", rank=0, world=1, per_rank=8)
    assert raw.group_shapes == cached.group_shapes == {"G3": (2, K), "G4": (6, K)}
    idx = int(cached.dataset._open(0).get_slice("index")[0:1][0])
    image = raw.dataset[idx]["image"].float()[None] / 127.5 - 1
    on_the_fly = raw.prior(image).features
    # before storage: exactly what the extractor projects (extract._encode: project(prior(x).features, projection))
    direct = project(raw.prior.prior(image).features, load_projection(file))
    item = cached.dataset[0]
    for g in ("G3", "G4"):
        torch.testing.assert_close(on_the_fly[g], direct[g], atol=1e-5, rtol=0)
        torch.testing.assert_close(on_the_fly[g][0], seen[0][g][0], atol=1e-5, rtol=0)  # the extractor's, before storage
        torch.testing.assert_close(item["features"][g].float(), on_the_fly[g][0], atol=2e-2, rtol=2e-3)  # after float16 storage
    with pytest.raises(AhpaError, match="needs a projection file"):
        build_source(cfg_for(tmp_path, "data.source=images", f"data.path={folder}", f"prior.project=pca:{K}"),
                     device="cpu", rank=0, world=1, per_rank=8)
    with pytest.raises(AhpaError, match="prior.project=pca:8 projects the VAE groups only"):
        cfg_for(tmp_path, f"prior.project=pca:{K}", "prior.groups=[G3,dinov2]")
    data = json.loads((cache / "manifest.json").read_text())
    assert data["projection"]["sha256"]
